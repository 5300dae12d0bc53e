"""Why pixel-uncond diffuses pixels × 5: one UNet, data and steps, unscaled and scaled.

    python benchmarks/pixel_scale.py [--steps 450] [--scales 1 5]

Shapes pixels are mostly flat grey: their standard deviation is about 0.19, where
Stable Diffusion's noise schedule was made for data of about unit variance (SD
scales its latents by 0.18215 for that reason). Unscaled, every noisy image is
(1/0.19)² ≈ 28 times fainter against the noise than the schedule assumes, so most
training timesteps show the network little but noise. For each scale, the
pixel-uncond recipe's UNet, data, optimiser and seed (`sdscratch.recipes.pixel`)
train `--steps` steps on pixels × scale; its 64 DDIM samples (25 steps), divided by
the scale, are scored as the recipe scores them: the share of solid-colour pixels
(real scenes: 0.97) and FID on the judge's features against the real-vs-real floor.
One thread.
"""

import argparse
import time

import torch
from _machine import machine  # benchmarks/_machine.py, beside this script

from sdscratch.recipes.common import scenes_seed, seeded
from sdscratch.recipes.pixel import (
    PIXEL_BATCH,
    PIXEL_SCENES,
    _pixel_quality,
    _train_pixel_unet,
    _training_scenes,
    pixel_unet_config,
)
from sdscratch.schedules import NoiseSchedule
from sdscratch.unet import UNet


def run(images, steps, scale, seed=0) -> dict:
    """Train on images × scale; the recipe's figures of its samples, and CPU s."""
    schedule = NoiseSchedule.scaled_linear()
    with seeded(seed):
        unet = UNet(pixel_unet_config())
    start = time.process_time()
    ema, _ = _train_pixel_unet(unet, schedule, images * scale, None, steps, seed)
    seconds = time.process_time() - start
    val_seed = scenes_seed("pixel-uncond", seed, "eval")
    quality, _ = _pixel_quality(ema, schedule, seed, val_seed, ema, scale=scale)
    return quality | {"train_cpu_seconds": round(seconds)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=450, help="training steps each")
    parser.add_argument("--scales", type=float, nargs="+", default=[1.0, 5.0])
    args = parser.parse_args()
    torch.set_num_threads(1)
    count = min(PIXEL_SCENES, PIXEL_BATCH * args.steps)
    images = _training_scenes("pixel-uncond", count, 0)[0]  # (N, 3, 32, 32)
    print(machine())
    print(f"{count} training scenes: pixel std {images.std():.3f}, "
          f"mean {images.mean():.3f}; {args.steps} steps of {PIXEL_BATCH}")  # fmt: skip
    print(f"{'scale':>6} {'solid share':>12} {'FID (64)':>9} {'floor':>7} {'CPU s':>6}")
    for scale in args.scales:
        q = run(images, args.steps, scale)
        share, fid = q["solid_colour_share_samples"], q["fid_64_samples_judge_features"]
        floor, seconds = q["fid_64_real_vs_real_floor"], q["train_cpu_seconds"]
        print(f"{scale:6g} {share:12.3f} {fid:9.1f} {floor:7.1f} {seconds:6d}")


if __name__ == "__main__":
    main()
