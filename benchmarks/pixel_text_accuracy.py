"""The bundled pixel-text model's prompt accuracy on more prompts than its recipe uses.

    python benchmarks/pixel_text_accuracy.py [--model FOLDER] [--samples 512]
                                             [--seed 0] [--guidance 3]

The pixel-text recipe scores its model on 64 evaluation prompts, where one prompt
moves the figure by 1.6 points. This draws `--samples` test prompts (default 512;
the first 64 are the recipe's, with other noise), samples each as the recipe does
(DDIM, 25 steps, classifier-free guidance at the recipe's scale or `--guidance`,
the stored float16 weights), and reports the judge's prompt accuracy with a 95 %
interval, split into one- and two-object prompts. One thread.
"""

import argparse
import json
import math
import time

import torch
from _machine import machine  # benchmarks/_machine.py, beside this script

from sdscratch.checkpoint import load_component, resolve
from sdscratch.clip import TextEncoder, TextEncoderConfig
from sdscratch.recipes.common import scenes_seed
from sdscratch.recipes.pixel import GUIDANCE, guided
from sdscratch.samplers import sample
from sdscratch.schedules import NoiseSchedule
from sdscratch.shapes.evaluate import evaluation_prompts
from sdscratch.shapes.judge import check
from sdscratch.tokenizer import Tokenizer
from sdscratch.unet import UNet, UNetConfig


def load(folder):
    """A pixel-text folder's UNet, `encode(texts) -> (B, L, D)` and manifest."""
    tokenizer = Tokenizer.from_pretrained(folder / "tokenizer")
    encoder = load_component(folder / "text_encoder", TextEncoder, TextEncoderConfig)
    unet = load_component(folder / "unet", UNet, UNetConfig).float()
    manifest = json.loads((folder / "MANIFEST.json").read_text())

    @torch.no_grad()
    def encode(texts):
        return encoder(tokenizer(texts))

    return unet, encode, manifest


@torch.no_grad()
def draw(unet, encode, prompts, scale, seed, guidance=GUIDANCE, batch=64):
    """One guided sample per prompt.

    Args:
        unet, encode: the model and its text encoder (`load`).
        prompts: N prompts; scale: the model's pixel_scale (samples are divided by
            it); seed: of the noise; guidance: the classifier-free guidance scale;
        batch: prompts per sampling call.
    Returns:
        (N, 3, 32, 32) pixels.
    """
    generator = torch.Generator().manual_seed(seed)
    schedule, empty = NoiseSchedule.scaled_linear(), encode([""])
    out = []
    for start in range(0, len(prompts), batch):
        chunk = prompts[start : start + batch]
        noise = torch.randn((len(chunk), 3, 32, 32), generator=generator)
        eps_fn = guided(unet, encode(chunk), empty, guidance)
        out.append(sample(eps_fn, noise, "ddim", 25, schedule) / scale)
    return torch.cat(out)


def interval(hits: int, n: int) -> tuple[float, float]:
    """Wilson's 95 % interval of a proportion."""
    p, z = hits / n, 1.96
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="shapes-pixel-text")
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--guidance", type=float, default=GUIDANCE)
    args = parser.parse_args()
    torch.set_num_threads(1)
    folder = resolve(args.model)
    unet, encode, manifest = load(folder)
    scale = manifest["quality"]["pixel_scale"]
    val_seed = scenes_seed("pixel-text", args.seed, "eval")  # the recipe's prompts
    prompts, scenes = evaluation_prompts(args.samples, seed=val_seed)
    start = time.process_time()
    images = draw(unet, encode, prompts, scale, args.seed + 100, args.guidance)
    right = check(images, scenes)["scene"]
    print(machine())
    seconds = time.process_time() - start
    print(
        f"{folder.name}: pixel_scale {scale}, {manifest['quality']['steps']} steps,"
        f" DDIM 25, guidance {args.guidance}, {seconds:.0f} CPU s"
    )
    for label, keep in (("all", None), ("one object", 1), ("two objects", 2)):
        mask = [keep is None or len(s["objects"]) == keep for s in scenes]
        hits, n = int(right[mask].sum()), sum(mask)
        low, high = interval(hits, n)
        print(
            f"{label:12} prompt accuracy {hits / n:.1%} of {n}"
            f" (95 % interval {low:.1%}-{high:.1%})"
        )


if __name__ == "__main__":
    main()
