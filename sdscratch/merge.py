"""Checkpoint merging: one model from two or three, number by number.

The two recipes of A1111's checkpoint merger, which much of the SD community's
models are made with:

- weighted sum: (1 - α)·A + α·B, a point on the line between two fine-tunes of the
  same base (α = 0: A, α = 1: B);
- add difference: A + α·(B - C), where B is a fine-tune of C: B - C is what the
  fine-tune learned, added to another model A (e.g. C = SD v1.5, B = an inpainting
  or a style fine-tune of it, A = another fine-tune of SD v1.5).

Only floating-point weights are mixed. Integer and boolean tensors (transformers'
`position_ids`, BatchNorm's `num_batches_tracked`) are counts and indices: A's are
kept as they are, never averaged (an average of indices is no index).

A LoRA merged into a model (`LoRA.merge`) is the add-difference special case
A + α·ΔW with the LoRA's own ΔW: `add_difference(base, base + LoRA, base, α)` is the
base with the LoRA at scale α.
"""

import copy

import torch

METHODS = ("weighted_sum", "add_difference")


class MergeError(ValueError):
    """Models that cannot be merged (other names, other shapes)."""


def weighted_sum(a: dict, b: dict, alpha=0.5) -> dict:
    """(1 - α)·A + α·B for every floating tensor; A's integer tensors as they are.

    Args:
        a, b: state dicts of the same architecture.
        alpha: B's share, 0 (all A) to 1 (all B).
    Returns:
        A new state dict, in A's dtypes.
    """
    return merge_state_dicts(a, b, alpha=alpha, method="weighted_sum")


def add_difference(a: dict, b: dict, c: dict, alpha=1.0) -> dict:
    """A + α·(B - C) for every floating tensor; A's integer tensors as they are."""
    return merge_state_dicts(a, b, c, alpha=alpha, method="add_difference")


def merge_state_dicts(a, b, c=None, alpha=0.5, method="weighted_sum") -> dict:
    """Merge state dicts by `method` ("weighted_sum": A, B; "add_difference": A, B, C).

    Every tensor is mixed in float32 and stored back in A's dtype.
    """
    if method not in METHODS:
        raise MergeError(f"Unknown merge method {method!r}; choose one of {METHODS}.")
    if (method == "add_difference") != (c is not None):
        raise MergeError(
            "add_difference merges three models (A, B, C), weighted_sum two."
        )
    others = [b] if c is None else [b, c]
    check_compatible(a, *others)
    merged = {}
    for key, tensor in a.items():
        if not (tensor.is_floating_point() or tensor.is_complex()):
            merged[key] = tensor.clone()  # an index or a count: A's, not averaged
            continue
        x, y = tensor.float(), b[key].to(tensor.device, torch.float32)
        if method == "weighted_sum":
            mixed = (1 - alpha) * x + alpha * y
        else:
            z = c[key].to(tensor.device, torch.float32)
            mixed = x + alpha * (y - z)
        merged[key] = mixed.to(tensor.dtype)
    return merged


def check_compatible(a: dict, *others: dict):
    """Refuse, with one sentence, state dicts with other names or shapes than A's."""
    for other in others:
        missing, extra = a.keys() - other.keys(), other.keys() - a.keys()
        if missing or extra:
            key = sorted(missing or extra)[0]
            where = "the first model" if extra else "another model"
            raise MergeError(
                f"The models are not the same architecture: {key!r} is missing from "
                f"{where} ({len(missing) + len(extra)} names differ)."
            )
        for key, tensor in a.items():
            if other[key].shape != tensor.shape:
                raise MergeError(
                    f"The models are not the same size: {key!r} is "
                    f"{tuple(tensor.shape)} in one and {tuple(other[key].shape)} in "
                    "another."
                )


def merge_models(a, b, c=None, alpha=0.5, method="weighted_sum"):
    """A new model like `a` (built from its config: no hooks, no attached LoRA)
    holding the merge of `a`, `b` (and `c`)'s weights."""
    states = [m.state_dict() for m in (a, b, c) if m is not None]
    merged = merge_state_dicts(*states[:2], *states[2:], alpha=alpha, method=method)
    if not hasattr(a, "config"):  # not one of ours: a copy (hooks and all)
        model = copy.deepcopy(a)
        model.load_state_dict(merged, strict=True)
        return model
    with torch.device("meta"):
        model = type(a)(copy.deepcopy(a.config))
    model.load_state_dict(merged, strict=True, assign=True)
    return model.train(a.training)


def merge_pipelines(a, b, c=None, alpha=0.5, method="weighted_sum",
                    components=("unet", "text_encoder", "vae")):  # fmt: skip
    """A new `StableDiffusion`: `a`'s copy with the listed models merged.

    Args:
        a, b, c: pipelines of one architecture (c only for "add_difference").
        alpha: α of the method.
        method: "weighted_sum" or "add_difference".
        components: which models to merge (A1111 merges all three; the others
            stay A's).
    """
    pipe = copy.copy(a)  # the models not merged are A's own, shared
    pipe.__dict__.pop("loras", None)  # a LoRA attached to A is not the merge's
    pipe.tokenizer = copy.deepcopy(a.tokenizer)
    for name in components:
        parts = [getattr(p, name) for p in (a, b, c) if p is not None]
        merged = merge_models(*parts[:2], *parts[2:], alpha=alpha, method=method)
        setattr(pipe, name, merged)
    return pipe
