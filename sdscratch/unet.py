"""The noise-predicting UNet of Stable Diffusion v1, at any size.

Ronneberger et al. 2015 (UNet), as used for diffusion by Ho et al. 2020 and with
cross-attention to text by Rombach et al. 2022 (§3.3). The input goes down through
resolution levels (ResBlocks, optional SpatialTransformers, a stride-2 conv), through a
mid block, and back up, each up level concatenating the skips saved on the way down.

`UNetConfig()` is SD v1.5's own configuration (859,520,964 parameters); the course's
models are the same code with fewer channels.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sdscratch.attention import SpatialTransformer
from sdscratch.layers import (
    Downsample,
    ResBlock,
    TimestepEmbedding,
    Upsample,
    timestep_embedding,
)


@dataclass
class UNetConfig:
    # channels of x: 4 for SD's latents, 3 for pixels
    in_channels: int = 4
    # channels of the predicted noise, usually in_channels
    out_channels: int = 4
    # side of the inputs it was trained on (SD v1.5: 64 latents = 512 pixels)
    sample_size: int = 64
    # width of each resolution level, highest resolution first
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    # ResBlocks per level on the way down (the way up has one more)
    layers_per_block: int = 2
    # which levels put a SpatialTransformer after each ResBlock (SD v1: all but last)
    attention_levels: tuple[bool, ...] = (True, True, True, False)
    # mid block: ResBlock, SpatialTransformer, ResBlock (False: a single ResBlock)
    mid_attention: bool = True
    # width of the text hidden states (CLIP ViT-L/14: 768); None: unconditional
    cross_attention_dim: int | None = 768
    # attention heads at every level (SD v1: 8, so each head widens with the level)
    num_heads: int = 8
    # GroupNorm groups (SD v1: 32); must divide every width
    norm_num_groups: int = 32
    # SpatialTransformer's proj_in/proj_out: "conv" (SD v1, 1×1) or "linear" (SD v2)
    projection: str = "conv"


class DownBlock(nn.Module):
    """One level on the way down: ResBlocks (each + SpatialTransformer), Downsample.

    Returns the output and the skips the matching up level will concatenate.
    """

    def __init__(self, in_ch, out_ch, time_dim, config, attention, downsample):
        super().__init__()
        c, n = config, config.layers_per_block
        self.resnets = nn.ModuleList(
            [
                ResBlock(
                    in_ch if i == 0 else out_ch, out_ch, time_dim, c.norm_num_groups
                )
                for i in range(n)
            ]
        )
        self.attentions = nn.ModuleList(
            [_transformer(out_ch, c) for _ in range(n if attention else 0)]
        )
        self.downsample = Downsample(out_ch) if downsample else None

    def forward(self, x, time, context=None):
        skips = []
        for i, resnet in enumerate(self.resnets):
            x = resnet(x, time)
            if self.attentions:
                x = self.attentions[i](x, context)
            skips.append(x)
        if self.downsample is not None:
            x = self.downsample(x)  # (B, C, H/2, W/2)
            skips.append(x)
        return x, skips


class UpBlock(nn.Module):
    """One level on the way up: [concat skip, ResBlock, SpatialTransformer] ×(n+1),
    then Upsample.

    Args:
        skip_channels: channels of the skips it consumes, in the order it pops them.
    """

    def __init__(self, in_ch, out_ch, skip_channels, time_dim, config, attention, up):
        super().__init__()
        c = config
        self.resnets = nn.ModuleList(
            [
                ResBlock(
                    (in_ch if i == 0 else out_ch) + skip,
                    out_ch,
                    time_dim,
                    c.norm_num_groups,
                )
                for i, skip in enumerate(skip_channels)
            ]
        )
        self.attentions = nn.ModuleList(
            [_transformer(out_ch, c) for _ in skip_channels if attention]
        )
        self.upsample = Upsample(out_ch) if up else None

    def forward(self, x, skips, time, context=None, size=None):
        """skips: this level's skips, popped from the end; size: the output's H, W."""
        for i, resnet in enumerate(self.resnets):
            x = resnet(torch.cat([x, skips.pop()], dim=1), time)
            if self.attentions:
                x = self.attentions[i](x, context)
        if self.upsample is not None:
            x = self.upsample(x, size)  # (B, C, 2H, 2W)
        return x


class MidBlock(nn.Module):
    """The lowest resolution: ResBlock, SpatialTransformer, ResBlock."""

    def __init__(self, channels, time_dim, config):
        super().__init__()
        groups, layers = config.norm_num_groups, 1 + config.mid_attention
        self.resnets = nn.ModuleList(
            [ResBlock(channels, channels, time_dim, groups) for _ in range(layers)]
        )
        self.attentions = nn.ModuleList(
            [_transformer(channels, config) for _ in range(layers - 1)]
        )

    def forward(self, x, time, context=None):
        x = self.resnets[0](x, time)
        for attention, resnet in zip(self.attentions, self.resnets[1:]):
            x = resnet(attention(x, context), time)
        return x


def _transformer(channels, config) -> SpatialTransformer:
    return SpatialTransformer(
        channels,
        config.num_heads,
        config.cross_attention_dim,
        config.norm_num_groups,
        config.projection,
    )


class UNet(nn.Module):
    """Predicts the noise ε in x_t: `unet(x, t, context) -> ε̂` (Ho et al. 2020, §3).

    Args:
        config: a `UNetConfig`.
    """

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = c = config
        widths, levels = c.block_out_channels, len(c.block_out_channels)
        if len(c.attention_levels) != levels:
            raise ValueError("attention_levels needs one entry per block_out_channels.")
        time_dim = 4 * widths[0]
        self.time_embedding = TimestepEmbedding(widths[0], time_dim)
        self.conv_in = nn.Conv2d(c.in_channels, widths[0], 3, padding=1)

        skips, self.down_blocks = [widths[0]], nn.ModuleList()
        for i, (width, attention) in enumerate(zip(widths, c.attention_levels)):
            last = i == levels - 1
            previous = widths[max(i - 1, 0)]
            block = DownBlock(previous, width, time_dim, c, attention, not last)
            self.down_blocks.append(block)
            skips += [width] * (c.layers_per_block + (not last))

        self.mid_block = MidBlock(widths[-1], time_dim, c)

        self.up_blocks, previous = nn.ModuleList(), widths[-1]
        for i in reversed(range(levels)):
            consumed = [skips.pop() for _ in range(c.layers_per_block + 1)]
            attention, up = c.attention_levels[i], i > 0
            block = UpBlock(previous, widths[i], consumed, time_dim, c, attention, up)
            self.up_blocks.append(block)
            previous = widths[i]

        self.conv_norm_out = nn.GroupNorm(c.norm_num_groups, widths[0], eps=1e-5)
        self.conv_out = nn.Conv2d(widths[0], c.out_channels, 3, padding=1)

    def forward(
        self,
        x,
        t,
        context=None,
        down_block_additional_residuals=None,
        mid_block_additional_residual=None,
    ):
        """Predict the noise.

        Args:
            x: (B, in_channels, H, W) noisy images or latents x_t.
            t: (B,) timesteps, or one python number / 0-d tensor for the whole batch.
            context: (B, L, cross_attention_dim) text hidden states; None if the
                model is unconditional.
            down_block_additional_residuals: a ControlNet's residuals, one per skip
                in the order the skips are made, each added to its skip.
            mid_block_additional_residual: a ControlNet's residual for the mid
                block's output (`sdscratch.controlnet`; diffusers' names).
        Returns:
            (B, out_channels, H, W) the predicted noise ε̂.
        """
        self._check_context(context)
        t = _batch_timesteps(t, x)  # (B,)
        features = timestep_embedding(t, self.config.block_out_channels[0])
        time = self.time_embedding(features.to(x.dtype))  # (B, 4·C0)

        h = self.conv_in(x)  # (B, C0, H, W)
        skips = [h]
        for block in self.down_blocks:
            h, block_skips = block(h, time, context)
            skips += block_skips
        if down_block_additional_residuals is not None:  # a ControlNet steers
            skips = _add_residuals(skips, down_block_additional_residuals)
        h = self.mid_block(h, time, context)
        if mid_block_additional_residual is not None:
            h = h + mid_block_additional_residual
        for block in self.up_blocks:
            level_skips = skips[-len(block.resnets) :]
            del skips[-len(block.resnets) :]
            size = skips[-1].shape[-2:] if skips else None  # where upsampling lands
            h = block(h, level_skips, time, context, size)
        return self.conv_out(F.silu(self.conv_norm_out(h)))

    def _check_context(self, context):
        conditional = self.config.cross_attention_dim is not None
        if conditional and context is None:
            raise ValueError(
                "This UNet is text-conditioned: pass context, (B, L, "
                f"{self.config.cross_attention_dim}) text hidden states."
            )
        if not conditional and context is not None:
            raise ValueError("This UNet is unconditional (cross_attention_dim=None).")


def _batch_timesteps(t, x) -> torch.Tensor:
    """t as a (B,) tensor on x's device: a number or 0-d tensor is repeated."""
    t = torch.as_tensor(t, device=x.device)
    if t.ndim == 0:
        t = t[None]
    if t.ndim != 1 or len(t) not in (1, len(x)):
        raise ValueError(f"t has shape {tuple(t.shape)}; expected ({len(x)},) or ().")
    return t.expand(len(x))


def _add_residuals(skips, residuals) -> list:
    """Each skip plus its ControlNet residual (a list of the same length)."""
    if len(residuals) != len(skips):
        raise ValueError(
            f"Got {len(residuals)} down-block residuals for the UNet's {len(skips)} "
            "skips: the ControlNet was made for another UNet."
        )
    for skip, residual in zip(skips, residuals):
        if residual.shape != skip.shape:
            raise ValueError(
                f"A down-block residual of shape {tuple(residual.shape)} cannot be "
                f"added to a skip of shape {tuple(skip.shape)}."
            )
    return [skip + residual for skip, residual in zip(skips, residuals)]
