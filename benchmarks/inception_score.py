"""Where the Inception Score misleads: five sets of N images, every measure at once.

    python benchmarks/inception_score.py [--samples 1000]

The Inception Score (`sdscratch.metrics.inception_score`, Salimans et al. 2016) on
the judge's shape-and-colour posteriors (`sdscratch.shapes.evaluate.class_posteriors`)
beside FID, the judge's and the outline measure's prompt accuracy, the mean outline
IoU and the CLIP score (`evaluate_samples`), for N images answering the first N
canonical test prompts:

1. real: the prompts' own scenes (test[:N]), what a perfect generator draws;
2. shapes-ldm: the bundled model, as `python -m sdscratch evaluate` draws them (20
   DDIM steps, guidance 7.5, all the noise from one generator seeded 0, batches
   of 50);
3. one per class: one perfect picture for each of the 36 shape-and-colour classes
   (large, at the centre), drawn in turn whatever the prompt asks;
4. one class: a large red circle at the centre, N times;
5. real, wrong prompts: the real scenes, each answering the next prompt.

Then, for shapes-ldm: the asked objects whose outline reads another shape or none,
by size and shape, and the mean outline IoU by size.

IS is quoted for the paper's 10 splits (mean ± std over them) and for one split of
all N images (each split estimates p(y) from its own images, so 10 splits score
lower at the same N).
"""

import argparse
import collections
import time

import torch
from _machine import machine  # benchmarks/_machine.py, beside this script

from sdscratch.metrics import inception_score
from sdscratch.pipeline import StableDiffusion
from sdscratch.shapes.data import COLOURS, SHAPES, render_batch
from sdscratch.shapes.evaluate import (
    class_posteriors,
    evaluate_samples,
    evaluation_prompts,
    fid_floor,
    generate_images,
    real_features,
    real_images,
)
from sdscratch.shapes.judge import bundled_judge
from sdscratch.shapes.outline import match, read_objects

COLUMNS = (
    "IS (10 splits)   IS (1)    FID   judge 1 / 2 obj   outline 1 / 2 obj   "
    "outline IoU   CLIP"
)


def centred(shape, colour) -> dict:
    obj = {"shape": shape, "colour": colour, "size": "large", "position": "center"}
    return {"objects": [obj], "relation": None}


def image_sets(n) -> dict:
    """{name: (N, 3, 32, 32) images, and the CPU seconds it took to make them}."""
    real, _, _ = real_images(n, "test")
    captions, _ = evaluation_prompts(n)
    start = time.process_time()
    pipe = StableDiffusion.from_pretrained("shapes-ldm")
    settings = dict(num_inference_steps=20, guidance_scale=7.5, sampler="ddim")
    generator = torch.Generator().manual_seed(0)
    model, _, _ = generate_images(pipe, captions, generator, 50, False, **settings)
    model_seconds = time.process_time() - start
    per_class = render_batch([centred(s, c) for s in SHAPES for c in COLOURS])
    return {
        "real (test[:N])": (real, 0.0),
        "shapes-ldm": (model, model_seconds),
        "one per class": (per_class[torch.arange(n) % len(per_class)], 0.0),
        "one class": (render_batch([centred("circle", "red")] * n), 0.0),
        "real, wrong prompts": (real.roll(1, 0), 0.0),
    }


def row(name, images, captions, scenes, reference, seconds) -> str:
    start = time.process_time()
    result = evaluate_samples(images, captions, scenes, reference)
    one_split, _ = inception_score(class_posteriors(images), splits=1)
    seconds += time.process_time() - start
    return (
        f"{name:20s} {result['inception_score']:6.2f} ± "
        f"{result['inception_score_std']:4.2f}   {one_split:6.2f}  "
        f"{result['fid']:6.1f}   "
        f"{100 * result['prompt_accuracy_one_object']:5.1f} / "
        f"{100 * result['prompt_accuracy_two_objects']:5.1f} %   "
        f"{100 * result['outline_accuracy_one_object']:5.1f} / "
        f"{100 * result['outline_accuracy_two_objects']:5.1f} %   "
        f"{result['outline_iou']:11.3f}   {result['clip_score']:4.1f}   "
        f"({seconds:.0f} CPU s)"
    )


def misread(images, scenes):
    """Asked objects whose outline reads another shape (or none), by size and
    shape; the mean IoU of asked objects with their shape, by size."""
    wrong, asked, ious = (collections.defaultdict(list) for _ in range(3))
    for objects, attrs in zip(read_objects(images), scenes):
        for obj, want in zip(match(objects, attrs), attrs["objects"]):
            key = f"{want['size']} {want['shape']}"
            asked[key].append(obj)
            if obj is None or obj["shape"] != want["shape"]:
                wrong[key].append("none" if obj is None else obj["shape"])
            ious[want["size"]].append(0.0 if obj is None else
                                      obj["ious"][want["shape"]])  # fmt: skip
    print("shapes-ldm, asked objects whose outline reads another shape (most read):")
    for key in sorted(asked):
        common = collections.Counter(wrong[key]).most_common(2)
        reads = ", ".join(f"{shape} {count}" for shape, count in common)
        print(f"  {key:15s} {len(wrong[key]):4d} of {len(asked[key]):4d}  {reads}")
    print("mean outline IoU by size: " + ", ".join(
        f"{size} {sum(v) / len(v):.3f} ({len(v)} objects)"
        for size, v in sorted(ious.items())))  # fmt: skip


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=1000, help="N images per set")
    args = parser.parse_args()
    if not 10 <= args.samples <= 10_000:
        parser.error("--samples must be 10 … 10,000")
    torch.set_num_threads(1)
    print(f"machine: {machine()}")
    n, judge = args.samples, bundled_judge()
    captions, scenes = evaluation_prompts(n)
    counts = [len(attrs["objects"]) for attrs in scenes]
    classes = class_posteriors(real_images(1)[0], judge).shape[1]
    print(f"N = {n} canonical test prompts ({counts.count(1)} with one object, "
          f"{counts.count(2)} with two); FID against val[:N], real-vs-real floor "
          f"{fid_floor(n, judge):.1f}; K = {classes} classes (the judge's shapes × "
          "colours)")  # fmt: skip
    reference = real_features(n, "val", judge=judge)
    print(f"{'':20s} {COLUMNS}")
    sets = image_sets(n)
    for name, (images, seconds) in sets.items():
        print(row(name, images, captions, scenes, reference, seconds), flush=True)
    misread(sets["shapes-ldm"][0], scenes)


if __name__ == "__main__":
    main()
