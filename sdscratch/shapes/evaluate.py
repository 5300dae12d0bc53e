"""Evaluating a text-to-image model on Shapes: prompt accuracy, the outline measure,
FID, Inception Score and CLIP score.

The convention: prompts come from the test split, the real images FID compares
against from the val split, so a perfect generator scores the real-vs-real floor,
FID(test[:n], val[:n]). The Inception Score and the outline IoU of the prompts' own
real scenes, test[:n], are what a perfect generator scores on those.
`evaluate_model` is the one evaluation path: what `python -m sdscratch evaluate`
prints, and what the ldm recipe writes into its manifest.
"""

import random
import time

import torch
from einops import rearrange
from tqdm.auto import tqdm

from sdscratch.metrics import (
    as_tensor,
    bundled_clip,
    clip_score,
    frechet_distance,
    inception_score,
)
from sdscratch.pipeline import StableDiffusion
from sdscratch.samplers import noise_levels
from sdscratch.shapes.data import (
    COLOURS,
    HELDOUT_TEMPLATES,
    POSITIONS,
    SHAPES,
    SIZES,
    Shapes,
    canonical_caption,
    parse_caption,
    plain_caption,
    strip_geometry,
)
from sdscratch.shapes.judge import attribute_accuracy, bundled_judge, image_features
from sdscratch.shapes.outline import outline_accuracy, read_objects

IS_SPLITS = 10  # the Inception Score's splits (Salimans et al. 2016's)

# ----------------------------------------------------------------------------------
# Real images and prompts


def real_images(n, split="val", seed=0, offset=0, size=32) -> tuple:
    """Scenes offset … offset + n − 1 of a Shapes split: (images, captions, attrs),
    images (n, 3, size, size)."""
    return Shapes(split, size=size, seed=seed).batch(range(offset, offset + n))


def real_features(n, split="val", seed=0, offset=0, judge=None) -> torch.Tensor:
    """The judge's features (n, hidden) of n real scenes of a split, drawn in chunks
    at the size the judge reads."""
    judge = judge or bundled_judge()
    size, chunks = judge.config.image_size, []
    for start in range(offset, offset + n, 1000):
        count = min(1000, offset + n - start)
        images, _, _ = real_images(count, split, seed, start, size)
        chunks.append(image_features(images, judge))
    return torch.cat(chunks)


def fid_floor(n, judge=None, seed=0) -> float:
    """FID between two disjoint sets of n real images (test[:n] and val[:n]).

    What a perfect generator scores at this n: FID is biased upwards at small n
    (Chong & Forsyth 2020), so a model's FID means something only next to this.
    """
    test = real_features(n, "test", seed, judge=judge)
    return frechet_distance(test, real_features(n, "val", seed, judge=judge))


PROMPT_SETS = ("full", "underspecified", "heldout")


def evaluation_prompts(
    n, objects=None, split="test", seed=0, prompts="full"
) -> tuple[list, list]:
    """n evaluation prompts and what each asks: (captions, attrs).

    Args:
        n: the number of prompts.
        objects: 1 or 2 to keep only prompts with that many objects; None: all.
        split: the Shapes split whose scenes "full" and "heldout" prompts describe.
        seed: Shapes' seed of the scenes (the course's dataset: 0); for
            "underspecified", the seed of the draws.
        prompts: which set. "full": canonical captions of the split's first
            scenes, naming every attribute ("a small red circle on the left").
            "underspecified": one-object prompts that leave out the size, the
            position or both, and at random the article ("a red circle",
            "a large blue star", "green triangle on the left"), drawn uniformly
            over those three patterns and every shape, colour, size and position.
            "heldout": the split's scenes in phrasings no training caption uses
            (`HELDOUT_TEMPLATES`, taken in turn), every attribute named.
    Returns:
        n captions and their attrs without geometry, as `parse_caption` reads each
        caption (None: left out, any value): what `prompt_accuracy` checks.
    """
    if prompts not in PROMPT_SETS:
        raise ValueError(f"Unknown prompts {prompts!r}; choose one of {PROMPT_SETS}.")
    if prompts == "underspecified":
        if objects not in (None, 1):
            raise ValueError("Underspecified prompts have one object each.")
        captions = _underspecified(n, seed)
    else:
        captions = _scene_prompts(n, objects, split, seed, prompts == "heldout")
    return captions, [parse_caption(text) for text in captions]


def _scene_prompts(n, objects, split, seed, heldout) -> list[str]:
    """Captions of the first n scenes of a split (with `objects` objects): canonical,
    or each in the next held-out phrasing for its number of objects."""
    dataset, captions = Shapes(split, seed=seed), []
    for i in range(len(dataset)):
        if len(captions) == n:
            break
        attrs = strip_geometry(dataset.scene(i)[1])
        count = len(attrs["objects"])
        if objects is None or count == objects:
            if heldout:
                templates = HELDOUT_TEMPLATES[count]
                template = templates[len(captions) % len(templates)]
                captions.append(plain_caption(attrs, template=template))
            else:
                captions.append(canonical_caption(attrs))
    if len(captions) < n:
        raise ValueError(f"The {split} split has only {len(captions)} such scenes.")
    return captions


def _underspecified(n, seed) -> list[str]:
    """n one-object prompts that leave out size, position or both (see above)."""
    rng = random.Random(f"underspecified/{seed}")
    captions = []
    for _ in range(n):
        omit = rng.choice(("size", "position", "both"))
        obj = {
            "shape": rng.choice(SHAPES),
            "colour": rng.choice(tuple(COLOURS)),
            "size": None if omit != "position" else rng.choice(tuple(SIZES)),
            "position": None if omit != "size" else rng.choice(tuple(POSITIONS)),
        }
        attrs = {"objects": [obj], "relation": None}
        captions.append(plain_caption(attrs, article=rng.random() < 0.5))
    return captions


# ----------------------------------------------------------------------------------
# The judge's classes, for the Inception Score


def class_names(judge=None) -> list[str]:
    """The K classes of `class_posteriors` in order: "red circle", "orange circle",
    …, every colour the judge reads for each shape it reads in turn."""
    values = (judge or bundled_judge()).attributes
    return [f"{colour} {shape}" for shape in values["shape"] for colour in
            values["colour"]]  # fmt: skip


@torch.no_grad()
def class_posteriors(images, judge=None, batch_size=500) -> torch.Tensor:
    """The judge's class posteriors p(y|x), where a class is a shape and a colour.

    The judge reads shape and colour at each of five positions; the class of an
    object is its (shape, colour) pair, with p(shape, colour) = p(shape) · p(colour)
    from the judge's two heads at its position. An image's posterior is its
    objects' posteriors mixed with weights p(an object at s) normalised over the
    positions: "the class of an object picked from the image". A one-object image
    thus has its object's posterior, a two-object image the mean of two (at best
    ½ and ½ on two classes), as an Inception-v3 posterior of a photograph with two
    things in it is split between them. What the Inception Score
    (`sdscratch.metrics.inception_score`) reads on Shapes.

    Args:
        images: (N, 3, H, W) in [-1, 1], or N PIL images.
        judge: a `Judge` (default: the bundled one, whose 7 shapes × 7 colours,
            the novel heart and pink among them, make K = 49 classes).
    Returns:
        (N, K) float32 on the CPU, rows summing to 1, classes as `class_names`.
    """
    judge = judge or bundled_judge()
    device = next(judge.parameters()).device
    chunks = []
    for batch in as_tensor(images).split(batch_size):
        logits = judge(batch.to(device))  # {attribute: (B, slots, values)}
        # p(present at s) / Σ_s' p(present at s'), in log space: safe when all ≈ 0
        weight = logits["present"].log_softmax(-1)[..., 1].softmax(-1)  # (B, S)
        shape = logits["shape"].softmax(-1)  # (B, S, shapes)
        colour = logits["colour"].softmax(-1)  # (B, S, colours)
        joint = torch.einsum("bs,bsi,bsj->bij", weight, shape, colour)
        chunks.append(rearrange(joint, "b i j -> b (i j)").cpu())  # (B, K)
    return torch.cat(chunks)


# ----------------------------------------------------------------------------------
# The outline measure on prompts


def outline_scores(images, scenes, reads=None) -> dict[str, float]:
    """The outline measure's prompt accuracy (one- and two-object prompts apart)
    and the mean outline IoU of the requested objects (`outline_accuracy`).

    A prompt that leaves an attribute out (None) accepts what the outline reads
    (`sdscratch.shapes.outline.outline_check`): an object without a position is the
    image's one object (if the outline reads exactly one; else none, so it scores
    IoU 0, as a missing object does).

    Args:
        images: (N, 3, H, W) in [-1, 1], or N PIL images.
        scenes: N attrs or captions: what was asked.
        reads: `read_objects(images)`, if already made.
    Returns:
        {"outline_accuracy_one_object": float, "outline_accuracy_two_objects":
         float (each only if there are such prompts), "outline_iou": float}.
    """
    images = as_tensor(images)
    reads = read_objects(images) if reads is None else reads
    scenes = [parse_caption(s) if isinstance(s, str) else s for s in scenes]
    result = {}
    for count, name in ((1, "one_object"), (2, "two_objects")):
        keep = [i for i, attrs in enumerate(scenes) if len(attrs["objects"]) == count]
        if keep:
            picked = [scenes[i] for i in keep], [reads[i] for i in keep]
            right = outline_accuracy(images[keep], *picked)
            result[f"outline_accuracy_{name}"] = right["scene"]
    result["outline_iou"] = outline_accuracy(images, scenes, reads)["mean_iou"]
    return result


# ----------------------------------------------------------------------------------
# Everything at once


def evaluate_samples(
    images, captions, scenes, reference=None, judge=None, clip=None, fid=True
):
    """Prompt accuracy by the judge and by the outline (one- and two-object
    prompts apart), the mean outline IoU, FID, Inception Score and CLIP score.

    Args:
        images: N generated images ((N, 3, H, W) in [-1, 1] or PIL), image i for
            prompt i.
        captions: the N prompts.
        scenes: their N attrs (what `evaluation_prompts` returns).
        reference: (M, hidden) features of real images for FID (default: the first
            N of the val split); compare the FID with `fid_floor(N)`.
        judge, clip: a `Judge` and a `CLIP` (default: the bundled ones).
        fid: False to leave FID out (when the prompts do not describe scenes
            distributed as the reference's, FID measures nothing).
    Returns:
        {"prompt_accuracy_one_object": float, "prompt_accuracy_two_objects": float,
         "attributes_one_object": {attribute: float}, "attributes_two_objects": …,
         `outline_scores`' figures, "fid": float, "inception_score" and
         "inception_score_std": floats (`IS_SPLITS` splits, fewer if N is
         smaller; on `class_posteriors`), "clip_score": float}.
    """
    images = as_tensor(images)
    judge = judge or bundled_judge()
    if fid and reference is None:
        reference = real_features(len(images), "val", judge=judge)
    result = {}
    for count, name in ((1, "one_object"), (2, "two_objects")):
        keep = [i for i, attrs in enumerate(scenes) if len(attrs["objects"]) == count]
        if keep:
            right = attribute_accuracy(images[keep], [scenes[i] for i in keep], judge)
            result[f"prompt_accuracy_{name}"] = right["scene"]
            result[f"attributes_{name}"] = right
    result |= outline_scores(images, scenes)
    if fid:
        result["fid"] = frechet_distance(image_features(images, judge), reference)
    splits = min(IS_SPLITS, len(images))
    score = inception_score(class_posteriors(images, judge), splits)
    result["inception_score"], result["inception_score_std"] = score
    result["clip_score"] = clip_score(images, captions, clip)
    return result


def evaluate_model(
    model="shapes-ldm",
    samples=1000,
    sampler="ddim",
    num_inference_steps=20,
    guidance_scale=7.5,
    seed=0,
    batch_size=50,
    scenes=0,
    prompts="full",
    judge=None,
    clip=None,
    progress=True,
) -> dict:
    """Generate one image for each of the first `samples` test prompts, and score them.

    The prompts are `evaluation_prompts` (one- and two-object scenes as the test
    split mixes them); FID compares with the first `samples` val images and is
    reported next to `fid_floor(samples)`. All the noise comes from one generator
    seeded with `seed`, batch after batch, so with a deterministic sampler (ddim)
    the images do not depend on `batch_size`.

    Args:
        model: a `StableDiffusion`, or a bundled name or folder to load one from.
        samples: N, the number of prompts and images.
        sampler, num_inference_steps, guidance_scale: the pipeline's.
        seed: seeds the one generator of all the noise.
        batch_size: prompts per pipeline call.
        scenes: Shapes' seed of the prompts' and the real images' scenes (the
            course's dataset: 0).
        prompts: the prompt set, "full", "underspecified" or "heldout" (see
            `evaluation_prompts`). Underspecified prompts describe no test scenes,
            so they get no FID and no real reference.
        judge, clip: a `Judge` and a `CLIP` (default: the bundled ones).
    Returns:
        `evaluate_samples`' figures, plus "fid_floor" and `real_reference`'s
        figures (what a perfect model scores), the numbers of one- and
        two-object prompts, and "seconds_per_image" and "cpu_seconds_per_image" of
        the generation alone (CPU seconds are summed over threads).
    """
    if samples < 2:
        raise ValueError("FID needs at least two images: ask for 2 samples or more.")
    if not guidance_scale >= 0:
        raise ValueError(f"guidance_scale must be 0 or more, got {guidance_scale!r}.")
    pipe = model
    if not isinstance(pipe, StableDiffusion):
        pipe = StableDiffusion.from_pretrained(model)
    noise_levels(sampler, num_inference_steps, pipe.schedule)  # a bad sampler: now
    judge = judge or bundled_judge()
    clip = clip or bundled_clip()  # loaded (and checked) before the long part
    captions, attrs = evaluation_prompts(samples, seed=scenes, prompts=prompts)
    generator = torch.Generator().manual_seed(seed)
    settings = dict(num_inference_steps=num_inference_steps,
                    guidance_scale=guidance_scale, sampler=sampler)  # fmt: skip
    images, wall, cpu = generate_images(
        pipe, captions, generator, batch_size, progress, **settings
    )  # (N, 3, H, W)
    counts = [len(scene["objects"]) for scene in attrs]
    return {
        "one_object_prompts": counts.count(1),
        "two_object_prompts": counts.count(2),
        **_scores(
            images, captions, attrs, scenes, prompts != "underspecified", judge, clip
        ),  # fmt: skip
        "seconds_per_image": wall / samples,
        "cpu_seconds_per_image": cpu / samples,
    }


def _scores(images, captions, attrs, scenes, fid, judge, clip) -> dict:
    """`evaluate_samples`' figures and, with `fid`, the FID floor at the same N and
    the real reference."""
    if not fid:
        return evaluate_samples(images, captions, attrs, None, judge, clip, fid=False)
    n = len(images)
    reference = real_features(n, "val", scenes, judge=judge)  # (N, hidden)
    result = evaluate_samples(images, captions, attrs, reference, judge, clip)
    test = real_features(n, "test", scenes, judge=judge)  # the prompts' own scenes
    result["fid_floor"] = frechet_distance(test, reference)
    return result | real_reference(n, seed=scenes, size=images.shape[-1], judge=judge)


def real_reference(n, seed=0, size=32, judge=None) -> dict[str, float]:
    """The Inception Score and the mean outline IoU of the prompts' own real
    scenes (test[:n], drawn at `size` pixels): what a perfect generator scores.

    Like FID, the Inception Score depends on N (each split estimates p(y) from
    N / 10 images), so a model's is quoted next to this at the same N.

    Args:
        n: the number of prompts (and real scenes).
        seed: the Shapes seed of the test split the prompts came from.
        size: the scenes' side in pixels, the generated images'.
        judge: a `Judge` (default: the bundled one).
    Returns:
        {"inception_score_real": float, "outline_iou_real": float}.
    """
    images, _, scenes = real_images(n, "test", seed, size=size)
    posteriors = class_posteriors(images, judge)
    return {
        "inception_score_real": inception_score(posteriors, min(IS_SPLITS, n))[0],
        "outline_iou_real": outline_accuracy(images, scenes)["mean_iou"],
    }


def generate_images(pipe, captions, generator, batch_size, progress, **settings):
    """The pipeline's image for each caption, batch after batch from one generator.

    Returns:
        images (N, 3, H, W) in [-1, 1] on the CPU, and the wall-clock and CPU
        seconds it took.
    """
    wall, cpu = time.perf_counter(), time.process_time()
    starts = range(0, len(captions), batch_size)
    images = torch.cat([
        pipe(captions[start : start + batch_size], generator=generator,
             output_type="pt", **settings).cpu()
        for start in tqdm(starts, desc="evaluate", disable=not progress)
    ])  # fmt: skip
    return images, time.perf_counter() - wall, time.process_time() - cpu
