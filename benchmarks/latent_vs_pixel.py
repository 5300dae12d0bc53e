"""Why latents: the same UNet on 8×8×4 latents and on 32×32×3 pixels, timed.

Usage: python benchmarks/latent_vs_pixel.py [--rounds 3] [--batch 64] [--threads 1]

Builds two untrained UNets from the ldm recipe's config
(`sdscratch.recipes.ldm_unet_config`): one for the VAE's latents (4×8×8), one for
pixels (3×32×32), otherwise identical (same widths, depth, attention levels, text
width). Then times, as the median over rounds with the two models alternating (and
swapping which goes first) so that both see the same machine load:

- a training step: forward, backward and AdamW step on a batch with text context;
- a sampling step: one guided UNet evaluation of 16 images (a batch of 32: with
  and without the prompt), no gradients;
- a whole 20-step DDIM sampling of 16 images; the latent one includes decoding
  with an (untrained) VAE of the bundled VAE's config.

Prints the times and the ratios pixel / latent (the course's target: ≥ 10×).
Take figures under the CPU lock: `flock /tmp/sdscratch-cpu.lock python ...`.
"""

import argparse
import os
import statistics
import time

import torch
from _machine import machine  # benchmarks/_machine.py, beside this script

from sdscratch.recipes import ldm_unet_config
from sdscratch.samplers import sample
from sdscratch.schedules import NoiseSchedule
from sdscratch.train import diffusion_loss
from sdscratch.unet import UNet
from sdscratch.vae import VAE, VAEConfig

CONTEXT_LENGTH = 32  # the bundled tokenizer's context length
IMAGES = 16  # images per sampling batch
STEPS = 20  # DDIM steps of a whole sampling


def models():
    """(name, UNet, input shape (C, H, W), decoder) for latents and for pixels."""
    latent = ldm_unet_config()
    pixel = ldm_unet_config(latent_channels=3, latent_size=32)
    torch.manual_seed(0)
    vae = VAE(VAEConfig()).eval()  # the bundled VAE's config: 32×32×3 <-> 8×8×4
    side = latent.sample_size
    return [
        ("latent", UNet(latent), (latent.in_channels, side, side), vae.decode),
        ("pixel", UNet(pixel), (3, pixel.sample_size, pixel.sample_size), None),
    ]


def tasks(unet, shape, decode, batch):
    """The three timed tasks for one model, as functions of no arguments."""
    g = torch.Generator().manual_seed(0)
    schedule = NoiseSchedule.scaled_linear()
    width = unet.config.cross_attention_dim
    x = torch.randn(batch, *shape, generator=g)
    context = torch.randn(batch, CONTEXT_LENGTH, width, generator=g)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-4)
    guided = torch.randn(2 * IMAGES, CONTEXT_LENGTH, width, generator=g)
    noise = torch.randn(IMAGES, *shape, generator=g)

    def train_step():
        loss = diffusion_loss(unet, x, schedule, g, context)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def eps(x_t, t):
        both = unet(torch.cat([x_t, x_t]), torch.cat([t, t]), guided)
        uncond, text = both.chunk(2)
        return uncond + 7.5 * (text - uncond)

    @torch.no_grad()
    def sampling_step():
        eps(noise, torch.full((IMAGES,), 500))

    @torch.no_grad()
    def sampling():
        out = sample(eps, noise, "ddim", STEPS, schedule)
        return decode(out) if decode is not None else out

    return {"training step": train_step, "sampling step": sampling_step,
            f"{STEPS}-step sampling": sampling}  # fmt: skip


def seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=64, help="training batch")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"machine: {machine()}")
    built = models()
    for name, unet, shape, _ in built:
        params = sum(p.numel() for p in unet.parameters())
        print(f"{name:6} UNet: input {shape}, {params / 1e6:.2f} M parameters")
    jobs = {name: tasks(unet, shape, decode, args.batch)
            for name, unet, shape, decode in built}  # fmt: skip
    times = {name: {task: [] for task in job} for name, job in jobs.items()}
    for task in jobs["latent"]:
        for name in jobs:  # warm-up (a whole sampling is made of the steps just timed)
            if "-step" not in task:
                jobs[name][task]()
        for r in range(args.rounds):
            order = list(jobs) if r % 2 == 0 else list(jobs)[::-1]
            for name in order:
                times[name][task].append(seconds(jobs[name][task]))
    print(f"\nmedian of {args.rounds} rounds (training batch {args.batch}, "
          f"sampling {IMAGES} images with guidance):")  # fmt: skip
    print(f"{'':22}{'pixel':>10}{'latent':>10}{'pixel/latent':>15}")
    for task in jobs["latent"]:
        pixel = statistics.median(times["pixel"][task])
        latent = statistics.median(times["latent"][task])
        print(f"{task:22}{pixel:9.3f}s{latent:9.3f}s{pixel / latent:14.1f}×")
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
