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
"""

import contextlib
import functools
import inspect
import os
import shlex
import shutil
import tempfile
import time
from pathlib import Path

import torch

from sdscratch.checkpoint import write_manifest
from sdscratch.shapes.data import Shapes
from sdscratch.train import processes

RECIPES = {}  # name -> (fn(out, seed, steps) -> quality dict, default folder name)
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


def first_scenes(split, n, seed=COURSE_SCENES) -> tuple[torch.Tensor, list, list]:
    """The first n scenes of a split: images (n, 3, 32, 32), captions, attrs."""
    return Shapes(split, seed=seed, length=n).batch(range(n))


def run_recipe(
    name, out=None, seed=0, steps=None, force=False, shards=None, options=None
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
            (recipes with a `shards` argument: vae).
        options: {argument: value} of the recipe's own (controlnet: base,
            control, connections); None values are left to the recipe.
    """
    if name not in RECIPES:
        raise ValueError(f"Unknown recipe {name!r}; choose one of {sorted(RECIPES)}.")
    fn, default_out = RECIPES[name]
    if shards is not None:
        if "shards" not in inspect.signature(fn).parameters:
            raise ValueError(f"The {name} recipe cannot train on shards.")
        fn = functools.partial(fn, shards=shards)
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
    out = Path(out) if out else TRAINED / default_out
    _check_out(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        seconds, quality, measured = _measured(fn, staging, seed, steps)
        command = shlex.join(command)
        manifest = write_manifest(staging, command, seed, seconds, quality, **measured)
    except BaseException:  # also Ctrl-C: no half-made checkpoint stays behind
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if processes().is_main_process:
        _move_into_place(staging, out, force)
    else:  # under `accelerate launch`, the first process writes the checkpoint
        shutil.rmtree(staging)
    return manifest


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


def mean_of_last(losses, n) -> float:
    """The mean of the last n losses (all of them if fewer)."""
    return sum(losses[-n:]) / len(losses[-n:])
