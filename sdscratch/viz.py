"""Pictures: image grids with captions, tensors to PIL images.

Images are tensors in [-1, 1], shape (B, 3, H, W), the convention of the whole course.
"""

import math

import matplotlib.pyplot as plt
import numpy as np
import torch
from einops import rearrange
from PIL import Image


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, C, H, W) in [-1, 1] -> (B, H, W, C) uint8 in [0, 255]."""
    images = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round()
    return rearrange(images, "b c h w -> b h w c").to(torch.uint8).numpy()


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [-1, 1] -> a list of B RGB PIL images."""
    return [Image.fromarray(array) for array in to_uint8(images)]


def from_pil(images) -> torch.Tensor:
    """PIL image(s) -> (B, 3, H, W) float tensor in [-1, 1]."""
    images = [images] if isinstance(images, Image.Image) else images
    arrays = np.stack([np.asarray(image.convert("RGB")) for image in images])
    tensor = torch.from_numpy(arrays).float() / 127.5 - 1  # (B, H, W, 3)
    return rearrange(tensor, "b h w c -> b c h w")


def make_grid(images: torch.Tensor, ncols=None, pad=1) -> torch.Tensor:
    """Tile (B, C, H, W) images into one image, `ncols` per row, `pad` pixels apart."""
    b = len(images)
    ncols = ncols or math.ceil(math.sqrt(b))
    nrows = math.ceil(b / ncols)
    blank = images.new_full((nrows * ncols - b, *images.shape[1:]), 1.0)  # white
    tiles = torch.cat([images, blank])
    tiles = torch.nn.functional.pad(tiles, (0, pad, 0, pad), value=1.0)
    grid = rearrange(tiles, "(r c) ch h w -> ch (r h) (c w)", r=nrows, c=ncols)
    return grid[:, : grid.shape[1] - pad, : grid.shape[2] - pad]


def image_grid(
    images: torch.Tensor, captions=None, ncols=None, size=1.6, fontsize=9, title=None
) -> plt.Figure:
    """Show images in a grid, each with its caption underneath.

    Args:
        images: (B, 3, H, W) in [-1, 1].
        captions: B strings (wrapped to fit), or None.
        ncols: images per row (default: about square).
        size: inches per image.
        fontsize: of the captions, in points (9 points: 10 pixels at 80 dpi).
    Returns:
        The matplotlib figure (shown inline in a notebook).
    """
    b = len(images)
    if captions is not None and len(captions) != b:
        raise ValueError(f"Got {len(captions)} captions for {b} images.")
    ncols = min(ncols or math.ceil(math.sqrt(b)), b)
    nrows = math.ceil(b / ncols)
    wrapped = [_wrap(text, size, fontsize) for text in captions or []]
    lines = max((text.count("\n") + 1 for text in wrapped), default=0)
    text_height = lines * fontsize / 72 * 1.3  # inches under each image
    fig, axes = plt.subplots(
        nrows,
        ncols,
        squeeze=False,
        figsize=(ncols * size, nrows * (size + text_height)),
    )
    pixels = to_uint8(images)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i >= b:
            continue
        ax.imshow(pixels[i], interpolation="nearest")
        if wrapped:
            ax.set_title(wrapped[i], fontsize=fontsize, y=-0.02, va="top", pad=0)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def _wrap(text: str, size: float, fontsize=7) -> str:
    """Break a caption into lines that fit under an image `size` inches wide, at
    `fontsize` points (a character is about 0.6 times as wide as the font is high)."""
    width, lines, line = int(size * 72 / (fontsize * 0.6)), [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return "\n".join([*lines, line])
