"""How many Shapes images per second one CPU core makes (target: 2,000 at 32x32).

    python benchmarks/shapes_speed.py [--seconds 3]

Measures three ways of getting images, each on one thread after a warm-up:
`ds[i]` one at a time, a DataLoader with batch_size=256 and `collate` (which renders
each batch at once through `Shapes.__getitems__`), and `Shapes.batch`. Prints the
machine and its load, since other processes on a shared machine slow it down.
"""

import argparse
import time

import torch
from _machine import machine  # benchmarks/_machine.py, beside this script

from sdscratch.shapes.data import Shapes, collate

TARGET = 2000  # images per second at 32x32, one core


def rate(fetch, seconds) -> tuple[float, float]:
    """Images per wall-clock second and per CPU second of `fetch(start) -> count`.

    On an idle machine the two agree; when other processes compete for the cores,
    images per CPU second still say what one core of our own would do.
    """
    fetch(0)  # warm-up
    done, wall, cpu = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - wall < seconds:
        done += fetch(done)
    return done / (time.perf_counter() - wall), done / (time.process_time() - cpu)


def one_by_one(ds):
    def fetch(start):
        for i in range(start, start + 64):
            ds[i % len(ds)]
        return 64

    return fetch


def dataloader(ds, batch_size=256):
    loader = torch.utils.data.DataLoader(
        ds, batch_size=batch_size, shuffle=True, collate_fn=collate
    )
    batches = iter(loader)

    def fetch(start):
        nonlocal batches
        try:
            images, _, _ = next(batches)
        except StopIteration:
            batches = iter(loader)
            images, _, _ = next(batches)
        return len(images)

    return fetch


def batched(ds, batch_size=256):
    def fetch(start):
        indices = [(start + i) % len(ds) for i in range(batch_size)]
        return len(ds.batch(indices)[0])

    return fetch


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="per measurement")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"machine: {machine()}")
    print("one thread (torch.set_num_threads(1)), DataLoader without workers")
    print(f"{'':56s} {'images/s':>9s} {'per CPU s':>10s}")
    results = {}
    for size in (32, 64):
        ds = Shapes("train", size=size)
        for name, fetch in [
            ("ds[i], one at a time", one_by_one(ds)),
            ("DataLoader(batch_size=256, collate_fn=collate)", dataloader(ds)),
            ("Shapes.batch(256 indices)", batched(ds)),
        ]:
            wall, cpu = results[size, name] = rate(fetch, args.seconds)
            print(f"{size}x{size}  {name:48s} {wall:9,.0f} {cpu:10,.0f}")
    for (size, name), (wall, cpu) in results.items():
        if size == 32 and not name.startswith("Shapes.batch"):
            verdict = "meets" if wall >= TARGET else "misses"
            print(f"32x32 {name}: {verdict} the target of {TARGET:,} images/s")


if __name__ == "__main__":
    main()
