"""Checks for the merging, erasing and filtering exercises (lesson 13): a weighted
sum and an add-difference of two checkpoints (integer buffers kept), ESD's target,
and the safety checker's decision rule."""

import torch

from sdscratch.erase import esd_target
from sdscratch.exercises.compare import call, check, diagnose, generator
from sdscratch.merge import add_difference, weighted_sum
from sdscratch.safety import decide


def _state(g, ids) -> dict:
    """A small random state dict: float weights and an integer `position_ids`."""
    return {
        "proj.weight": torch.randn(5, 4, generator=g),
        "proj.bias": torch.randn(5, generator=g),
        "norm.weight": torch.randn(3, generator=g).double(),
        "embeddings.position_ids": ids,  # (1, L) int64, like transformers' CLIP
    }


def _ids(g, length=7) -> torch.Tensor:
    return torch.randperm(length, generator=g)[None]  # (1, L): indices, not weights


def _dict_mistake(got, want: dict, a: dict) -> str | None:
    """A sentence if `got` is not a state dict with `want`'s names and A's dtypes."""
    if not isinstance(got, dict):
        return f"Not yet: return a dict (a state dict), not a {type(got).__name__}."
    if set(got) != set(want):
        missing = sorted(set(want) - set(got)) or sorted(set(got) - set(want))
        return f"Not yet: the names differ from A's, e.g. {missing[0]!r}."
    for key, tensor in got.items():
        if not isinstance(tensor, torch.Tensor):
            return f"Not yet: {key!r} is a {type(tensor).__name__}, not a tensor."
        integer = not a[key].is_floating_point()
        if integer and (tensor.is_floating_point() or not torch.equal(tensor, a[key])):
            return (
                f"Not yet: {key!r} holds integers (indices): keep A's as they are, "
                "never mix them."
            )
        if tensor.dtype != a[key].dtype:
            return (
                f"Not yet: keep A's dtype: {key!r} is {a[key].dtype}, got "
                f"{tensor.dtype}."
            )
    return None


def _flat(state: dict, keys) -> torch.Tensor:
    return torch.cat([state[k].double().flatten() for k in keys])


def _merge_case(name, fn, reference, models, alpha, mistakes):
    """(got, error, want, mistakes) of one merge, the dicts flattened to one vector."""
    want = reference(*[dict(m) for m in models], alpha)
    copies = [{k: v.clone() for k, v in m.items()} for m in models]
    got, error = call(fn, *copies, alpha)
    keys = sorted(want)
    error = error or _dict_mistake(got, want, models[0])
    if error is None and any(not torch.equal(c[k], m[k]) for c, m in
                             zip(copies, models) for k in m):  # fmt: skip
        error = "Not yet: build a new dict; do not change the models given."
    flat = {hint: _flat(w, keys) for hint, w in mistakes.items()}
    return (None if error else _flat(got, keys)), error, _flat(want, keys), flat


def _floats(models, formula) -> dict:
    """Floats mixed by `formula`, A's integers kept."""
    return {k: (formula(*[m[k].double() for m in models]).to(t.dtype)
                if t.is_floating_point() else t)
            for k, t in models[0].items()}  # fmt: skip


def check_weighted_sum(fn) -> None:
    """`fn(a, b, alpha) -> dict`: A1111's weighted sum of two state dicts,
    (1 − α)·A + α·B for every floating-point tensor, in A's dtype; integer tensors
    (position ids, counts) A's as they are."""
    g = generator(16)

    def case(alpha):
        a, b = _state(g, _ids(g)), _state(g, _ids(g))
        mistakes = {
            "α is B's share: (1 − α)·A + α·B.": _floats(
                [a, b], lambda x, y: alpha * x + (1 - alpha) * y),
            "the shares add up to 1: (1 − α)·A + α·B, not A + α·B.": _floats(
                [a, b], lambda x, y: x + alpha * y),
        }  # fmt: skip
        return _merge_case("weighted_sum", fn, weighted_sum, [a, b], alpha, mistakes)

    check("weighted_sum", [case(0.3), case(0.5), case(0.9)])


def check_add_difference(fn) -> None:
    """`fn(a, b, c, alpha) -> dict`: A1111's add difference of three state dicts,
    A + α·(B − C) for every floating-point tensor (B a fine-tune of C: B − C is
    what it learned), in A's dtype; integer tensors A's as they are."""
    g = generator(17)

    def case(alpha):
        a, b, c = (_state(g, _ids(g)) for _ in range(3))
        mistakes = {
            "the difference is B − C (what the fine-tune B learned from C).":
                _floats([a, b, c], lambda x, y, z: x + alpha * (z - y)),
            "scale the difference by α.": _floats(
                [a, b, c], lambda x, y, z: x + (y - z)),
            "add the difference to A: A + α·(B − C).": _floats(
                [a, b, c], lambda x, y, z: alpha * (y - z)),
        }  # fmt: skip
        return _merge_case("add_difference", fn, add_difference, [a, b, c], alpha,
                           mistakes)  # fmt: skip

    check("add_difference", [case(1.0), case(0.5), case(1.5)])


class _ToyUNet(torch.nn.Module):
    """A stand-in for the frozen UNet, ε(x, t, context), that reads all three."""

    def __init__(self, g, channels, width):
        super().__init__()
        self.mix = torch.randn(channels, width, generator=g)  # (C, D)

    def forward(self, x, t, context):
        text = context.mean(1) @ self.mix.T  # (B, C)
        return torch.tanh(x + text[:, :, None, None]) * (t[:, None, None, None] / 1000)


def check_esd_target(fn) -> None:
    """`fn(frozen, x_t, t, context, anchor_context, eta) -> (B, C, h, w)`: ESD's
    target ε*(x_t, a, t) − η·(ε*(x_t, c, t) − ε*(x_t, a, t)), with `frozen(x, t,
    context)` the original UNet's noise prediction (Gandikota et al. 2023)."""
    g = generator(18)

    def case(eta):
        frozen = _ToyUNet(g, 4, 6)
        x = torch.randn(3, 4, 5, 5, generator=g)
        t = torch.randint(1, 1000, (3,), generator=g)
        c, a = torch.randn(2, 3, 7, 6, generator=g)  # (B, L, D) each
        want = esd_target(frozen, x, t, c, a, eta)
        eps_c, eps_a = frozen(x, t, c), frozen(x, t, a)
        mistakes = {
            "guide away from the concept: subtract η·(ε(c) − ε(a)), do not add it.":
                eps_a + eta * (eps_c - eps_a),
            "start from the anchor's prediction ε(a), not the concept's.":
                eps_c - eta * (eps_c - eps_a),
            "scale the difference by η.": eps_a - (eps_c - eps_a),
            "the difference is ε(c) − ε(a), the concept's minus the anchor's.":
                eps_a - eta * (eps_a - eps_c),
        }  # fmt: skip
        got, error = call(fn, frozen, x, t, c, a, eta)
        return got, error, want, mistakes

    check("esd_target", [case(1.0), case(0.5), case(2.0)])


def check_decide(fn) -> None:
    """`fn(image_embeds, concept_embeds, thresholds) -> (scores, flagged)`: SD's
    safety checker's rule, scores (B, K) = cos(image, concept) − threshold rounded
    to 3 decimals, flagged (B,) where any score is above 0."""
    g = generator(19)

    def mistake(b, k, e) -> str | None:
        images = torch.randn(b, e, generator=g) * 3  # not unit vectors
        concepts = torch.randn(k, e, generator=g)
        cos = (
            torch.nn.functional.normalize(images, dim=-1)
            @ torch.nn.functional.normalize(concepts, dim=-1).T
        )  # (B, K)
        thresholds = torch.rand(k, generator=g) * 0.3
        thresholds[0] = cos[0, 0]  # image 0 scores exactly 0 there: not flagged
        scores, flagged = decide(images, concepts, thresholds)
        mistakes = {
            "a cosine, not a dot product: normalise both to unit length first.":
                (images @ concepts.T - thresholds).round(decimals=3),
            "round each score to 3 decimals, as diffusers does.": cos - thresholds,
            "the score is cos − threshold, each concept's own.":
                cos.round(decimals=3),
        }  # fmt: skip
        got, error = call(fn, images, concepts, thresholds)
        return error or _decide_mistake(got, scores, flagged, mistakes)

    for b, k, e in ((64, 1, 8), (64, 3, 8), (50, 2, 16)):
        sentence = mistake(b, k, e)
        if sentence:
            print(f"decide: {sentence}")
            return
    print("decide: right on all 3 random tests.")


def _decide_mistake(got, scores, flagged, mistakes) -> str | None:
    if not (isinstance(got, tuple) and len(got) == 2):
        return "Not yet: return two things, (scores, flagged)."
    got_scores, got_flagged = got
    sentence = diagnose(got_scores, scores, mistakes)
    if sentence:
        return sentence
    got_flagged = torch.as_tensor(got_flagged)
    if got_flagged.shape != flagged.shape:
        return (f"Not yet: flagged has shape {tuple(got_flagged.shape)}, expected "
                f"{tuple(flagged.shape)}: one flag per image.")  # fmt: skip
    if torch.equal(got_flagged.bool(), (scores > 0).all(1)) and not torch.equal(
        flagged, (scores > 0).all(1)
    ):
        return "Not yet: an image is flagged if *any* of its scores is above 0."
    if torch.equal(got_flagged.bool(), (scores >= 0).any(1)) and not torch.equal(
        flagged, (scores >= 0).any(1)
    ):
        return "Not yet: a score of exactly 0 is not above 0: flag where score > 0."
    if not torch.equal(got_flagged.bool(), flagged):
        return "Not yet: the flags are wrong: flag an image where any score > 0."
    return None
