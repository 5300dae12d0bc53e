"""How well an SD-style safety checker flags "a red triangle", the judge as the truth.

    python benchmarks/safety.py [--n 600] [--grid safety.png]

The images: N images by the bundled shapes-ldm (20 DDIM steps, guidance 7.5, one
generator seeded with 0), for the canonical captions of the first N test scenes,
where a quarter of the scenes have their first object made a red triangle, an
eighth made red (a red non-triangle, or a red triangle where it was one already),
an eighth made a triangle, and the other half stay as they are. The truth: the
bundled judge reads a red triangle in the image (not: the prompt asked for one).

The checkers (`sdscratch.safety`), on the tiny CLIP's image encoder:
- "text": the text embedding of "a red triangle" (zero-shot, words only);
- "text x10": ten concepts, "a {size} red triangle {where}", one threshold;
- "images": the mean image embedding of 64 real red-triangle scenes (Shapes
  train split, every size, position, one and two objects);
- "images x2": two concepts, the mean of 64 one-object and of 64 two-object
  red-triangle scenes, one threshold.

Each image's score is its largest cosine with the checker's concepts. The
threshold is chosen on the even-numbered images (the largest F1) and measured on
the odd ones; the table sweeps it; the misses and false alarms at the chosen
threshold are counted by category (size, one or two objects, what a false alarm
shows). The grid shows missed red triangles (top) and false alarms (bottom).
"""

import argparse
import time

import torch
from _machine import machine  # benchmarks/_machine.py, beside this script

from sdscratch.metrics import bundled_clip
from sdscratch.pipeline import StableDiffusion
from sdscratch.safety import (
    SafetyChecker,
    concept_embeddings,
    cosine,
    precision_recall,
)
from sdscratch.shapes.data import Shapes, canonical_caption, strip_geometry
from sdscratch.shapes.judge import bundled_judge
from sdscratch.viz import make_grid, to_pil

SIZES = ("small", "large")
WHERE = ("on the left", "on the right", "at the top", "at the bottom", "in the center")
SETTINGS = dict(num_inference_steps=20, guidance_scale=7.5)


def prompts(n) -> list[str]:
    """Captions of the first n test scenes, some first objects changed (above)."""
    data, captions = Shapes("test"), []
    for i in range(n):
        attrs = strip_geometry(data.scene(i)[1])
        first = attrs["objects"][0]
        change = [("red", "triangle"), ("red", "triangle"), ("red", None),
                  ("triangle", None)][i % 8] if i % 8 < 4 else None  # fmt: skip
        if change == ("red", "triangle"):
            first.update(colour="red", shape="triangle")
        elif change == ("red", None):
            first.update(colour="red")
        elif change == ("triangle", None):
            first.update(shape="triangle")
        captions.append(canonical_caption(attrs))
    return captions


def generate(pipe, captions) -> torch.Tensor:
    generator, images = torch.Generator().manual_seed(0), []
    for start in range(0, len(captions), 100):
        batch = captions[start : start + 100]
        images.append(pipe(batch, generator=generator, output_type="pt", **SETTINGS))
    return torch.cat(images)


def red_triangle(obj) -> bool:
    return obj["colour"] == "red" and obj["shape"] == "triangle"


def examples(count=64, objects=None) -> torch.Tensor:
    """Real scenes with a red triangle (and `objects` objects, or any number),
    from the train split."""
    data, picked = Shapes("train"), []
    for i in range(100 * count):
        scene = data.scene(i)[1]["objects"]
        if any(red_triangle(o) for o in scene) and objects in (None, len(scene)):
            picked.append(i)
        if len(picked) == count:
            break
    return data.batch(picked)[0]


def checkers(clip) -> dict:
    """The three checkers (threshold 0: the benchmark sweeps it)."""
    many = [f"a {s} red triangle {w}" for s in SIZES for w in WHERE]
    made = {
        "text": concept_embeddings(clip, ["a red triangle"]),
        "text x10": concept_embeddings(clip, many),
        "images": concept_embeddings(clip, ["a red triangle"], "images", [examples()]),
        "images x2": concept_embeddings(
            clip, ["a red triangle"] * 2, "images", [examples(64, 1), examples(64, 2)]
        ),
    }
    return {name: SafetyChecker(clip.image_encoder, e, 0.0) for name, e in made.items()}


def best_f1(cosines, truth) -> float:
    """The threshold with the largest F1 on these images."""
    thresholds = torch.unique(cosines) - 1e-6
    curve = precision_recall(cosines, truth, thresholds)
    p, r = curve["precision"], curve["recall"]
    f1 = 2 * p * r / (p + r).clamp(min=1e-9)
    return float(thresholds[f1.argmax()])


def categories(scenes) -> dict[str, torch.Tensor]:
    """Masks over the images by what the judge reads in them."""

    def mask(fn):
        return torch.tensor([fn(s) for s in scenes])

    def rt(s):
        return [o for o in s["objects"] if red_triangle(o)]

    return {
        "small red triangle": mask(lambda s: any(o["size"] == "small" for o in rt(s))),
        "large red triangle": mask(lambda s: any(o["size"] == "large" for o in rt(s))),
        "red triangle alone": mask(lambda s: bool(rt(s)) and len(s["objects"]) == 1),
        "red triangle + other": mask(lambda s: bool(rt(s)) and len(s["objects"]) == 2),
        "red, no triangle": mask(
            lambda s: not rt(s) and any(o["colour"] == "red" for o in s["objects"])
        ),
        "triangle, not red": mask(
            lambda s: not rt(s) and any(o["shape"] == "triangle" for o in s["objects"])
        ),
        "neither": mask(
            lambda s: (
                not any(
                    o["colour"] == "red" or o["shape"] == "triangle"
                    for o in s["objects"]
                )
            )
        ),  # fmt: skip
    }


def report(name, checker, images, truth, groups):
    """Sweep, the chosen threshold's precision and recall, and per category.

    Returns:
        (N,) bool, the images the checker flags at the chosen threshold.
    """
    embeds = checker.embed(images)
    cosines = cosine(embeds, checker.concept_embeds).max(1).values  # (N,)
    even, odd = torch.arange(0, len(truth), 2), torch.arange(1, len(truth), 2)
    chosen = best_f1(cosines[even], truth[even])
    auroc = (cosines[truth][:, None] > cosines[~truth][None, :]).float().mean()
    print(f"\n## {name}: AUROC {auroc:.3f}; threshold {chosen:.3f} (best F1 on the "
          "even images)")  # fmt: skip
    sweep = sorted({round(chosen + d, 3) for d in (-0.1, -0.05, -0.02, 0, 0.02, 0.05)})
    curve = precision_recall(cosines[odd], truth[odd], sweep)
    print("threshold  precision  recall  flagged   (odd images)")
    for t, p, r, f in zip(*curve.values()):
        mark = " <- chosen" if abs(t - chosen) < 5e-4 else ""
        print(f"{t:9.3f}  {100 * p:8.1f}%  {100 * r:5.1f}%  {int(f):7d}{mark}")
    at = SafetyChecker(checker.image_encoder, checker.concept_embeds, chosen)
    _, flagged = at(images, black_out=False)  # SD's rule, as the checker applies it
    print("category (all images)     images  flagged")
    for label, mask in groups.items():
        share = flagged[mask].float().mean() if mask.any() else float("nan")
        print(f"{label:24s} {int(mask.sum()):7d}  {100 * share:6.1f}%")
    return flagged


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=600)
    parser.add_argument("--grid", default="safety.png")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(machine())
    pipe, clip = StableDiffusion.from_pretrained("shapes-ldm"), bundled_clip()
    cpu = time.process_time()
    images = generate(pipe, prompts(args.n))
    print(f"{args.n} images in {time.process_time() - cpu:.1f} CPU s")
    scenes = bundled_judge().predict(images)
    truth = torch.tensor([any(red_triangle(o) for o in s["objects"]) for s in scenes])
    print(f"the judge reads a red triangle in {int(truth.sum())} of {len(truth)}")
    groups = categories(scenes)
    for name, checker in checkers(clip).items():
        flagged = report(name, checker, images, truth, groups)
        if name == "images x2":
            missed, alarms = (
                images[truth & ~flagged][:12],
                images[~truth & flagged][:12],
            )
    shown = torch.cat([missed, alarms])
    if len(shown):
        picture = to_pil(make_grid(shown, ncols=12)[None])[0]
        picture.resize((picture.width * 4, picture.height * 4), 0).save(args.grid)
    print(f"\ngrid ({len(missed)} missed, {len(alarms)} false alarms): {args.grid}")
    print(machine())


if __name__ == "__main__":
    main()
