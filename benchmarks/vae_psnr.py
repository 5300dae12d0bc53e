"""Reconstruction PSNR of the bundled autoencoder on held-out Shapes (target: 30 dB).

    python benchmarks/vae_psnr.py [--model shapes-vae] [--scenes 2000]

Encodes test-split scenes (never seen in training) to their mean latent, decodes
them, and prints the PSNR in dB (images in [-1, 1], peak-to-peak 2, reconstructions
clamped): over the whole set (from its mean squared error) and the mean of per-image
PSNRs, for one- and two-object scenes, plus the latents' statistics after scaling.
"""

import argparse
import time

import torch
from _machine import machine  # benchmarks/_machine.py, beside this script

from sdscratch.checkpoint import load_component, resolve, verify
from sdscratch.shapes.data import Shapes
from sdscratch.vae import VAE, VAEConfig, psnr

TARGET = 30.0  # dB, 32x32 images through 8x8x4 latents


@torch.no_grad()
def reconstruct(vae, images, batch_size=250):
    latents, reconstructions = [], []
    for batch in images.split(batch_size):
        latent = vae.encode(batch).mode()
        latents.append(latent)
        reconstructions.append(vae.decode(latent))
    return torch.cat(latents), torch.cat(reconstructions)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="shapes-vae", help="name or folder")
    parser.add_argument("--scenes", type=int, default=2000, help="test scenes")
    args = parser.parse_args()
    root = resolve(args.model)
    manifest = verify(root, components=["vae"])
    vae = load_component(root / "vae", VAE, VAEConfig)
    test = Shapes("test")
    images, _, scenes = test.batch(range(args.scenes))
    start = time.perf_counter()
    latents, reconstructions = reconstruct(vae, images)
    seconds = time.perf_counter() - start
    print(f"machine: {machine()}")
    print(f"model: {root} (made by `{manifest['command']}`)")
    print(
        f"{args.scenes} test scenes {tuple(images.shape[1:])} -> latents "
        f"{tuple(latents.shape[1:])}, encoded and decoded in {seconds:.1f} s"
    )
    per_image = [psnr(a[None], b[None]) for a, b in zip(images, reconstructions)]
    print(f"PSNR over the set:        {psnr(images, reconstructions):6.2f} dB")
    print(f"mean of per-image PSNRs:  {sum(per_image) / len(per_image):6.2f} dB")
    for count in (1, 2):
        chosen = [i for i, s in enumerate(scenes) if len(s["objects"]) == count]
        value = psnr(images[chosen], reconstructions[chosen])
        print(f"  {count}-object scenes ({len(chosen):4d}): {value:6.2f} dB")
    scaled = latents * vae.config.scaling_factor
    print(
        f"scaling_factor {vae.config.scaling_factor}: scaled latents have mean "
        f"{scaled.mean():.3f}, std {scaled.std():.3f}; per channel std "
        + ", ".join(f"{s:.3f}" for s in scaled.std(dim=(0, 2, 3)).tolist())
    )
    verdict = "meets" if psnr(images, reconstructions) >= TARGET else "MISSES"
    print(f"PSNR over the set {verdict} the target of {TARGET:.0f} dB")


if __name__ == "__main__":
    main()
