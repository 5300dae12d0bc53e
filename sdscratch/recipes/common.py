"""What every recipe shares: the registry, `run_recipe`, threads, seeds, the manifest.

Threads: `run_recipe` runs every recipe inside `pinned_threads()`, on RECIPE_THREADS
torch threads (one; see there why), and records the number in the manifest.

Seeds: a recipe's `seed` argument drives every random draw:

- initial weights: `with seeded(seed):` around the model's construction, which
  leaves torch's global generator as it was;
- data order and noise: `torch.Generator().manual_seed(seed)`, one stream in vae
  (also its scaling factor's latents), clip and ldm (ldm's evaluation samples from
  a second generator of `seed`); judge and the pixel recipes draw training noise
  from `seed + 1` and held-out noise from `seed + 2`; clip's hard negatives and
  their captions come from `random.Random(seed)`;
- the scenes: Shapes' own seed, which selects the family of scenes, is
  `scenes_seed(recipe, seed, part)`: the run's seed or the course's dataset
  (COURSE_SCENES), per recipe and for its training and its evaluation scenes as
  SCENES_FOLLOW_SEED lists. With `--seed 0`, as for every bundled checkpoint, both
  are the same scenes; the table keeps what each recipe drew when it made its
  bundled checkpoint.

Processes: under `accelerate launch` every process runs the recipe (`fit` splits
the training between them; each draws its own noise, `sdscratch.train.rank_generator`)
and the first one writes the checkpoint; a single process draws what it always drew.

Manifest: every recipe's MANIFEST.json has the keys MANIFEST_KEYS; a recipe returns
only its `quality`, `run_recipe` measures and writes the rest.

Resuming: a recipe with a `checkpoint` argument passes `saving(checkpoint)` and the
generators it draws from to `fit`, which saves the run every CHECKPOINT_EVERY steps
into `<out>.checkpoint/` (beside the output folder, with RUN_FILE saying which
command made it). A stopped run goes on from there with `--resume`, to the same
weights, bit for bit, as a run never stopped; a finished run deletes the folder.
"""

import contextlib
import functools
import inspect
import itertools
import json
import os
import shlex
import shutil
import tempfile
import time
from pathlib import Path

import torch

from sdscratch.checkpoint import write_manifest
from sdscratch.shards import ShardStream
from sdscratch.train import processes

RECIPES = {}  # name -> (fn(out, seed, steps) -> quality dict, default folder name)
CHECKPOINT_EVERY = 100  # steps between the resumable checkpoints of a run
RUN_FILE = "run.json"  # in a run's checkpoint folder: its recipe and command
TRAINED = Path("trained")  # where `train` writes by default: trained/<folder>

# Every recipe runs on one torch thread. On the shared 2-core machine a second thread
# mostly spins waiting for the first (vae: 0.6 CPU s and 1.6 s wall per step on one
# thread, 5.7 CPU s and 17 s wall on two; pixel: 0.6 against 4.5 CPU s), and threads
# split sums differently: the bundled checkpoints were made on one thread, and only
# one thread reproduces them bit for bit.
RECIPE_THREADS = 1

COURSE_SCENES = 0  # Shapes' seed of the course's dataset (lessons, bundled models)
# recipe -> (do its training scenes follow the run's seed, do its evaluation scenes);
# those that do not draw COURSE_SCENES whatever the run's seed.
SCENES_FOLLOW_SEED = {
    "judge": (True, True),
    "vae": (False, False),
    "clip": (False, False),
    "pixel-uncond": (True, True),
    "pixel-text": (True, True),
    "ldm": (False, True),
    "controlnet": (False, True),
    "heart-lora": (True, False),
}

# The keys of every recipe's MANIFEST.json (tests/test_recipes.py checks the bundled).
MANIFEST_KEYS = (
    "command",  # the command line that made the checkpoint
    "seed",  # the run's seed
    "wall_time_seconds",  # the recipe's wall-clock time
    "cpu_seconds",  # CPU time of the process, summed over its threads
    "threads",  # torch threads it ran on
    "load_average_start",  # 1-minute load average before the run (None: not recorded)
    "load_average_end",  # and after it
    "machine",  # processor and number of cores
    "torch",  # torch version
    "created",  # when the manifest was written
    "sha256",  # relative path -> sha256 of every file of the checkpoint
    "quality",  # what the recipe measured: a dict of its own
)


def recipe(name, default_out=None):
    """Register `fn(out: Path, seed: int, steps: int | None) -> dict` as a recipe."""

    def register(fn):
        RECIPES[name] = (fn, default_out or name)
        return fn

    return register


@contextlib.contextmanager
def pinned_threads(threads=RECIPE_THREADS):
    """Run the body on `threads` torch threads, then restore the number it had."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def seeded(seed):
    """Draw the body's initial weights from `seed`, leaving the global generator as
    it was: `with seeded(seed): model = UNet(config)`."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        yield


def scenes_seed(name, seed, part="train") -> int:
    """The Shapes seed of the scenes recipe `name` draws for `part` ("train" or
    "eval") in a run with `seed`: see SCENES_FOLLOW_SEED."""
    follows = SCENES_FOLLOW_SEED[name][("train", "eval").index(part)]
    return seed if follows else COURSE_SCENES


def saving(checkpoint) -> dict:
    """`fit`'s keyword arguments that save the run into the folder `checkpoint`
    every CHECKPOINT_EVERY steps and resume from it (none if it is None)."""
    if checkpoint is None:
        return {}
    return {"checkpoint": checkpoint, "checkpoint_every": CHECKPOINT_EVERY}


def run_recipe(
    name,
    out=None,
    seed=0,
    steps=None,
    force=False,
    shards=None,
    resume=None,
    options=None,
) -> dict:
    """Run a registered recipe, then write MANIFEST.json; return the manifest.

    The recipe writes into a new hidden folder beside `out`, which takes its place
    only when the run has finished: an interrupted or failed run leaves `out` as it
    was. A bundled checkpoint is replaced only if `out` names it and `force` is set.

    Args:
        name: the recipe's name, as in `python -m sdscratch train NAME`.
        out: output folder (default: trained/<the recipe's folder>, in the current
            folder); it must not exist, or be empty, unless `force`.
        seed: seeds every random draw of the recipe.
        steps: override the recipe's number of steps (short runs, tests).
        force: replace `out` if it holds anything.
        shards: a folder of tar shards to stream the training images from
            (recipes with a `shards` argument: vae, ldm, pixel-uncond, pixel-text).
        resume: a stopped run's checkpoint folder (or a file in it) to go on
            from; the run's options must be those it was started with.
        options: {argument: value} of the recipe's own (controlnet: base,
            control, connections); None values are left to the recipe.
    """
    if name not in RECIPES:
        raise ValueError(f"Unknown recipe {name!r}; choose one of {sorted(RECIPES)}.")
    fn, default_out = RECIPES[name]
    options = {key: value for key, value in (options or {}).items()
               if value is not None}  # fmt: skip
    for key in options:
        if key not in inspect.signature(fn).parameters:
            raise ValueError(f"The {name} recipe takes no --{key}.")
    fn = functools.partial(fn, **options)
    command = ["python", "-m", "sdscratch", "train", name, "--seed", str(seed)]
    command += ["--steps", str(steps)] if steps is not None else []
    command += ["--out", str(out)] if out else []
    command += ["--shards", str(shards)] if shards is not None else []
    for key, value in options.items():
        command += [f"--{key}", str(value)]
    command = shlex.join(command)
    out = Path(out) if out else TRAINED / default_out
    _check_out(out, force)
    fn, saved = _with_options(fn, name, shards, out, resume, command)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        seconds, quality, measured = _measured(fn, staging, seed, steps)
        manifest = write_manifest(staging, command, seed, seconds, quality, **measured)
    except BaseException:  # also Ctrl-C: no half-made checkpoint stays behind
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if processes().is_main_process:
        _move_into_place(staging, out, force)
        if saved is not None:  # the run is done: its checkpoint is not needed
            shutil.rmtree(saved, ignore_errors=True)
    else:  # under `accelerate launch`, the first process writes the checkpoint
        shutil.rmtree(staging)
    return manifest


def _with_options(fn, name, shards, out, resume, command):
    """The recipe with its `shards` and `checkpoint` arguments filled in, and the
    folder its run saves into (None for a recipe that cannot resume)."""
    parameters = inspect.signature(fn).parameters
    if shards is not None:
        if "shards" not in parameters:
            raise ValueError(f"The {name} recipe cannot train on shards.")
        fn = functools.partial(fn, shards=shards)
    if "checkpoint" not in parameters:
        if resume is not None:
            raise ValueError(f"The {name} recipe cannot resume a stopped run.")
        return fn, None
    if resume is not None:
        folder = resumed_folder(resume, name, command)
    else:
        folder = out.parent / f"{out.name}.checkpoint"
        if (folder / RUN_FILE).exists():
            raise ValueError(
                f"{folder} holds a stopped run: go on with --resume {folder}, or "
                "delete it to start again."
            )
    state = processes()
    state.wait_for_everyone()  # every process has looked before one writes
    if state.is_main_process:
        folder.mkdir(parents=True, exist_ok=True)
        record = {"recipe": name, "command": command}
        (folder / RUN_FILE).write_text(json.dumps(record, indent=2) + "\n")
        print(f"saving the run every {CHECKPOINT_EVERY} steps in {folder}; if it "
              f"stops, go on with --resume {folder}")  # fmt: skip
    return functools.partial(fn, checkpoint=folder), folder


def resumed_folder(resume, name, command) -> Path:
    """The checkpoint folder `resume` names (the folder, or a file in it), checked:
    saved by a run of recipe `name` with the same `command`."""
    path = Path(resume)
    if not path.exists():
        raise ValueError(f"--resume {path}: no such checkpoint folder or file.")
    folder = path if path.is_dir() else path.parent
    try:
        saved = json.loads((folder / RUN_FILE).read_text())
        recipe, saved_command = saved["recipe"], saved["command"]
    except (OSError, ValueError, KeyError, TypeError):
        raise ValueError(
            f"{path} is not the checkpoint of a `sdscratch train` run (its "
            f"{RUN_FILE} is missing or unreadable)."
        ) from None
    if recipe != name:
        raise ValueError(
            f"{path} is a checkpoint of the {recipe} recipe, not of {name}: "
            f"`{saved_command} --resume {folder}` goes on with it."
        )
    if saved_command != command:
        raise ValueError(
            f"{path} was saved by `{saved_command}`: resume it with the same options."
        )
    return folder


def _measured(fn, out, seed, steps) -> tuple[float, dict, dict]:
    """Run recipe `fn` on RECIPE_THREADS threads; return its wall time, its quality
    and what the manifest records of the run (CPU time, threads, load)."""
    load_start, cpu_start = os.getloadavg()[0], time.process_time()
    start = time.perf_counter()
    with pinned_threads():
        quality = fn(out, seed, steps)
    seconds = time.perf_counter() - start
    measured = {
        "cpu_seconds": round(time.process_time() - cpu_start),  # summed over threads
        "threads": RECIPE_THREADS,
        "load_average_start": round(load_start, 2),
        "load_average_end": round(os.getloadavg()[0], 2),
    }
    return seconds, quality, measured


def _check_out(out: Path, force: bool):
    """Refuse an output that is a file, or a folder with something in it (unless
    `force`): `train` never mixes a new checkpoint into an old one."""
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise ValueError(f"Cannot train into {out}: it is not a folder.")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ValueError(
            f"{out} holds files already; pass --force to replace it, or choose "
            "another --out."
        )


def _move_into_place(staging: Path, out: Path, force: bool):
    """Rename the finished `staging` folder to `out`; with `force`, the old `out`
    is removed only once the new one is in place."""
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()  # an empty folder holds nothing to lose
    if not out.exists():
        with contextlib.suppress(OSError):  # a folder that appeared meanwhile
            staging.rename(out)
            return
    if not force:
        raise ValueError(
            f"{out} appeared while training, so the new checkpoint stays in {staging}."
        )
    old = out.parent / f".{out.name}.old"
    shutil.rmtree(old, ignore_errors=True)
    out.rename(old)
    staging.rename(out)
    shutil.rmtree(old)


def shard_batches(shards, count, batch_size, seed, size=32):
    """Batches of (images (B, 3, size, size), captions) streamed from the tar shards
    in `shards` (`sdscratch.shards.ShardStream`), enough to hold `count` images,
    and the stream (its `report()` says what it skipped).

    The recipes that render their Shapes scenes once, before training (ldm, pixel),
    read this many images once from the shards instead.
    """
    stream = ShardStream(shards, batch_size, size=size, seed=seed)
    return itertools.islice(stream, -(-count // batch_size)), stream


def mean_of_last(losses, n) -> float:
    """The mean of the last n losses (all of them if fewer)."""
    return sum(losses[-n:]) / len(losses[-n:])
