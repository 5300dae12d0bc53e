"""How a check works: call the learner's function, compare, diagnose, say.

A check calls the learner's function on seeded random inputs and compares the result
with the package's. A wrong result is compared with the usual mistakes (a missing
square root, a wrong sign, the wrong timestep): if it equals one of them, that
mistake's hint is printed. Nothing here raises: a learner's exception becomes one
sentence.
"""

import types

import torch

from sdscratch.schedules import NoiseSchedule

NOT_DONE = "Not done yet: replace `raise NotImplementedError` with your code and run "
NOT_DONE += "this cell again."


def call(fn, *args):
    """(result, None), or (None, the sentence saying why there is no result)."""
    try:
        return fn(*args), None
    except NotImplementedError:
        return None, NOT_DONE
    except Exception as error:  # a learner's bug: one sentence, not a traceback
        message = str(error).strip().splitlines()[0] if str(error).strip() else ""
        return None, f"Your function raised {type(error).__name__}: {message}"


def same(got, want, atol=1e-5) -> bool:
    """Equal values: tensors within float32 rounding, anything else exactly."""
    if isinstance(want, torch.Tensor):
        got = torch.as_tensor(got)
        if got.shape != want.shape:
            return False
        return torch.allclose(got.double(), want.double(), rtol=1e-4, atol=atol)
    return got == want


def diagnose(got, want, mistakes: dict, atol=1e-5) -> str | None:
    """None if `got` is right; else a sentence: the matching mistake's hint, a
    shape or type mismatch, or how far off it is."""
    if same(got, want, atol):
        return None
    for hint, wrong in mistakes.items():
        if same(got, wrong, atol):
            return f"Not yet: {hint}"
    if isinstance(want, torch.Tensor):
        if isinstance(got, (int, float)) and want.ndim == 0:  # a number will do
            got = torch.tensor(float(got))
        elif not isinstance(got, torch.Tensor):
            return f"Not yet: return a tensor, not a {type(got).__name__}."
        if got.shape != want.shape:
            return (
                f"Not yet: the result has shape {tuple(got.shape)}, expected "
                f"{tuple(want.shape)}."
            )
        error = (got.double() - want.double()).abs().max().item()
        return (
            f"Not yet: the result is off by up to {error:.3g}; compare with the "
            "formula above."
        )
    return f"Not yet: got {got!r}, expected {want!r}."


def check(name: str, cases, atol=1e-5) -> None:
    """Run `cases` (an iterable of (result, error sentence, want, mistakes)) and
    print one sentence: the first failure, or that all passed. Nothing is returned,
    so a notebook shows the sentence alone.

    Args:
        atol: the absolute tolerance (float32 rounding of the package's formula).
    """
    count = 0
    for got, error, want, mistakes in cases:
        sentence = error or diagnose(got, want, mistakes, atol)
        if sentence:
            print(f"{name}: {sentence}")
            return
        count += 1
    print(f"{name}: right on all {count} random tests.")


def generator(seed=0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def sd_schedule():

    return NoiseSchedule.scaled_linear()


def levels(abar, abar_prev):
    """The two ᾱ's of one sampler step, in the form the package's steps read."""
    return types.SimpleNamespace(alphas_cumprod=torch.tensor([abar, abar_prev]))
