"""How long every bundled recipe takes, and their sum against the 60-minute budget.

    python benchmarks/recipe_times.py             # the times in the bundled manifests
    python benchmarks/recipe_times.py --rerun DIR # run every recipe again, into DIR
    python benchmarks/recipe_times.py --rerun DIR --steps 2  # quick: do they all run?

Without --rerun, reads each `assets/models/*/MANIFEST.json`: the wall-clock time the
recipe took when it made the bundled checkpoint, its CPU seconds and the load
average it recorded. With --rerun, runs every recipe one after another (in the
order a learner would: parts first, the latent model last) into DIR/<folder>, times
each (wall clock, CPU seconds of this process and its threads, load average before
and after) and says whether each weight file came out bit-identical to the bundled
one. Run it on an otherwise idle machine: other processes' load lengthens the wall
times.
"""

import argparse
import json
import os
import time
from pathlib import Path

from _machine import machine  # benchmarks/_machine.py, beside this script

from sdscratch import assets_dir
from sdscratch.recipes import RECIPES, run_recipe

BUDGET_MINUTES = 60
ORDER = ("clip", "vae", "judge", "pixel-uncond", "pixel-text", "ldm")


def bundled_times() -> list[dict]:
    """One row per bundled checkpoint, from its manifest."""
    rows = []
    for name in ORDER:
        manifest = assets_dir() / "models" / RECIPES[name][1] / "MANIFEST.json"
        if not manifest.exists():
            rows.append({"recipe": name, "note": "no bundled checkpoint"})
            continue
        made = json.loads(manifest.read_text())
        loads = [made["load_average_start"], made["load_average_end"]]
        rows.append({
            "recipe": name,
            "wall": made["wall_time_seconds"],
            "cpu": made["cpu_seconds"],
            "load": [round(v, 1) for v in loads if v is not None],
            "note": made["created"],
        })  # fmt: skip
    return rows


def rerun_times(folder: Path, steps=None) -> list[dict]:
    """Run every recipe into folder/<its folder name>; one timed row each.
    steps: None for the recipes as they are, or a few for a quick check."""
    rows = []
    for name in ORDER:
        out = folder / RECIPES[name][1]
        load, cpu, start = os.getloadavg()[0], time.process_time(), time.perf_counter()
        made = run_recipe(name, out=out, steps=steps)
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu
        rows.append({
            "recipe": name,
            "wall": wall,
            "cpu": cpu,
            "load": [load, os.getloadavg()[0]],
            "note": _same_weights(made, RECIPES[name][1]),
        })  # fmt: skip
    return rows


def _same_weights(made: dict, folder: str) -> str:
    """Whether the fresh weight files equal the bundled ones, byte for byte."""
    bundled = assets_dir() / "models" / folder / "MANIFEST.json"
    if not bundled.exists():
        return "nothing bundled to compare"
    old = json.loads(bundled.read_text())["sha256"]
    weights = [path for path in made["sha256"] if path.endswith(".safetensors")]
    same = [path for path in weights if old.get(path) == made["sha256"][path]]
    return f"{len(same)}/{len(weights)} weight files identical to the bundled ones"


def report(rows: list[dict]) -> None:
    print(f"{'recipe':14s}{'wall s':>9s}{'CPU s':>9s}  load average   note")
    for row in rows:
        if "wall" not in row:
            print(f"{row['recipe']:14s}{'':>9s}{'':>9s}  {'':14s} {row['note']}")
            continue
        cpu = f"{row['cpu']:9.0f}" if row["cpu"] is not None else f"{'?':>9s}"
        load = "–".join(f"{v:.1f}" for v in row["load"]) or "?"
        print(f"{row['recipe']:14s}{row['wall']:9.0f}{cpu}  {load:14s} {row['note']}")
    timed = [row for row in rows if "wall" in row]
    wall = sum(row["wall"] for row in timed)
    cpu = sum(row["cpu"] or 0 for row in timed)
    verdict = "within" if wall <= 60 * BUDGET_MINUTES else "OVER"
    print(
        f"all {len(timed)} recipes: {wall / 60:.1f} min wall ({verdict} the "
        f"{BUDGET_MINUTES}-minute budget), {cpu / 60:.1f} CPU min"
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rerun", type=Path, metavar="DIR", help="retrain into DIR")
    parser.add_argument("--steps", type=int, help="with --rerun: steps per recipe")
    args = parser.parse_args()
    if args.steps is not None and not args.rerun:
        parser.error("--steps only goes with --rerun")
    print(f"machine: {machine()}")
    rows = rerun_times(args.rerun, args.steps) if args.rerun else bundled_times()
    report(rows)


if __name__ == "__main__":
    main()
