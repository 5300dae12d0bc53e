"""The outline measure against real, blurred, reconstructed and generated images.

    python benchmarks/outline.py [--scenes 1000] [--generated 200] [--grids DIR]

1. Real test scenes at 32 and 64 pixels: the share of objects read right (shape,
   colour, size, position) and of whole scenes, and the IoU of each object with its
   shape (target: ≥ 99 % of objects, small stars included).
2. Renders blurred with a Gaussian of σ pixels (at 32 px; 2σ at 64 px): per shape
   and size, how often the blob still reads as its shape, and how often it reads as
   no shape. This is the data `MIN_IOU` is chosen from.
3. The bundled autoencoder's reconstructions of real scenes (32 px): the judge's
   and the outline measure's share of objects read right, by shape and size.
4. The bundled shapes-ldm's images of the first N canonical test prompts (image i
   from seed i, 20 DDIM steps, guidance 7.5): both readers' prompt accuracy, and
   the images on which they disagree (with --grids: enlarged sheets, PNG).
"""

import argparse
import collections
import time
from pathlib import Path

import torch
from _machine import machine  # benchmarks/_machine.py, beside this script

from sdscratch.checkpoint import load_component, resolve
from sdscratch.pipeline import StableDiffusion
from sdscratch.shapes.data import SHAPES, SIZES, Shapes, render_batch
from sdscratch.shapes.evaluate import evaluation_prompts
from sdscratch.shapes.judge import bundled_judge, check, gaussian_blur
from sdscratch.shapes.labels import generate, sheet
from sdscratch.shapes.outline import (
    MIN_IOU,
    UNREADABLE,
    match,
    outline_accuracy,
    outline_check,
    read_objects,
)
from sdscratch.vae import VAE, VAEConfig

KEYS = ("shape", "colour", "size", "position")


def object_rights(reads, scenes) -> list[tuple[dict, bool]]:
    """(asked object, read right in all four attributes) for every asked object."""
    out = []
    for objects, attrs in zip(reads, scenes):
        for obj, want in zip(match(objects, attrs), attrs["objects"]):
            right = obj is not None and all(obj[k] == want[k] for k in KEYS)
            out.append((want, right))
    return out


def percentages(right: dict) -> str:
    return "  ".join(f"{k} {100 * v.double().mean():.1f}%" for k, v in right.items())


def by_group(rights) -> str:
    groups = collections.defaultdict(list)
    for want, right in rights:
        groups[f"{want['size']} {want['shape']}"].append(right)
    return "  ".join(f"{name} {100 * sum(v) / len(v):.0f}%"
                     for name, v in sorted(groups.items()))  # fmt: skip


def real_scenes(n):
    print(f"\n1. real test scenes ({n:,} at each size)")
    for size in (32, 64):
        images, _, scenes = Shapes("test", size=size).batch(range(n))
        start = time.perf_counter()
        reads = read_objects(images)
        seconds = time.perf_counter() - start
        result = outline_accuracy(images, scenes, reads)
        rights = object_rights(reads, scenes)
        wrong = [want for want, right in rights if not right]
        ious = [obj["iou"] for objects in reads for obj in objects]
        print(f"  {size} px: objects {100 * result['objects']:.2f} % "
              f"({len(rights) - len(wrong)}/{len(rights)}), scenes "
              f"{100 * result['scene']:.2f} %, mean IoU {result['mean_iou']:.3f}, "
              f"lowest {min(ious):.3f} ({seconds:.0f} s)")  # fmt: skip
        for want in wrong[:10]:
            print(f"    wrong: {want}")


def blurred(sigmas=(0.5, 1.0, 1.5), repeats=4):
    print(f"\n2. blurred renders, each shape × size × 5 positions × {repeats} colours;"
          f" MIN_IOU = {MIN_IOU}")  # fmt: skip
    colours = ("red", "green", "blue", "yellow")[:repeats]
    positions = ("left", "right", "top", "bottom", "center")
    objects = [{"shape": s, "colour": c, "size": z, "position": p}
               for s in SHAPES for z in SIZES
               for c in colours for p in positions]  # fmt: skip
    scenes = [{"objects": [obj], "relation": None} for obj in objects]
    for size in (32, 64):
        images = render_batch(scenes, size)
        for sigma in sigmas:
            scale = sigma * size / 32
            blurry = gaussian_blur(images, torch.full((len(images),), scale), 4)
            reads = read_objects(blurry)
            cells = collections.defaultdict(lambda: [0, 0, 0])
            for objects, attrs in zip(reads, scenes):
                want = attrs["objects"][0]
                got = match(objects, attrs)[0]
                cell = cells[f"{want['size'][0]}.{want['shape']}"]
                cell[0] += got is not None and got["shape"] == want["shape"]
                cell[1] += got is None or got["shape"] == UNREADABLE
                cell[2] += 1
            text = "  ".join(
                f"{k} {a}/{n} ({u} none)" for k, (a, u, n) in cells.items()
            )
            print(f"  {size} px, σ = {sigma} (×{size // 32}): read as itself: {text}")


@torch.no_grad()
def reconstructions(n):
    print(f"\n3. shapes-vae reconstructions of {n:,} real test scenes (32 px)")
    vae = load_component(resolve("shapes-vae") / "vae", VAE, VAEConfig)
    images, _, scenes = Shapes("test").batch(range(n))
    out = torch.cat([vae.decode(vae.encode(b).mode()) for b in images.split(250)])
    out = out.clamp(-1, 1)
    judge = check(out, scenes, bundled_judge())
    reads = read_objects(out)
    outline = outline_check(out, scenes, reads)
    for name, right in (("judge", judge), ("outline", outline)):
        print(f"  {name:8s} scenes: {percentages(right)}")
    print(f"  outline, objects read right: {by_group(object_rights(reads, scenes))}")


def generated(n, grids):
    print(f"\n4. shapes-ldm, {n} canonical test prompts, seed i, 20 DDIM, guidance 7.5")
    captions, scenes = evaluation_prompts(n)
    start = time.perf_counter()
    images = generate(StableDiffusion.from_pretrained("shapes-ldm"), captions,
                      list(range(n)))  # fmt: skip
    print(f"  generated in {time.perf_counter() - start:.0f} s")
    judge = check(images, scenes, bundled_judge())
    reads = read_objects(images)
    outline = outline_check(images, scenes, reads)
    for name, right in (("judge", judge), ("outline", outline)):
        print(f"  {name:8s} {percentages(right)}")
    result = outline_accuracy(images, scenes, reads)
    print(f"  outline: objects right {100 * result['objects']:.1f} %, mean IoU of "
          f"asked objects with their shape {result['mean_iou']:.3f}")  # fmt: skip
    print(f"  outline, objects read right: {by_group(object_rights(reads, scenes))}")
    split = {
        "judge yes, outline no": (judge["scene"] & ~outline["scene"]),
        "judge no, outline yes": (~judge["scene"] & outline["scene"]),
    }
    for name, which in split.items():
        ids = which.nonzero()[:, 0].tolist()
        print(f"  {name}: {len(ids)} images: {ids}")
        if grids and ids:
            Path(grids).mkdir(parents=True, exist_ok=True)
            for k in range(0, len(ids), 20):
                chunk = ids[k : k + 20]
                notes = [" ".join(f"{o['shape'][:4]} {o['iou']:.2f}" for o in reads[i])
                         for i in chunk]  # fmt: skip
                stem = name.replace(", ", "_").replace(" ", "-")
                path = Path(grids) / f"{stem}_{k}.png"
                sheet(images[chunk], chunk, captions=notes).save(path)
                print(f"    {path}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenes", type=int, default=1000, help="real scenes")
    parser.add_argument("--generated", type=int, default=200, help="ldm images")
    parser.add_argument("--grids", help="a folder for sheets of disagreements")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"machine: {machine()}")
    real_scenes(args.scenes)
    blurred()
    reconstructions(args.scenes)
    generated(args.generated, args.grids)


if __name__ == "__main__":
    main()
