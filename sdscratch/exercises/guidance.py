"""Checks for the guidance exercises beyond the formula: the doubled batch that
gives both predictions in one UNet call, and guidance rescale (lesson 07)."""

import torch

from sdscratch.exercises.compare import call, check, generator
from sdscratch.pipeline import classifier_free_guidance, rescale_guidance


def _toy_unet(g, calls):
    """A small fixed `unet(x, t, context) -> ε` that counts its calls: each
    sample's values mixed by a seeded map, shifted by its context and t."""
    weights = torch.randn(4, 4, generator=g) / 2

    def unet(x, t, context):
        calls.append(len(x))
        mixed = torch.einsum("bchw,cd->bdhw", x, weights)  # (B, C, H, W)
        shift = context.mean(dim=(1, 2)) + t / 1000  # (B,)
        return mixed + shift[:, None, None, None]

    return unet


def check_guided_noise(fn) -> None:
    """`fn(unet, x, t, context, uncond_context, guidance_scale) -> eps`: guided
    noise from ONE call of `unet(x, t, context)` on the doubled batch (x twice,
    t twice, the negative or empty prompts' hidden states then the prompts'),
    split into ε(x, ∅) and ε(x, c) and combined as ε_∅ + w (ε_c - ε_∅).
    x (B, C, H, W), t (B,), contexts (B, L, D)."""
    g = generator(17)

    def case(w):
        calls = []
        unet = _toy_unet(g, calls)
        x = torch.randn(3, 4, 6, 6, generator=g)
        t = torch.randint(0, 1000, (3,), generator=g)
        context, uncond = torch.randn(2, 3, 5, 8, generator=g)
        want = classifier_free_guidance(unet, context, uncond, w)(x, t)
        swapped = classifier_free_guidance(unet, uncond, context, w)(x, t)
        mistakes = {
            "the halves come back in the order they were stacked: "
            "[uncond_context, context] gives ε(x, ∅) first.": swapped,
        }
        calls.clear()
        got, error = call(fn, unet, x, t, context, uncond, w)
        if error is None and calls != [2 * len(x)]:
            error = (
                "Not yet: call the UNet once, on the doubled batch of "
                f"{2 * len(x)} (it was called on batches of {calls})."
            )
        return got, error, want, mistakes

    return check("guided_noise", [case(7.5), case(2.0)])


def check_rescale_guidance(fn) -> None:
    """`fn(guided, eps_text, guidance_rescale) -> eps`: guidance rescale (Lin et
    al. 2023, §3.4): ε̃ rescaled to the standard deviation of ε(x, c), per
    sample over (C, H, W), then blended, φ · rescaled + (1 - φ) · ε̃."""
    g = generator(18)

    def case(phi):
        spread = torch.tensor([0.5, 1.0, 2.0])[:, None, None, None]  # per sample
        text = torch.randn(3, 4, 6, 6, generator=g) * spread
        uncond = torch.randn(3, 4, 6, 6, generator=g) * spread
        guided = uncond + 7.5 * (text - uncond)
        dims = (1, 2, 3)
        ratio = text.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True)
        whole = guided * text.std() / guided.std()
        mistakes = {
            "take the standard deviations per sample, over (C, H, W), not over "
            "the whole batch.": phi * whole + (1 - phi) * guided,
            "scale ε̃ by σ(ε_c) / σ(ε̃), towards the conditional prediction's "
            "spread.": phi * guided / ratio + (1 - phi) * guided,
            "blend the two: φ · rescaled + (1 - φ) · ε̃.": guided * ratio,
            "φ weighs the rescaled prediction: φ · rescaled + (1 - φ) · ε̃.":
                (1 - phi) * guided * ratio + phi * guided,
        }  # fmt: skip
        got, error = call(fn, guided.clone(), text.clone(), phi)
        return got, error, rescale_guidance(guided, text, phi), mistakes

    return check("rescale_guidance", [case(0.7), case(0.3)])
