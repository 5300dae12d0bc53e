"""ControlNet: steering Stable Diffusion's layout with an image.

Zhang, Rao & Agrawala 2023, "Adding Conditional Control to Text-to-Image Diffusion
Models". The UNet stays frozen. Beside it runs a trainable copy of its encoder
(`conv_in`, the time embedding, the down blocks) and mid block. The control image (an
edge map, a layout mask, a scribble) enters the copy through a small hint encoder,
added to the copy's first features. Every skip the copy makes, and its mid block's
output, goes through a 1×1 "zero convolution" and is added to the matching skip (and
mid output) of the UNet.

The zero convolutions start at exactly zero (§3.1): at step 0 the steered UNet is the
UNet itself, and training cannot damage it with noise from a random branch.

Names and layout are diffusers' `ControlNetModel`, with three plainer names:
`hint_encoder` (diffusers: `controlnet_cond_embedding`), `zero_convs`
(`controlnet_down_blocks`) and `mid_zero_conv` (`controlnet_mid_block`); the key
table is in `sdscratch.port`.
"""

import dataclasses
import math
import numbers
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from sdscratch.checkpoint import MANIFEST, CheckpointError, read_manifest
from sdscratch.layers import TimestepEmbedding, timestep_embedding
from sdscratch.unet import DownBlock, MidBlock, UNetConfig, _batch_timesteps

# SD's ControlNets: three halvings, 512 pixels -> 64 latents, like the VAE.
SD_HINT_CHANNELS = (16, 32, 96, 256)


@dataclass
class ControlNetConfig(UNetConfig):
    """The config of the UNet it copies (its widths, levels, attention, heads: see
    `UNetConfig`; `out_channels` goes unused), plus the hint encoder's."""

    # channels of the control image: 3 (RGB), as SD's ControlNets
    conditioning_channels: int = 3
    # widths of the hint encoder, one halving of the resolution between each two;
    # SD: (16, 32, 96, 256), three halvings for the VAE's ×8
    conditioning_embedding_out_channels: tuple[int, ...] = SD_HINT_CHANNELS


def zero_conv(in_channels, out_channels, kernel_size=1) -> nn.Conv2d:
    """A convolution whose weight and bias start at zero (Zhang et al. 2023, §3.1)."""
    conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2)
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


class HintEncoder(nn.Module):
    """The control image -> features of the latents' size and `conv_in`'s width.

    The paper (§3.2) describes four 4×4 stride-2 convolutions; SD's released
    ControlNets (and diffusers) use 3×3 convolutions, two per width, the second
    halving the resolution, each followed by SiLU, then a zero convolution.

    Args:
        out_channels: the UNet's first width.
        in_channels: channels of the control image.
        widths: the hidden widths (SD: 16, 32, 96, 256).
    """

    def __init__(self, out_channels, in_channels=3, widths=SD_HINT_CHANNELS):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, widths[0], 3, padding=1)
        self.blocks = nn.ModuleList()
        for width, next_width in zip(widths, widths[1:]):
            self.blocks.append(nn.Conv2d(width, width, 3, padding=1))
            self.blocks.append(nn.Conv2d(width, next_width, 3, padding=1, stride=2))
        self.conv_out = zero_conv(widths[-1], out_channels, kernel_size=3)

    def forward(self, control):  # (B, C, H, W) -> (B, out, H/2^k, W/2^k)
        h = F.silu(self.conv_in(control))
        for conv in self.blocks:
            h = F.silu(conv(h))
        return self.conv_out(h)


class ControlNet(nn.Module):
    """A trainable copy of a UNet's encoder that turns a control image into
    residuals for the UNet's skips: `controlnet(x, t, context, control)`.

    Args:
        config: a `ControlNetConfig` (`ControlNet.from_unet` makes one).
    """

    def __init__(self, config: ControlNetConfig):
        super().__init__()
        self.config = c = config
        widths, levels = c.block_out_channels, len(c.block_out_channels)
        if len(c.attention_levels) != levels:
            raise ValueError("attention_levels needs one entry per block_out_channels.")
        time_dim = 4 * widths[0]
        # built in diffusers' order, so that one seed draws the same hint encoder
        self.conv_in = nn.Conv2d(c.in_channels, widths[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(widths[0], time_dim)
        self.hint_encoder = HintEncoder(
            widths[0], c.conditioning_channels, c.conditioning_embedding_out_channels
        )
        # the encoder, a zero convolution for every skip it makes (conv_in's first)
        self.down_blocks = nn.ModuleList()
        self.zero_convs = nn.ModuleList([zero_conv(widths[0], widths[0])])
        for i, (width, attention) in enumerate(zip(widths, c.attention_levels)):
            last = i == levels - 1
            previous = widths[max(i - 1, 0)]
            block = DownBlock(previous, width, time_dim, c, attention, not last)
            self.down_blocks.append(block)
            skips = c.layers_per_block + (not last)
            self.zero_convs.extend(zero_conv(width, width) for _ in range(skips))
        self.mid_zero_conv = zero_conv(widths[-1], widths[-1])
        self.mid_block = MidBlock(widths[-1], time_dim, c)

    @classmethod
    def from_unet(
        cls,
        unet,
        conditioning_embedding_out_channels=SD_HINT_CHANNELS,
        conditioning_channels=3,
    ):
        """A ControlNet for `unet`, initialised as diffusers'
        `ControlNetModel.from_unet`: `conv_in`, the time embedding, the down blocks
        and the mid block are copies of the UNet's; the zero convolutions are zero
        (so it adds nothing yet); the hint encoder is random but for its last
        convolution, also zero.

        Args:
            unet: a `sdscratch.unet.UNet`.
            conditioning_embedding_out_channels: the hint encoder's widths.
            conditioning_channels: channels of the control image.
        Returns:
            a `ControlNet` on the UNet's device, in its dtype.
        """
        config = ControlNetConfig(
            **dataclasses.asdict(unet.config),
            conditioning_channels=conditioning_channels,
            conditioning_embedding_out_channels=tuple(
                conditioning_embedding_out_channels
            ),
        )
        controlnet = cls(config)
        for name in ("conv_in", "time_embedding", "down_blocks", "mid_block"):
            getattr(controlnet, name).load_state_dict(getattr(unet, name).state_dict())
        parameter = next(unet.parameters())
        return controlnet.to(parameter.device, parameter.dtype)

    @property
    def downsampling_factor(self) -> int:
        """Control-image pixels per latent, per side (SD: 8, like the VAE)."""
        return 2 ** (len(self.config.conditioning_embedding_out_channels) - 1)

    def forward(self, x, t, context, control, conditioning_scale=1.0, guess_mode=False):
        """The residuals that steer the UNet towards the control image.

        Args:
            x: (B, in_channels, h, w) noisy latents x_t, as the UNet gets them.
            t: (B,) timesteps, or one number for the whole batch.
            context: (B, L, cross_attention_dim) text hidden states (None if the
                UNet is unconditional).
            control: (B, conditioning_channels, f·h, f·w) control images in [0, 1],
                f = `downsampling_factor`.
            conditioning_scale: multiplies every residual (0: no control).
            guess_mode: scale the residuals from 0.1 (first skip) up to 1 (mid
                block) on a log scale, as diffusers' guess mode does.
        Returns:
            (down, mid): a list with one residual per UNet skip, in the order the
            UNet makes them, each shaped like that skip; and (B, C_last, h', w')
            for the mid block's output. Pass them to the UNet as
            `down_block_additional_residuals` and `mid_block_additional_residual`.
        """
        self._check_inputs(x, context, control)
        t = _batch_timesteps(t, x)  # (B,)
        features = timestep_embedding(t, self.config.block_out_channels[0])
        time = self.time_embedding(features.to(x.dtype))  # (B, 4·C0)

        h = self.conv_in(x) + self.hint_encoder(control)  # (B, C0, h, w)
        skips = [h]
        for block in self.down_blocks:
            h, block_skips = block(h, time, context)
            skips += block_skips
        h = self.mid_block(h, time, context)  # (B, C_last, h', w')

        down = [conv(skip) for conv, skip in zip(self.zero_convs, skips)]
        mid = self.mid_zero_conv(h)
        return scale_residuals(down, mid, conditioning_scale, guess_mode)

    def _check_inputs(self, x, context, control):
        c, f = self.config, self.downsampling_factor
        if (c.cross_attention_dim is None) != (context is None):
            needs = "no context" if c.cross_attention_dim is None else "a context"
            raise ValueError(f"This ControlNet's UNet takes {needs}.")
        expected = (len(x), c.conditioning_channels, f * x.shape[2], f * x.shape[3])
        if tuple(control.shape) != expected:
            raise ValueError(
                f"The control image batch is {tuple(control.shape)}; for latents "
                f"{tuple(x.shape)} it must be {expected} ({f}× the latents' size)."
            )


def scale_residuals(down, mid, scale, guess_mode=False):
    """Multiply the residuals by `scale`; in guess mode, also by 0.1 for the first
    skip rising on a log scale to 1 for the mid block (diffusers' guess mode)."""
    if not guess_mode:
        return [residual * scale for residual in down], mid * scale
    scales = torch.logspace(-1, 0, len(down) + 1, device=mid.device) * scale
    return [residual * s for residual, s in zip(down, scales)], mid * scales[-1]


def guidance_window(timesteps, start=0.0, end=1.0) -> dict:
    """Which sampler steps a ControlNet steers: diffusers' `control_guidance_start`
    and `control_guidance_end` (its `controlnet_keep`).

    Step i of n is steered if start ≤ i/n and (i + 1)/n ≤ end: start = 0.2 leaves
    the first fifth of the steps (where the layout forms) to the prompt alone,
    end = 0.8 the last fifth (the details).

    Args:
        timesteps: (n,) the sampler's timesteps, in the order it takes them.
        start, end: fractions of the steps, 0 ≤ start < end ≤ 1.
    Returns:
        {timestep: 1.0 (steered) or 0.0}.
    """
    n = len(timesteps)
    keep = [1.0 - float(i / n < start or (i + 1) / n > end) for i in range(n)]
    return dict(zip(timesteps.tolist(), keep))


# ----------------------------------------------------------------------------------
# Steering a UNet: what the pipeline calls


def steered_unet(
    unet, controlnet, control, conditioning_scale=1.0, guess_mode=False, window=None
):
    """The UNet steered by a ControlNet, with the UNet's own signature.

    Under classifier-free guidance `classifier_free_guidance` stacks the batch as
    [unconditional; conditional]. The ControlNet then runs on both halves with the
    same control image, as diffusers' `StableDiffusionControlNetPipeline` does;
    in guess mode it sees only the conditional half, and the unconditional half
    gets no residuals.

    Args:
        unet: a `UNet`; controlnet: a `ControlNet` made for it.
        control: (N, C, H, W) control images in [0, 1], row i for latent row i.
        conditioning_scale, guess_mode: as `ControlNet.forward`.
        window: {timestep: 1 or 0} from `guidance_window`: the steps the
            ControlNet steers (None: every step). At the others the UNet runs
            alone, which is what a scale of 0 gives.
    Returns:
        `fn(x, t, context) -> ε̂` for x of N rows, or 2N (guidance).
    """
    n = len(control)

    def eps_fn(x, t, context=None):
        t = _batch_timesteps(t, x)  # (B,)
        if len(x) % n:
            raise ValueError(f"{len(x)} latents cannot share {n} control images.")
        scale = conditioning_scale
        if window is not None:
            scale = scale * window[t[0].item()]
            if scale == 0:  # x + 0 · residual is x: the UNet alone, exactly
                return unet(x, t, context)
        if guess_mode and len(x) == 2 * n:
            down, mid = controlnet(x[n:], t[n:], context[n:], control, scale, True)
            down = [torch.cat([torch.zeros_like(r), r]) for r in down]
            mid = torch.cat([torch.zeros_like(mid), mid])
        else:
            controls = torch.cat([control] * (len(x) // n))  # (B, C, H, W)
            down, mid = controlnet(x, t, context, controls, scale, guess_mode)
        return unet(
            x,
            t,
            context,
            down_block_additional_residuals=down,
            mid_block_additional_residual=mid,
        )

    return eps_fn


@dataclass
class Control:
    """The pipeline's control arguments, checked: a ControlNet, its control image,
    `controlnet_conditioning_scale`, `guess_mode`, `control_guidance_start` and
    `control_guidance_end` (diffusers' names)."""

    controlnet: Any
    image: Any
    conditioning_scale: float = 1.0
    guess_mode: bool = False
    guidance_start: float = 0.0
    guidance_end: float = 1.0

    def __post_init__(self):
        if self.controlnet is None:
            raise ValueError(
                "image= is a ControlNet's control image: pass controlnet= too "
                "(for img2img, call pipe.img2img)."
            )
        if not isinstance(self.controlnet, ControlNet):
            raise ValueError("controlnet must be a sdscratch ControlNet.")
        if self.image is None:
            raise ValueError("A ControlNet needs a control image: pass image=.")
        scale = self.conditioning_scale
        if not isinstance(scale, numbers.Real) or not math.isfinite(scale):
            raise ValueError(
                f"controlnet_conditioning_scale must be a number, got {scale!r}."
            )
        if not isinstance(self.guess_mode, bool):
            raise ValueError(f"guess_mode must be a bool, got {self.guess_mode!r}.")
        start, end = self.guidance_start, self.guidance_end
        both_numbers = all(isinstance(v, numbers.Real) for v in (start, end))
        if not (both_numbers and 0 <= start < end <= 1):
            raise ValueError(
                "control_guidance_start and control_guidance_end must be numbers "
                f"with 0 <= start < end <= 1, got {start!r} and {end!r}."
            )

    def steer(self, unet, latent_shape, vae_scale_factor, images_per_prompt,
              timesteps=None):  # fmt: skip
        """`steered_unet` for latents of `latent_shape` (N, C, h, w), N = B · n.

        The ControlNet must fit the UNet and the VAE; the control images (1 or B)
        are resized to the picture's size if needed (said once), one row per
        image made, as the prompts are. `timesteps` (n,), the sampler's, place
        the guidance window (None: every step steered).
        """
        check_fits(self.controlnet, unet, vae_scale_factor)
        total, _, h, w = latent_shape
        size = (h * vae_scale_factor, w * vae_scale_factor)
        channels = self.controlnet.config.conditioning_channels
        images = control_images(self.image, size, channels)  # (1 or B, C, H, W)
        batch = total // images_per_prompt
        if len(images) not in (1, batch):
            raise ValueError(f"Got {len(images)} control images for {batch} prompts.")
        if len(images) == 1:
            images = images.expand(total, -1, -1, -1)
        else:
            images = images.repeat_interleave(images_per_prompt, 0)  # (N, C, H, W)
        parameter = next(self.controlnet.parameters())
        images = images.to(parameter.device, parameter.dtype)
        window = None
        if timesteps is not None and (self.guidance_start, self.guidance_end) != (0, 1):
            window = guidance_window(timesteps, self.guidance_start, self.guidance_end)
        return steered_unet(unet, self.controlnet, images, self.conditioning_scale,
                            self.guess_mode, window)  # fmt: skip


FITTING = ("in_channels", "block_out_channels", "layers_per_block",
           "cross_attention_dim")  # fmt: skip


def check_fits(controlnet, unet, vae_scale_factor=None):
    """Refuse, in one sentence, a ControlNet made for another UNet (or VAE)."""
    if not isinstance(controlnet, ControlNet):
        raise ValueError("controlnet must be a sdscratch ControlNet.")
    for field in FITTING:
        theirs, ours = getattr(controlnet.config, field), getattr(unet.config, field)
        if _hashable(theirs) != _hashable(ours):
            raise ValueError(
                f"This ControlNet was made for a UNet with {field}={theirs!r}, "
                f"but this UNet has {field}={ours!r}."
            )
    theirs, ours = next(controlnet.parameters()), next(unet.parameters())
    if (theirs.device, theirs.dtype) != (ours.device, ours.dtype):
        raise ValueError(
            f"The ControlNet is {theirs.dtype} on {theirs.device} but the UNet "
            f"{ours.dtype} on {ours.device}: move it with controlnet.to(...)."
        )
    factor = controlnet.downsampling_factor
    if vae_scale_factor is not None and factor != vae_scale_factor:
        raise ValueError(
            f"This ControlNet's hint encoder shrinks images {factor}× but the "
            f"VAE {vae_scale_factor}×: it was made for another model."
        )


def _hashable(value):
    return tuple(value) if isinstance(value, (list, tuple)) else value


UNET_WEIGHTS = "unet/model.safetensors"  # in one of our model folders


def unet_digest(model) -> str | None:
    """The sha256 of a model's UNet weights, as its MANIFEST.json records them (and
    loading it checks them): our folders and bundled names; None for a diffusers
    folder, a single file or a Hub repo id, which record none."""
    from sdscratch.loading import locate

    kind, where = locate(model)
    return read_manifest(where)["sha256"].get(UNET_WEIGHTS) if kind == "ours" else None


def check_trained_for(folder, model):
    """Refuse, in one sentence, a ControlNet trained on another UNet than `model`'s.

    The controlnet recipe records its base's `unet_digest` in the ControlNet's
    MANIFEST.json ("quality": "base_unet_sha256"). A ControlNet of the same widths
    made for another UNet runs, but steers features it never saw; this tells the two
    apart. Nothing is checked when either side records no digest.

    Args:
        folder: the ControlNet's folder.
        model: the model it steers: a bundled name or a path, as `from_pretrained`.
    """
    folder = Path(folder)
    if not (folder / MANIFEST).is_file():
        return
    quality = read_manifest(folder).get("quality")
    wanted = quality.get("base_unet_sha256") if isinstance(quality, dict) else None
    have = unet_digest(model) if wanted else None
    if wanted and have and wanted != have:
        base = quality.get("base", "another model")
        raise CheckpointError(
            f"{folder} was trained for the UNet of {base} (sha256 {wanted[:12]}…), "
            f"not for the UNet of {model} (sha256 {have[:12]}…): train one for it "
            f"with `python -m sdscratch train controlnet --base {model}`."
        )


def control_images(image, size, channels=3) -> torch.Tensor:
    """Control image(s) -> (B, channels, H, W) float in [0, 1], `size` = (H, W).

    As diffusers' control image processor: a PIL image is read as RGB (or
    greyscale for 1 channel) / 255; a tensor must already be in [0, 1]. An image
    of another size is resized (Lanczos for PIL, bilinear for tensors), with a
    warning.

    Args:
        image: a PIL image, a list of them, or a (C, H, W) / (B, C, H, W) tensor.
        size: the pixel size of the images being made.
    """
    pictures = [image] if isinstance(image, Image.Image) else image
    if isinstance(pictures, (list, tuple)) and pictures:
        if not all(isinstance(picture, Image.Image) for picture in pictures):
            raise ValueError("The control image must be PIL images or a tensor.")
        mode = "L" if channels == 1 else "RGB"
        height, width = size
        if any((p.height, p.width) != (height, width) for p in pictures):
            _warn_resized((pictures[0].height, pictures[0].width), size)
            pictures = [p.resize((width, height), Image.LANCZOS) for p in pictures]
        pictures = [picture.convert(mode) for picture in pictures]
        arrays = np.stack([np.asarray(p, np.float32) / 255 for p in pictures])
        arrays = arrays[..., None] if arrays.ndim == 3 else arrays  # (B, H, W, C)
        return torch.from_numpy(arrays).permute(0, 3, 1, 2)
    if not (isinstance(image, torch.Tensor) and image.ndim in (3, 4)):
        raise ValueError("The control image must be PIL images or a tensor.")
    image = (image[None] if image.ndim == 3 else image).float()  # (B, C, H, W)
    if image.shape[1] != channels:
        raise ValueError(
            f"The control image has {image.shape[1]} channels; the ControlNet "
            f"takes {channels}."
        )
    if image.numel() and not (0 <= image.min() and image.max() <= 1):
        raise ValueError("A control image tensor must hold values in [0, 1].")
    if tuple(image.shape[-2:]) != tuple(size):
        _warn_resized(tuple(image.shape[-2:]), size)
        image = F.interpolate(image, size=size, mode="bilinear", antialias=True)
    return image.clamp(0, 1)


def _warn_resized(got, size):
    warnings.warn(
        f"The control image is {got[0]}×{got[1]} pixels; resized to "
        f"{size[0]}×{size[1]}, the size of the images being made.",
        stacklevel=4,
    )
