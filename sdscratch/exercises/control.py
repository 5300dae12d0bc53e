"""Checks for the ControlNet exercises (lesson 14): a zero convolution, the control
residuals added to the UNet's skips, and the steps a guidance window steers."""

import torch
from torch import nn

from sdscratch.controlnet import guidance_window, scale_residuals, zero_conv
from sdscratch.exercises.compare import call, check, generator, same


def check_zero_conv(fn) -> None:
    """`fn(in_channels, out_channels) -> nn.Conv2d`: a trainable 1×1 convolution
    whose weight and bias start at zero (Zhang et al. 2023, §3.1)."""
    g = generator(14)
    for in_channels, out_channels in ((4, 8), (16, 16), (3, 5)):
        conv, error = call(fn, in_channels, out_channels)
        sentence = error or _zero_conv_mistake(conv, in_channels, out_channels, g)
        if sentence:
            print(f"zero_conv: {sentence}")
            return
    print("zero_conv: right on all 3 random tests.")


def _zero_conv_mistake(conv, in_channels, out_channels, g) -> str | None:
    """None if `conv` is a zero convolution like the package's, else a sentence."""
    if not isinstance(conv, nn.Conv2d):
        return f"Not yet: return an nn.Conv2d, not a {type(conv).__name__}."
    want = zero_conv(in_channels, out_channels)
    if conv.weight.shape != want.weight.shape:
        return (
            f"Not yet: the weight has shape {tuple(conv.weight.shape)}, expected "
            f"{tuple(want.weight.shape)}: a 1×1 convolution from in_channels to "
            "out_channels."
        )
    if conv.bias is None:
        return "Not yet: keep the bias (it starts at zero too)."
    if conv.weight.abs().max() != 0:
        return "Not yet: the weight must start at zero, not at a random draw."
    if conv.bias.abs().max() != 0:
        return "Not yet: zero the bias too, or the branch adds a constant at step 0."
    if not (conv.weight.requires_grad and conv.bias.requires_grad):
        return "Not yet: the zero convolution is trained: leave requires_grad on."
    # trained away from zero, it must compute what the package's does
    with torch.no_grad():
        for ours, theirs in ((want.weight, conv.weight), (want.bias, conv.bias)):
            ours.copy_(torch.randn(ours.shape, generator=g))
            theirs.copy_(ours)
    x = torch.randn(2, in_channels, 6, 6, generator=g)
    got, error = call(conv, x)
    if error is not None or not same(got, want(x)):
        return "Not yet: a 1×1 convolution keeps the picture's size: no padding."
    return None


def reference_add_control_residuals(skips, mid, down_residuals, mid_residual, scale):
    """The package's `add_control_residuals`: what the UNet does with a ControlNet's
    residuals (`scale_residuals`, then each added to its skip, and to the mid)."""
    down, mid_residual = scale_residuals(down_residuals, mid_residual, scale)
    return [skip + r for skip, r in zip(skips, down)], mid + mid_residual


def check_add_control_residuals(fn) -> None:
    """`fn(skips, mid, down_residuals, mid_residual, scale) -> (skips, mid)`: the
    UNet's skips (a list of (B, C_i, H_i, W_i)) and its mid block's output
    (B, C, h, w), each plus `scale` times its ControlNet residual (diffusers'
    `controlnet_conditioning_scale`)."""
    g = generator(15)

    def case(scale):
        shapes = [(2, 4, 8, 8), (2, 4, 8, 8), (2, 8, 4, 4), (2, 8, 4, 4)]
        skips = [torch.randn(shape, generator=g) for shape in shapes]
        down = [torch.randn(shape, generator=g) for shape in shapes]
        mid, mid_residual = torch.randn(2, 2, 8, 4, 4, generator=g).unbind(0)
        scaled, scaled_mid = scale_residuals(down, mid_residual, scale)
        want = _flat([s + r for s, r in zip(skips, scaled)], mid + scaled_mid)
        mistakes = {
            "multiply the residuals by scale before adding them.": _flat(
                [s + r for s, r in zip(skips, down)], mid + mid_residual),
            "the residuals are added to the skips, they do not replace them.":
                _flat(scaled, scaled_mid),
            "the mid block's output gets its residual too, times scale.": _flat(
                [s + r for s, r in zip(skips, scaled)], mid),
            "scale the residuals, not the skips: skip + scale · residual.": _flat(
                [scale * (s + r) for s, r in zip(skips, down)],
                scale * (mid + mid_residual)),
        }  # fmt: skip
        args = ([s.clone() for s in skips], mid.clone(), [r.clone() for r in down],
                mid_residual.clone(), scale)  # fmt: skip
        got, error = call(fn, *args)
        if error is None:
            got, error = _flat_result(got, len(skips))
        return got, error, want, mistakes

    check("add_control_residuals", [case(0.7), case(1.5), case(0.3)])


def _flat(skips, mid) -> torch.Tensor:
    return torch.cat([t.flatten() for t in [*skips, mid]])


def _flat_result(result, count):
    """(all of the result's numbers in one tensor, None), or (None, a sentence)."""
    if not (isinstance(result, (tuple, list)) and len(result) == 2):
        return None, "Not yet: return two things, (skips, mid)."
    skips, mid = result
    if not (isinstance(skips, (list, tuple)) and len(skips) == count):
        return None, f"Not yet: return a list of the {count} skips, one per skip."
    if not all(isinstance(t, torch.Tensor) for t in [*skips, mid]):
        return None, "Not yet: the skips and the mid output are tensors."
    return _flat(skips, mid), None


def check_guidance_window(fn) -> None:
    """`fn(num_steps, start, end) -> (num_steps,)`: 1.0 for each sampler step (in
    the order the sampler takes them) that the ControlNet steers, 0.0 for the
    others, for diffusers' `control_guidance_start` and `control_guidance_end`."""

    def case(n, start, end):
        timesteps = torch.arange(n).flip(0) * (1000 // n)  # as a sampler takes them
        want = torch.tensor(list(guidance_window(timesteps, start, end).values()))
        i = torch.arange(n)
        mistakes = {
            "step i lasts until (i + 1)/n: it is steered only if that is ≤ end.":
                ((i / n >= start) & (i / n <= end)).float(),
            "step 0 is the first, noisiest step: start and end count from there.":
                want.flip(0),
            "a step is steered if it starts at start or later: i/n ≥ start.":
                (((i + 1) / n > start) & ((i + 1) / n <= end)).float(),
        }  # fmt: skip
        got, error = call(fn, n, start, end)
        if error is None and not isinstance(got, torch.Tensor):
            got, error = call(_as_tensor, got)
        return got, error, want, mistakes

    check("guidance_window", [case(10, 0.2, 0.8), case(7, 0.3, 0.9),
                              case(20, 0.0, 0.55)])  # fmt: skip


def _as_tensor(keep) -> torch.Tensor:
    return torch.tensor([float(k) for k in keep])
