"""Why the pixel UNets diffuse scaled pixels: one UNet, data and steps, several scales.

    python benchmarks/pixel_scale.py [--model uncond|text] [--steps N] [--scales 1 5]

Shapes pixels are mostly flat grey: their standard deviation is about 0.19, where
Stable Diffusion's noise schedule was made for data of about unit variance (SD
scales its latents by 0.18215 for that reason). Unscaled, every noisy image is
(1/0.19)² ≈ 28 times fainter against the noise than the schedule assumes, so most
training timesteps show the network little but noise. For each scale, the
pixel-uncond recipe's UNet, data, optimiser and seed (`sdscratch.recipes.pixel`)
train `--steps` steps on pixels × scale; the 64 DDIM samples (25 steps) of its EMA
weights (in float32, where the recipe scores the stored float16 copy), divided by the
scale, are scored as the recipe scores them: the share of solid-colour pixels
(real scenes: 0.97) and FID on the judge's features against the real-vs-real floor.

`--model text` runs the pixel-text recipe itself (`sdscratch.recipes.pixel_text`,
default 1,400 steps) at each scale into a temporary folder and adds its prompt
accuracy (64 evaluation prompts, guidance 3). A larger scale also leaves more of the
image in the first noise of sampling (SD's schedule ends at √ᾱ_T = 0.068, so × 5
keeps 0.34 of it): the layout then follows the noise more and the prompt less.
One thread.
"""

import argparse
import tempfile
import time
from pathlib import Path

import torch
from _machine import machine  # benchmarks/_machine.py, beside this script

from sdscratch.recipes.common import scenes_seed, seeded
from sdscratch.recipes.pixel import (
    PIXEL_BATCH,
    PIXEL_SCENES,
    _pixel_quality,
    _train_pixel_unet,
    _training_scenes,
    pixel_text,
    pixel_unet_config,
)
from sdscratch.schedules import NoiseSchedule
from sdscratch.unet import UNet


def run(images, steps, scale, seed=0) -> dict:
    """Train the pixel-uncond UNet on images × scale.

    Args:
        images: (N, 3, 32, 32) training scenes in [-1, 1].
        steps, scale, seed: training steps, the data's scale, the run's seed.
    Returns:
        `_pixel_quality`'s figures of its samples, and "train_cpu_seconds".
    """
    schedule = NoiseSchedule.scaled_linear()
    with seeded(seed):
        unet = UNet(pixel_unet_config())
    start = time.process_time()
    ema, _ = _train_pixel_unet(unet, schedule, images * scale, None, steps, seed)
    seconds = time.process_time() - start
    val_seed = scenes_seed("pixel-uncond", seed, "eval")
    quality, _ = _pixel_quality(ema, schedule, seed, val_seed, ema, scale=scale)
    return quality | {"train_cpu_seconds": round(seconds)}


def run_text(steps, scale) -> dict:
    """Run the pixel-text recipe at `scale` into a temporary folder.

    Returns:
        its manifest's quality figures, and "cpu_seconds" of the whole run.
    """
    start = time.process_time()
    with tempfile.TemporaryDirectory() as folder:
        quality = pixel_text(Path(folder), 0, steps, scale=scale)
    return quality | {"cpu_seconds": round(time.process_time() - start)}


def text_table(steps, scales):
    print(f"pixel-text, {steps} steps of {PIXEL_BATCH}")
    print(" scale  accuracy  solid share  FID (64)  CPU s")
    for scale in scales:
        q = run_text(steps, scale)
        accuracy = q["prompt_accuracy_64_test_prompts"]
        share, fid = q["solid_colour_share_samples"], q["fid_64_samples_judge_features"]
        seconds = q["cpu_seconds"]
        print(f"{scale:6g} {accuracy:9.3f} {share:12.3f} {fid:9.1f} {seconds:6d}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("uncond", "text"), default="uncond")
    parser.add_argument("--steps", type=int, help="training steps (450; text 1,400)")
    parser.add_argument("--scales", type=float, nargs="+", default=[1.0, 5.0])
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.model == "text":
        print(machine())
        return text_table(args.steps or 1400, args.scales)
    args.steps = args.steps or 450
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
