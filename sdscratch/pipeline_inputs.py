"""The pipeline's inputs, checked and converted: prompts, numbers, images, masks.

`StableDiffusion` (sdscratch/pipeline.py) calls these before any model runs, so that
a bad argument is one clear sentence (a ValueError), and turns PIL images and masks
into tensors of one row per image made.
"""

import math
import numbers

import torch
import torch.nn.functional as F
from PIL import Image

from sdscratch.viz import from_pil


def check_prompts(prompt, negative_prompt) -> tuple[list, list]:
    """Prompts and negative prompts as two lists of B strings."""
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise ValueError("prompt must be a string or a non-empty list of strings.")
    if not all(isinstance(p, str) for p in prompts):
        raise ValueError("Every prompt must be a string.")
    negatives = "" if negative_prompt is None else negative_prompt
    negatives = [negatives] * len(prompts) if isinstance(negatives, str) else negatives
    if not isinstance(negatives, (list, tuple)) or not all(
        isinstance(p, str) for p in negatives
    ):
        raise ValueError("negative_prompt must be None, a string or a list of them.")
    if len(negatives) != len(prompts):
        raise ValueError(
            f"Got {len(negatives)} negative prompts for {len(prompts)} prompts."
        )
    return list(prompts), list(negatives)


def check_numbers(num_inference_steps, guidance_scale, num_images_per_prompt):
    """One ValueError for a step count, guidance scale or image count out of range."""
    steps, per_prompt = num_inference_steps, num_images_per_prompt
    if not is_int(steps) or steps < 1:
        raise ValueError(f"num_inference_steps must be 1 or more, got {steps!r}.")
    if not isinstance(guidance_scale, numbers.Real) or not (
        0 <= guidance_scale < math.inf
    ):
        raise ValueError(f"guidance_scale must be 0 or more, got {guidance_scale!r}.")
    if not is_int(per_prompt) or per_prompt < 1:
        raise ValueError(
            f"num_images_per_prompt must be 1 or more, got {per_prompt!r}."
        )


def check_fraction(value, name):
    """One ValueError unless `value` is a number from 0 to 1."""
    if not isinstance(value, numbers.Real) or not 0 <= value <= 1:
        raise ValueError(f"{name} must be between 0 and 1, got {value!r}.")


def is_int(value) -> bool:
    """A whole number, and not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_choice(value, choices, name):
    """One ValueError if `value` is not one of `choices`."""
    if value not in choices:
        raise ValueError(f"Unknown {name} {value!r}; choose one of {choices}.")


def as_tensor(value, name) -> torch.Tensor:
    """PIL image(s) -> (B, 3, H, W) in [-1, 1]; a (C, H, W) or (B, C, H, W) tensor
    -> (B, C, H, W) float."""
    pictures = [value] if isinstance(value, Image.Image) else value
    if isinstance(pictures, (list, tuple)) and pictures:
        if not all(isinstance(picture, Image.Image) for picture in pictures):
            raise ValueError(f"{name} must be a PIL image, a list of them or a tensor.")
        if len({picture.size for picture in pictures}) > 1:
            raise ValueError(f"Every {name} must have the same size.")
        return from_pil(list(pictures))
    if isinstance(value, torch.Tensor) and value.ndim in (3, 4):
        return (value[None] if value.ndim == 3 else value).float()
    raise ValueError(f"{name} must be a PIL image, a list of them or a tensor.")


def mask_tensor(mask, image_shape) -> torch.Tensor:
    """A mask (PIL images, white = repaint, or a tensor in [0, 1], 1 = repaint) ->
    (B, 1, H, W) in [0, 1], checked to be as large as the image."""
    if isinstance(mask, torch.Tensor):
        mask = as_tensor(mask[None] if mask.ndim == 2 else mask, "mask")
    else:  # PIL: grey levels, read from the red channel of the RGB conversion
        mask = (as_tensor(mask, "mask")[:, :1] + 1) / 2
    if mask.shape[1] != 1:
        raise ValueError(f"mask must have one channel, got {mask.shape[1]}.")
    if mask.shape[-2:] != image_shape[-2:]:
        raise ValueError(
            f"The mask is {tuple(mask.shape[-2:])} pixels but the image is "
            f"{tuple(image_shape[-2:])}: they must be the same size."
        )
    return mask.clamp(0, 1)


def latent_mask(mask, n, total, factor, like):
    """(B, 1, H, W) pixel mask -> (N, 1, H/f, W/f) with `like`'s device and dtype:
    a latent cell is repainted as much as the most repainted pixel it covers."""
    if mask is None:
        return None
    return per_image(F.max_pool2d(mask, factor), n, total).to(like)


def per_image(x, n, total) -> torch.Tensor:
    """One row per image made: (1, ...) -> (total, ...), or (B, ...) -> (B·n, ...),
    each row n times in a row, as the prompts are."""
    return x.expand(total, *x.shape[1:]) if len(x) == 1 else x.repeat_interleave(n, 0)
