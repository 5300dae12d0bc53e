"""Samplers on the bundled pixel model: time per step, difference from diffusers.

    python benchmarks/samplers.py [--model shapes-pixel-uncond] [--steps 20]
                                  [--batch 16] [--rounds 3]

For every sampler of `sdscratch.samplers` (and Karras σ's where it walks σ's):
1. Time per step of `sample()` driving the bundled unconditional pixel UNet
   (assets/models/shapes-pixel-uncond, fp32, no_grad) on a batch of 32×32 noise,
   next to the diffusers pipeline loop with the matching scheduler driving the same
   UNet, and the sampler's own arithmetic (`sample()` with a free stand-in model).
   Medians over rounds; the two loops alternate, so that both see the same load.
2. The largest absolute difference between `sample()` and that diffusers loop: on
   the UNet (same noise, same generator seed), and over the equivalence tests' grid
   (steps 1, 2, 7, 20, 50 × three β schedules, their stand-in model).
The reference schedulers and loop are those of tests/test_samplers.py, imported
from there. Take figures under the CPU lock: `flock /tmp/sdscratch-cpu.lock ...`.
"""

import argparse
import importlib.util
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from _machine import machine  # benchmarks/_machine.py, beside this script

from sdscratch.checkpoint import CheckpointError, load_component, resolve, verify
from sdscratch.samplers import sample
from sdscratch.schedules import NoiseSchedule
from sdscratch.unet import UNet, UNetConfig

ROOT = Path(__file__).resolve().parent.parent


def equivalence_tests():
    """tests/test_samplers.py as a module: its reference schedulers, loop and cases."""
    path = ROOT / "tests" / "test_samplers.py"
    spec = importlib.util.spec_from_file_location("test_samplers", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_unet(name):
    """The checkpoint's unet/, checked against its manifest; exits if it is missing."""
    try:
        root = resolve(name)
        verify(root, components=["unet"])
        return load_component(root / "unet", UNet, UNetConfig)
    except CheckpointError as error:
        print(
            f"{error} This benchmark needs the bundled unconditional pixel model: "
            "make it with `python -m sdscratch train pixel-uncond`, or pass "
            "--model PATH to a folder made with `--out PATH`.",
            file=sys.stderr,
        )
        sys.exit(2)


def seconds(fn) -> tuple[float, float]:
    """(wall-clock, CPU) seconds that fn() takes; CPU time is less hurt by load."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def diffusers_run(tests, case, steps, schedule, eps_fn, noise, seed):
    """The diffusers pipeline loop with the matching scheduler, as the tests run it."""
    sampler, karras, eta = case
    scheduler = tests.reference(sampler, schedule, karras)
    tests.set_timesteps(scheduler, sampler, steps, schedule, karras)
    generator = torch.Generator().manual_seed(seed)
    return tests.diffusers_loop(scheduler, eps_fn, noise, eta, generator)


def ours_run(case, steps, schedule, eps_fn, noise, seed):
    sampler, karras, eta = case
    generator = torch.Generator().manual_seed(seed)
    return sample(eps_fn, noise, sampler, steps, schedule, karras, eta, generator)


@torch.no_grad()
def on_the_unet(tests, case, unet, steps, batch, rounds):
    """(ms per step: ours, diffusers, ours with a free model; max abs difference)."""
    schedule = NoiseSchedule.scaled_linear()  # the pixel model's
    shape = (batch, unet.config.in_channels, 32, 32)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(0))

    def eps_fn(x, t):
        return unet(x, t)

    ours = ours_run(case, steps, schedule, eps_fn, noise, 1)  # also a warm-up
    error = ours - diffusers_run(tests, case, steps, schedule, eps_fn, noise, 1)
    times = {"ours": [], "diffusers": []}
    runs = {
        "ours": lambda: ours_run(case, steps, schedule, eps_fn, noise, 1),
        "diffusers": lambda: diffusers_run(
            tests, case, steps, schedule, eps_fn, noise, 1
        ),
    }
    for i in range(rounds):
        for name in list(runs) if i % 2 == 0 else list(runs)[::-1]:
            times[name].append(seconds(runs[name]))
    eps = torch.randn(shape, generator=torch.Generator().manual_seed(2)) * 0.1
    times["own"] = [
        seconds(lambda: ours_run(case, steps, schedule, lambda x, t: eps, noise, 1))
        for _ in range(rounds)
    ]
    per_step = {  # ms per step: (wall, CPU), medians over the rounds
        name: tuple(1000 * statistics.median(t[k] for t in ts) / steps for k in (0, 1))
        for name, ts in times.items()
    }
    return per_step, error.abs().max().item()


def on_the_test_grid(tests, case) -> float:
    """The largest max-abs difference over the tests' steps × schedules grid."""
    largest = 0.0
    shape = (2, 3, 8, 8)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    for schedule_name in tests.SCHEDULES:
        schedule = NoiseSchedule.from_name(schedule_name)
        eps_fn = tests.make_eps_fn(schedule, shape)
        for steps in tests.STEPS:
            try:
                expected = diffusers_run(
                    tests, case, steps, schedule, eps_fn, noise, 42
                )
            except IndexError:  # the one case diffusers fails on (see the tests)
                continue
            ours = ours_run(case, steps, schedule, eps_fn, noise, 42)
            largest = max(largest, (ours - expected).abs().max().item())
    return largest


def cell(wall, cpu, width=6, digits=1) -> str:
    return f"{wall:{width}.{digits}f} ({cpu:{width}.{digits}f})"


def name_of(case) -> str:
    sampler, karras, eta = case
    extras = [" karras" if karras else "", f" eta={eta:g}" if eta else ""]
    return sampler + "".join(extras)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="shapes-pixel-uncond", help="name or path")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    unet = load_unet(args.model)
    tests = equivalence_tests()
    params = sum(p.numel() for p in unet.parameters())
    print(f"machine: {machine()}")
    print(f"load average before: {', '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(
        f"model: {args.model} ({params / 1e6:.2f} M parameters, fp32), batch "
        f"{args.batch} of 32×32, {args.steps} steps, median of {args.rounds} rounds"
    )
    print(
        "ms per step, wall-clock (CPU): sample() with the UNet, the diffusers loop "
        "with the UNet, sample()'s own arithmetic (a free stand-in model); max abs "
        "difference from diffusers: with the UNet, and over the tests' grid"
    )
    print(
        f"{'sampler':22s} {'sdscratch':>15s} {'diffusers':>15s} {'own':>11s}  "
        f"{'diff UNet':>9s} {'diff grid':>9s}"
    )
    start = time.perf_counter()
    for case in tests.CASES:
        per_step, error = on_the_unet(
            tests, case, unet, args.steps, args.batch, args.rounds
        )
        cells = [cell(*per_step["ours"]), cell(*per_step["diffusers"])]
        cells.append(cell(*per_step["own"], width=4, digits=2))
        grid = on_the_test_grid(tests, case)
        print(f"{name_of(case):22s} {' '.join(cells)}  {error:9.1e} {grid:9.1e}")
    print(f"({time.perf_counter() - start:.0f} s)")
    print(f"load average after: {', '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
