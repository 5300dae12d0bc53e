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
