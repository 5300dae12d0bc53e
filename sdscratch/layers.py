"""The UNet's building blocks: timestep embedding, ResBlock, Down/Upsample, GEGLU.

Names follow Stable Diffusion's diffusers layout (`time_embedding.linear_1`,
`resnets.0.norm1`, `conv_shortcut`, ...) so that real checkpoints map onto these
modules with the short table in `sdscratch.port`.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn


def timestep_embedding(t, dim, max_period=10000.0) -> torch.Tensor:
    """Sinusoidal features of the timestep, as Stable Diffusion computes them.

    Vaswani et al. 2017, §3.5, used for timesteps by Ho et al. 2020 (appendix B):
    frequencies ω_i = max_period^(-i / (dim/2)), features [cos(t ω), sin(t ω)]
    (SD's `flip_sin_to_cos=True`, `freq_shift=0`).

    Args:
        t: (B,) timesteps, integer or fractional (Euler samplers use fractions).
        dim: the number of features (even).
    Returns:
        (B, dim) float32 features.
    """
    half = dim // 2
    steps = torch.arange(half, dtype=torch.float32, device=t.device)
    frequencies = torch.exp(-math.log(max_period) * steps / half)  # (dim/2,)
    angles = t[:, None].float() * frequencies[None, :]  # (B, dim/2)
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)  # (B, dim)


class TimestepEmbedding(nn.Module):
    """The MLP that turns sinusoidal features into the UNet's time vector.

    Args:
        in_dim: sinusoidal features (SD v1: 320, the first block's width).
        dim: the time vector's size (SD v1: 1280, four times `in_dim`).
    """

    def __init__(self, in_dim, dim):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, features):  # (B, in_dim) -> (B, dim)
        return self.linear_2(F.silu(self.linear_1(features)))


class ResBlock(nn.Module):
    """Two 3×3 convolutions with the time vector added in between, plus a skip.

    GroupNorm → SiLU → conv → (+ projected time) → GroupNorm → SiLU → conv, added to
    the input (through a 1×1 conv when the channel count changes). He et al. 2016;
    the time injection is DDPM's (Ho et al. 2020, appendix B).

    Args:
        in_channels, out_channels: channels before and after.
        time_dim: size of the time vector.
        groups: GroupNorm groups (SD v1: 32).
        eps: GroupNorm epsilon (SD v1: 1e-5).
    """

    def __init__(self, in_channels, out_channels, time_dim, groups=32, eps=1e-5):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_emb_proj = nn.Linear(time_dim, out_channels)
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=eps)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = None
        if in_channels != out_channels:
            self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x, time):
        """x (B, C_in, H, W), time (B, time_dim) -> (B, C_out, H, W)."""
        h = self.conv1(F.silu(self.norm1(x)))  # (B, C_out, H, W)
        h = h + self.time_emb_proj(F.silu(time))[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return skip + h


class Downsample(nn.Module):
    """Halve the resolution with a stride-2 3×3 convolution."""

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x):  # (B, C, H, W) -> (B, C, ⌈H/2⌉, ⌈W/2⌉)
        return self.conv(x)


class Upsample(nn.Module):
    """Double the resolution: nearest-neighbour ×2, then a 3×3 convolution.

    Nearest then conv avoids the checkerboard artefacts of transposed convolutions
    (Odena et al. 2016, "Deconvolution and checkerboard artifacts").
    """

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x, size=None):
        """x (B, C, H, W) -> (B, C, 2H, 2W), or (B, C, *size) when size is given."""
        if size is None:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        else:
            x = F.interpolate(x, size=size, mode="nearest")
        return self.conv(x)


class GEGLU(nn.Module):
    """A gated GELU unit: one projection makes a value and a gate, x·GELU(gate).

    Shazeer 2020, "GLU variants improve Transformer", eq. 5.
    """

    def __init__(self, dim, hidden):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * hidden)

    def forward(self, x):  # (B, N, dim) -> (B, N, hidden)
        value, gate = self.proj(x).chunk(2, dim=-1)
        return value * F.gelu(gate)


class FeedForward(nn.Module):
    """The transformer's MLP: GEGLU to `mult`× the width, then back (SD v1: ×4)."""

    def __init__(self, dim, mult=4):
        super().__init__()
        self.geglu = GEGLU(dim, dim * mult)
        self.out = nn.Linear(dim * mult, dim)

    def forward(self, x):  # (B, N, dim) -> (B, N, dim)
        return self.out(self.geglu(x))
