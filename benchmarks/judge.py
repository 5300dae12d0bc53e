"""The bundled judge's held-out accuracy, and the real-vs-real FID floor by N.

    python benchmarks/judge.py [--repeats 4]

1. Accuracy of `assets/models/shapes-judge` on the 10,000 test scenes (which it
   never saw in training), per attribute and whole scene, on the real images and on
   mildly degraded copies (`sdscratch.shapes.judge.degrade`: blur, colour shift, noise).
2. FID between two disjoint sets of N real images, at N = 256, 512, 1,024, 2,048:
   what a perfect generator scores, the floor any model's FID must be read against.
   The first pair is `fid_floor(N)` = FID(test[:N], val[:N]), the one `evaluate`
   reports; the other pairs (test and val scenes k·N … (k+1)·N − 1) show its spread.
"""

import argparse
import math
import statistics
import time

import torch
from _machine import machine  # benchmarks/_machine.py, beside this script

from sdscratch.metrics import frechet_distance
from sdscratch.shapes.evaluate import fid_floor, real_features, real_images
from sdscratch.shapes.judge import attribute_accuracy, bundled_judge, degrade

SIZES = (256, 512, 1024, 2048)


def show(name: str, accuracy: dict):
    cells = "  ".join(f"{key} {100 * value:6.2f} %" for key, value in accuracy.items())
    print(f"{name:10s} {cells}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=4, help="disjoint pairs per N")
    args = parser.parse_args()
    if not 2 <= args.repeats <= 10_000 // max(SIZES):
        parser.error(f"--repeats must be 2 … {10_000 // max(SIZES)}")
    print(f"machine: {machine()}")
    judge = bundled_judge()

    start = time.perf_counter()
    images, _, scenes = real_images(10_000, "test")
    print("judge accuracy on the 10,000 test scenes (held out)")
    show("real", attribute_accuracy(images, scenes, judge))
    degraded = degrade(images, torch.Generator().manual_seed(0))
    show("degraded", attribute_accuracy(degraded, scenes, judge))
    print(f"({time.perf_counter() - start:.1f} s)")

    start = time.perf_counter()
    most = max(SIZES) * args.repeats
    test, val = real_features(most, "test"), real_features(most, "val")
    print(f"real-vs-real FID floor (features of {most:,} test and val scenes)")
    print("     N   fid_floor(N)   mean ± std over disjoint pairs")
    for n in SIZES:
        pairs = [
            frechet_distance(test[k * n : (k + 1) * n], val[k * n : (k + 1) * n])
            for k in range(args.repeats)
        ]
        assert math.isclose(pairs[0], fid_floor(n, judge), rel_tol=1e-4)
        spread = f"{statistics.mean(pairs):7.2f} ± {statistics.stdev(pairs):5.2f}"
        print(f"{n:6d}   {pairs[0]:12.2f}   {spread} ({args.repeats} pairs)")
    print(f"({time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
    main()
