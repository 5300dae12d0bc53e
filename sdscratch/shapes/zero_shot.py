"""CLIP's zero-shot accuracy on Shapes: does the true caption score highest?

Radford et al. 2021 (CLIP §3.1) classify an image zero-shot by scoring it against
one caption per class. A Shapes scene's caption names every attribute, so the
questions can be precise: the true caption against the same caption with one
attribute changed, or, for two objects, with their relation, their order or their
colours (the binding of attribute to object) changed.
"""

import functools

import torch

from sdscratch.clip import CLIP
from sdscratch.shapes.data import (
    COLOURS,
    POSITIONS,
    RELATIONS,
    SHAPES,
    SIZES,
    canonical_caption,
    strip_geometry,
)


def caption_choices(attrs: dict) -> dict[str, list[str]]:
    """The zero-shot questions about one Shapes scene: name -> [true caption, wrong
    captions...], all canonical captions.

    One object: its "shape", "colour", "size" or "position" changed (one question
    each), and "one_object_caption": all 360 one-object captions. Two objects:
    "relation" (the other three), "order" (the two objects swapped), "binding"
    (their colours swapped) and "two_object_caption" (every one-word change, and
    those swaps).
    """
    attrs = strip_geometry(attrs)
    truth = canonical_caption(attrs)
    questions = {}
    for name, edits in scene_edits(attrs).items():
        wrong = {canonical_caption(edit) for edit in edits} - {truth}
        if wrong:
            questions[name] = [truth, *sorted(wrong)]
    if attrs["relation"] is None:
        questions["one_object_caption"] = [truth, *_one_object_captions() - {truth}]
    return questions


@functools.cache
def _one_object_captions() -> frozenset:
    return frozenset(
        canonical_caption({"objects": [obj], "relation": None})
        for obj in (
            {"shape": a, "colour": b, "size": c, "position": d}
            for a in SHAPES
            for b in COLOURS
            for c in SIZES
            for d in POSITIONS
        )
    )


def scene_edits(attrs: dict) -> dict[str, list[dict]]:
    """Scenes that differ from `attrs` in one way, grouped by question (their
    captions only: positions are not updated when the relation changes)."""
    values = {"shape": SHAPES, "colour": COLOURS, "size": SIZES, "position": POSITIONS}
    objects, relation = attrs["objects"], attrs["relation"]

    def changed(i, key, value):
        copy = [dict(obj) for obj in objects]
        copy[i][key] = value
        return {"objects": copy, "relation": relation}

    if relation is None:
        return {key: [changed(0, key, v) for v in vals] for key, vals in values.items()}
    first, second = objects
    swapped = [
        {**first, "colour": second["colour"]},
        {**second, "colour": first["colour"]},
    ]
    edits = {
        "relation": [{"objects": objects, "relation": r} for r in RELATIONS],
        "order": [{"objects": [second, first], "relation": relation}],
        "binding": [{"objects": swapped, "relation": relation}],
    }
    one_word = [
        changed(i, key, v)
        for i in (0, 1)
        for key in ("shape", "colour", "size")
        for v in values[key]
    ]
    swaps = edits["relation"] + edits["order"] + edits["binding"]
    edits["two_object_caption"] = one_word + swaps
    return edits


@torch.no_grad()
def zero_shot_accuracy(clip: CLIP, images: torch.Tensor, scenes: list) -> dict:
    """How often the true caption of a held-out Shapes image scores highest.

    Args:
        clip: a `CLIP` with its tokenizer.
        images: (N, 3, H, W) Shapes images in [-1, 1].
        scenes: their N attrs dicts.
    Returns:
        {question: {"accuracy": share right, "chance": expected share by guessing,
        "n": number of scenes asked}} for the questions of `caption_choices`.
    """
    questions = [caption_choices(attrs) for attrs in scenes]
    captions = sorted({c for q in questions for choices in q.values() for c in choices})
    row = {caption: i for i, caption in enumerate(captions)}
    device = clip.logit_scale.device
    ids = clip.tokenizer(captions).to(device)  # (C, L)
    text = torch.cat([clip.text_encoder.embed(x) for x in ids.split(1024)])  # (C, E)
    image = torch.cat([clip.image_encoder(x.to(device)) for x in images.split(512)])
    hits, chance = {}, {}
    for i, question in enumerate(questions):
        for name, choices in question.items():
            scores = text[[row[c] for c in choices]] @ image[i]  # (len(choices),)
            hits.setdefault(name, []).append(scores.argmax().item() == 0)
            chance.setdefault(name, []).append(1 / len(choices))
    return {
        name: {
            "accuracy": round(sum(hits[name]) / len(hits[name]), 4),
            "chance": round(sum(chance[name]) / len(chance[name]), 4),
            "n": len(hits[name]),
        }
        for name in hits
    }
