"""Erasing "red" from triangles (ESD, `sdscratch.erase`), and what else it damages.

    python benchmarks/erasing.py [--configs default,empty_anchor,...] [--unrelated 500]
        [--grid erasing.png]

Grids: the first image of each concept prompt, and of every third red-other
prompt, a row per model (base first), in GRID and GRID_red_other.png.

The base model is the bundled shapes-ldm. The erased prompts are the ten
"a {size} red triangle {where}" (2 sizes × 5 positions); their anchors the same
without "red" ("a small triangle on the left"). Preservation prompts (configs
that use them): red diamonds and crosses, yellow and purple triangles. Every
image below comes from 20 DDIM steps at guidance 7.5, each set's noise from its
own generator seeded with 1; erasure itself is seeded with 0 (--seed). The bundled judge
reads every image.

Figures, before (the base) and after each configuration:

- concept (10 prompts × 10 images): the share of images whose triangle is still
  judged red (want ≈ 0), whose shape is still a triangle and whose size and
  position are still right (want ≈ 100 %), and the colours the judge reads there;
- red other shapes (circles, squares, stars: shapes no preservation prompt names;
  30 prompts × 4 images) and other-coloured triangles (blue, green, orange: 30 × 4):
  prompt accuracy (every attribute right);
- unrelated: prompt accuracy (one and two objects) and FID on the first N test
  scenes that hold neither a red object nor a triangle (`evaluation_prompts`), FID
  against as many real val scenes without them.

Configurations (`CONFIGS`; ESD's train methods, `sdscratch.erase.trains`):
"default" is `erase`'s defaults (xattn, x_t noised, 200 steps at lr 2e-4, batch 8)
with the anchors without "red"; the others change one or two things: the anchor
(the empty prompt, ESD proper; or "blue" for "red"), x_t ("sampled", ESD's partial
sampling), the weights trained (noxattn, full, at lr 1e-4) and preservation (λ =
10; "narrow": PRESERVE, "wide": PRESERVE and 30 unrelated val captions). CPU
seconds are those of the erasure alone, with one thread.
"""

import argparse
import time
from collections import Counter

import torch
from _machine import machine  # benchmarks/_machine.py, beside this script

from sdscratch.erase import anchor_prompts, erase
from sdscratch.pipeline import StableDiffusion
from sdscratch.shapes.data import Shapes, canonical_caption, strip_geometry
from sdscratch.shapes.evaluate import evaluate_samples, evaluation_prompts
from sdscratch.shapes.judge import bundled_judge, check, image_features
from sdscratch.viz import make_grid, to_pil

SIZES = ("small", "large")
WHERE = ("on the left", "on the right", "at the top", "at the bottom", "in the center")
SETTINGS = dict(num_inference_steps=20, guidance_scale=7.5)
CONCEPT = [f"a {s} red triangle {w}" for s in SIZES for w in WHERE]
RED_OTHER = [f"a {s} red {shape} {w}" for shape in ("circle", "square", "star")
             for s in SIZES for w in WHERE]  # fmt: skip
OTHER_TRIANGLES = [f"a {s} {colour} triangle {w}"
                   for colour in ("blue", "green", "orange")
                   for s in SIZES for w in WHERE]  # fmt: skip
PRESERVE = [f"a {s} red {shape} {w}" for shape in ("diamond", "cross")
            for s in SIZES for w in WHERE] + [
    f"a {s} {colour} triangle {w}" for colour in ("yellow", "purple")
    for s in SIZES for w in WHERE]  # fmt: skip
BASE = dict(method="xattn", anchor="no red", x_t="noised", lr=2e-4, preserve=None)
CONFIGS = {  # each changes BASE (erase's defaults, with the anchors "no red")
    "default": {},
    "empty_anchor": dict(anchor="empty"),
    "sampled": dict(x_t="sampled"),
    "xattn_preserve": dict(preserve="narrow"),
    "noxattn": dict(method="noxattn", lr=1e-4),
    "noxattn_preserve": dict(method="noxattn", lr=1e-4, preserve="narrow"),
    "full": dict(method="full", lr=1e-4),
    "full_preserve": dict(method="full", lr=1e-4, preserve="narrow"),
    "full_preserve_wide": dict(method="full", lr=1e-4, preserve="wide"),
    "full_preserve_blue": dict(
        method="full", lr=1e-4, preserve="narrow", anchor="blue"
    ),  # fmt: skip
}


def generate(pipe, prompts, per_prompt, seed=1) -> torch.Tensor:
    """(P · per_prompt, 3, H, W) in [-1, 1]; row i shows prompts[i // per_prompt]."""
    generator = torch.Generator().manual_seed(seed)
    images = []
    for start in range(0, len(prompts), 50):
        batch = prompts[start : start + 50]
        images.append(pipe(batch, generator=generator, output_type="pt",
                           num_images_per_prompt=per_prompt, **SETTINGS))  # fmt: skip
    return torch.cat(images)


def unrelated(scene) -> bool:
    """Whether a scene holds neither a red object nor a triangle."""
    return not any(o["colour"] == "red" or o["shape"] == "triangle"
                   for o in scene["objects"])  # fmt: skip


def unrelated_prompts(n) -> tuple[list, list, torch.Tensor]:
    """The first n test-scene captions with neither a red object nor a triangle,
    their attrs, and FID's reference: the judge's features of the first n such
    real val images (a reference with red triangles would count their absence)."""
    captions, scenes = evaluation_prompts(4 * n)
    keep = [i for i, scene in enumerate(scenes) if unrelated(scene)][:n]
    val = Shapes("val")
    real = [i for i in range(4 * n) if unrelated(strip_geometry(val.scene(i)[1]))]
    images, _, _ = val.batch(real[:n])
    reference = image_features(images, bundled_judge())
    return [captions[i] for i in keep], [scenes[i] for i in keep], reference


def concept_figures(images, prompts, per_prompt) -> dict:
    """Shares of concept images still red, still triangles, size and position kept;
    and the colours the judge reads on the images' objects."""
    asked = [p for p in prompts for _ in range(per_prompt)]
    right = check(images, asked)
    colours = Counter(o["colour"] for scene in bundled_judge().predict(images)
                      for o in scene["objects"])  # fmt: skip
    return {
        "red": right["colour"].float().mean().item(),
        "triangle": right["shape"].float().mean().item(),
        "size_position": (right["size"] & right["position"]).float().mean().item(),
        "colours": dict(colours.most_common()),
    }


def accuracy(images, prompts, per_prompt) -> float:
    asked = [p for p in prompts for _ in range(per_prompt)]
    return check(images, asked)["scene"].float().mean().item()


def measure(pipe, unrelated) -> tuple[dict, dict]:
    """Every figure of one model, and its images (for the grids).

    Args:
        unrelated: `unrelated_prompts`' captions, attrs and FID reference.
    """
    images = {
        "concept": generate(pipe, CONCEPT, 10),
        "red_other": generate(pipe, RED_OTHER, 4),
        "other_triangles": generate(pipe, OTHER_TRIANGLES, 4),
        "unrelated": generate(pipe, unrelated[0], 1),
    }
    captions, scenes, reference = unrelated
    scores = evaluate_samples(images["unrelated"], captions, scenes, reference)
    figures = {
        "concept": concept_figures(images["concept"], CONCEPT, 10),
        "red_other": accuracy(images["red_other"], RED_OTHER, 4),
        "other_triangles": accuracy(images["other_triangles"], OTHER_TRIANGLES, 4),
        "unrelated_one": scores.get("prompt_accuracy_one_object", float("nan")),
        "unrelated_two": scores.get("prompt_accuracy_two_objects", float("nan")),
        "fid": scores["fid"],
    }
    return figures, images


def preserved(kind) -> list[str]:
    """Preservation prompts: none, PRESERVE ("narrow"), or PRESERVE and the
    captions of the first 30 val scenes without a red object or a triangle
    ("wide"; the unrelated figures are on test scenes)."""
    if kind is None:
        return []
    if kind == "narrow":
        return PRESERVE
    val = Shapes("val")
    scenes = [strip_geometry(val.scene(i)[1]) for i in range(200)]
    return PRESERVE + [canonical_caption(s) for s in scenes if unrelated(s)][:30]


def run_erasure(pipe, name, seed=0) -> tuple:
    """Erase with configuration `name` (`seed`: erase's): (the erased pipeline, CPU
    seconds, losses)."""
    config = BASE | CONFIGS[name]
    anchors = {
        "no red": anchor_prompts(CONCEPT, "red", tokenizer=pipe.tokenizer),
        "blue": anchor_prompts(CONCEPT, "red", "blue", tokenizer=pipe.tokenizer),
        "empty": None,
    }[config["anchor"]]
    preserve = preserved(config["preserve"])
    cpu = time.process_time()
    erased, losses = erase(pipe, CONCEPT, anchors, method=config["method"],
                           lr=config["lr"], x_t=config["x_t"], preserve=preserve,
                           preserve_weight=10.0,
                           images_per_prompt=2 if preserve else 4,
                           seed=seed)  # fmt: skip
    return erased, time.process_time() - cpu, losses


def row(name, figures, seconds) -> str:
    c = figures["concept"]
    cells = [c["red"], c["triangle"], c["size_position"], figures["red_other"],
             figures["other_triangles"], figures["unrelated_one"],
             figures["unrelated_two"]]  # fmt: skip
    text = " ".join(f"{100 * x:6.1f}" for x in cells)
    return f"{name:18s} {text} {figures['fid']:7.2f} {seconds:7.1f}"


def save_grid(images_by_name, path, every):
    """Every `every`-th image, a row per model, enlarged 4×."""
    rows = [images[::every] for images in images_by_name.values()]  # 10 each
    grid = make_grid(torch.cat(rows), ncols=10)
    picture = to_pil(grid[None])[0]
    picture.resize((picture.width * 4, picture.height * 4), 0).save(path)
    print(f"grid: {path}, rows: {', '.join(images_by_name)}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--unrelated", type=int, default=500)
    parser.add_argument("--grid", default="erasing.png")
    parser.add_argument("--seed", type=int, default=0, help="erasure's seed")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(machine())
    pipe = StableDiffusion.from_pretrained("shapes-ldm")
    unrelated = unrelated_prompts(args.unrelated)
    counts = (len(CONCEPT) * 10, len(RED_OTHER) * 4, len(OTHER_TRIANGLES) * 4)
    print("N: concept {}, red other {}, other triangles {}, ".format(*counts)
          + f"unrelated {len(unrelated[0])}")  # fmt: skip
    print(f"{'':18s}  still  still  size+  red    other  unrel. unrel.    FID    CPU")
    print(f"{'model':18s}  red %  tri %  pos %  other% tri. % one %  two %          s")
    base, images = measure(pipe, unrelated)
    print(row("base", base, 0.0), base["concept"]["colours"])
    grids = {"base": images["concept"]}
    damage = {"base": images["red_other"]}
    for name in args.configs.split(","):
        erased, seconds, losses = run_erasure(pipe, name, args.seed)
        figures, images = measure(erased, unrelated)
        print(row(name, figures, seconds), figures["concept"]["colours"])
        grids[name] = images["concept"]
        damage[name] = images["red_other"]
    print(f"(final loss of the last run: {sum(losses[-20:]) / 20:.4f})")
    save_grid(grids, args.grid, 10)  # each concept prompt's first image
    save_grid(damage, args.grid.replace(".png", "_red_other.png"), 12)
    print(machine())


if __name__ == "__main__":
    main()
