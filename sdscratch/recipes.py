"""The recipes that made every checkpoint in assets/models/.

A recipe is a function registered with `@recipe("name")`; `python -m sdscratch train
NAME` runs it, times it and writes the checkpoint's MANIFEST.json (command, seed, wall
time, sha256 of every file, measured quality). A recipe takes `(out, seed, steps)`:
the folder to write, the seed for every random draw, and an optional override of its
number of training steps (for short runs and tests); it returns the quality it
measured, as a dict. Together the recipes run in 60 minutes or less on a 2-core CPU.
"""

import shlex
import time
from pathlib import Path

from sdscratch import assets_dir
from sdscratch.checkpoint import write_manifest

RECIPES = {}


def recipe(name, default_out=None):
    """Register `fn(out: Path, seed: int, steps: int | None) -> dict` as a recipe."""

    def register(fn):
        RECIPES[name] = (fn, default_out or name)
        return fn

    return register


def run_recipe(name, out=None, seed=0, steps=None) -> dict:
    """Run a registered recipe, then write MANIFEST.json; return the manifest.

    Args:
        name: the recipe's name, as in `python -m sdscratch train NAME`.
        out: output folder (default: assets/models/<the recipe's folder>).
        seed: seeds every random draw of the recipe.
        steps: override the recipe's number of steps (short runs, tests).
    """
    if name not in RECIPES:
        raise ValueError(f"Unknown recipe {name!r}; choose one of {sorted(RECIPES)}.")
    fn, default_out = RECIPES[name]
    command = ["python", "-m", "sdscratch", "train", name, "--seed", str(seed)]
    command += ["--steps", str(steps)] if steps is not None else []
    command += ["--out", str(out)] if out else []
    out = Path(out) if out else assets_dir() / "models" / default_out
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    quality = fn(out, seed, steps)
    seconds = time.perf_counter() - start
    return write_manifest(out, shlex.join(command), seed, seconds, quality)


# ----------------------------------------------------------------------------------
# judge: the attribute classifier that scores generated images (sdscratch.metrics).
# Trained on real Shapes images, each mildly degraded (blur, colour shift, noise) so
# that it stays fair to generated ones; checked on test scenes, which it never saw.

JUDGE_STEPS, JUDGE_BATCH, JUDGE_LR = 600, 128, 3e-3
JUDGE_HELDOUT = 10_000  # test scenes the accuracy is measured on


@recipe("judge", default_out="shapes-judge")
def train_judge(out, seed, steps):
    import time

    import torch

    from sdscratch.checkpoint import save_component
    from sdscratch.data import Shapes, collate
    from sdscratch.metrics import (
        Judge,
        JudgeConfig,
        attribute_accuracy,
        degrade,
        judge_loss,
        real_images,
    )
    from sdscratch.train import fit

    cpu_start, config = time.process_time(), JudgeConfig()
    with torch.random.fork_rng():  # the initial weights, from the seed
        torch.manual_seed(seed)
        judge = Judge(config)
    loader = torch.utils.data.DataLoader(
        Shapes("train", seed=seed),
        batch_size=JUDGE_BATCH,
        shuffle=True,
        collate_fn=collate,
        generator=torch.Generator().manual_seed(seed),
    )
    noise = torch.Generator().manual_seed(seed + 1)

    def loss_fn(model, batch):
        images, _, scenes = batch
        return judge_loss(model, degrade(images, noise), scenes)

    steps = steps or JUDGE_STEPS
    losses = fit(judge, loss_fn, loader, steps, lr=JUDGE_LR, warmup=50, desc="judge")
    save_component(judge, out / "judge", config)
    images, _, scenes = real_images(JUDGE_HELDOUT, "test", seed=seed)
    degraded = degrade(images, torch.Generator().manual_seed(seed + 2))
    accuracy = _rounded(attribute_accuracy(images, scenes, judge))
    accuracy_degraded = _rounded(attribute_accuracy(degraded, scenes, judge))
    return {
        "steps": steps,
        "cpu_seconds": round(time.process_time() - cpu_start),  # summed over threads
        "final_loss": round(sum(losses[-20:]) / len(losses[-20:]), 5),
        "parameters": sum(p.numel() for p in judge.parameters()),
        "heldout": f"the first {JUDGE_HELDOUT:,} scenes of the test split",
        "heldout_accuracy": accuracy,
        "heldout_accuracy_degraded": accuracy_degraded,
    }


def _rounded(values: dict, digits=4) -> dict:
    return {key: round(value, digits) for key, value in values.items()}
