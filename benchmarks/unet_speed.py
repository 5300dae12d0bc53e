"""Is sdscratch's UNet as fast as diffusers' on the CPU? Same config, same weights.

Usage: python benchmarks/unet_speed.py [--rounds 30]

For each config, ports a random diffusers `UNet2DConditionModel` into sdscratch,
checks the outputs agree, then times forward passes (no_grad, fp32), alternating the
two models round by round (and which goes first) so that both see the same machine
load. Prints the median times and the ratio sdscratch / diffusers (target ≤ 1.05).
Take figures under the CPU lock: `flock /tmp/sdscratch-cpu.lock python ...`.
"""

import argparse
import os
import statistics
import time

import torch
from _machine import machine  # benchmarks/_machine.py, beside this script
from diffusers import UNet2DConditionModel

from sdscratch.port import unet_from_diffusers

CONFIGS = {
    # like the bundled pixel models: 32×32 pixels, attention at the lowest level
    "tiny (32, 64), 32×32×3, batch 16": (
        dict(
            in_channels=3,
            out_channels=3,
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=64,
            attention_head_dim=4,
            norm_num_groups=16,
        ),
        (16, 3, 32, 32),
    ),
    # SD v1's layout at 1/5 of its width, on 32×32×4 latents
    "mid (64, 128, 256, 256), 32×32×4, batch 2": (
        dict(
            in_channels=4,
            out_channels=4,
            block_out_channels=(64, 128, 256, 256),
            layers_per_block=2,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            cross_attention_dim=256,
            attention_head_dim=8,
            norm_num_groups=32,
        ),
        (2, 4, 32, 32),
    ),
}


def seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


@torch.no_grad()
def compare(config, shape, rounds, warmup=3):
    torch.manual_seed(0)
    reference = UNet2DConditionModel(**config).eval()
    ours = unet_from_diffusers(reference)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g)
    t = torch.full((shape[0],), 500)
    context = torch.randn(shape[0], 77, config["cross_attention_dim"], generator=g)

    def run_reference():
        return reference(x, t, encoder_hidden_states=context).sample

    def run_ours():
        return ours(x, t, context)

    error = (run_ours() - run_reference()).abs().max().item()
    for _ in range(warmup):
        run_reference(), run_ours()
    times = {"diffusers": [], "sdscratch": []}
    for i in range(rounds):
        pair = [("diffusers", run_reference), ("sdscratch", run_ours)]
        for name, fn in pair if i % 2 == 0 else pair[::-1]:
            times[name].append(seconds(fn))
    medians = {name: statistics.median(ts) for name, ts in times.items()}
    return medians, error


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    print(f"machine: {machine()}")
    print(f"load average before: {os.getloadavg()[0]:.2f}")
    for name, (config, shape) in CONFIGS.items():
        medians, error = compare(config, shape, args.rounds)
        ratio = medians["sdscratch"] / medians["diffusers"]
        print(
            f"{name}: diffusers {medians['diffusers'] * 1000:.1f} ms, "
            f"sdscratch {medians['sdscratch'] * 1000:.1f} ms, "
            f"ratio {ratio:.3f} (target <= 1.05); max abs diff {error:.1e}"
        )
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
