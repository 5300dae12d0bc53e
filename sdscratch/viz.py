"""Pictures: the lessons' figure style, labelled image grids, tensors to PIL images.

Images are tensors in [-1, 1], shape (B, 3, H, W), the convention of the whole course.
"""

import math
import sys

import matplotlib.pyplot as plt
import numpy as np
import torch
from einops import rearrange
from PIL import Image

# A lesson figure is shown at LESSON_DPI pixels per inch (CSS pixels, as the notebook
# and the website show it) and saved with twice as many pixels for sharp screens.
LESSON_DPI = 80
# The smallest text in a figure, in points: 9 points are 10 pixels at 80 dpi.
MIN_FONTSIZE = 9
# The website's content column in CSS pixels (mdBook's --content-max-width): a wider
# figure is scaled down to it, and its text with it.
PAGE_WIDTH = 750


def lesson_style() -> None:
    """Set up a lesson's figures: shown at LESSON_DPI, saved with twice the pixels in
    a notebook (IPython's "retina" PNGs), matplotlib's text at MIN_FONTSIZE or more.

    Every lesson calls it once, with its imports. A figure up to PAGE_WIDTH /
    LESSON_DPI (9.4) inches wide then shows unscaled on the website, so 9-point
    text stays 10 pixels high.
    """
    plt.rcParams["figure.dpi"] = LESSON_DPI
    plt.rcParams["font.size"] = 10  # points; ticks, labels, legends: the same
    for key in ("axes.labelsize", "xtick.labelsize", "ytick.labelsize"):
        plt.rcParams[key] = "medium"
    plt.rcParams["legend.fontsize"] = "medium"
    ipython = sys.modules.get("IPython")  # imported when running in a notebook
    if ipython is not None and ipython.get_ipython() is not None:
        from matplotlib_inline.backend_inline import set_matplotlib_formats

        set_matplotlib_formats("retina")


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
    images: torch.Tensor,
    captions=None,
    ncols=None,
    size=1.6,
    fontsize=MIN_FONTSIZE,
    title=None,
    rows=None,
    cols=None,
) -> plt.Figure:
    """Show images in a grid, each with its caption underneath, and what varies along
    each axis: a label left of each row, one above each column.

    Args:
        images: (B, 3, H, W) in [-1, 1].
        captions: B strings (wrapped to fit), or None.
        ncols: images per row (default: about square).
        size: inches per image (at 80 dpi, 9 inches fill the website's column).
        fontsize: of the labels and captions, in points (9 points: 10 pixels at 80 dpi).
        title: above the grid, or None.
        rows: one label per row (written left of it), or None.
        cols: one label per column (written above it), or None.
    Returns:
        The matplotlib figure (shown inline in a notebook).
    """
    b = len(images)
    if captions is not None and len(captions) != b:
        raise ValueError(f"Got {len(captions)} captions for {b} images.")
    ncols = min(ncols or math.ceil(math.sqrt(b)), b)
    nrows = math.ceil(b / ncols)
    for name, labels, n in (("row", rows, nrows), ("column", cols, ncols)):
        if labels is not None and len(labels) != n:
            raise ValueError(f"Got {len(labels)} {name} labels for {n} {name}s.")
    wrapped = [_wrap(text, size, fontsize) for text in captions or []]
    text_height = _lines(wrapped) * fontsize / 72 * 1.3  # inches under each image
    rows = [_wrap(text, size, fontsize) for text in rows or []]
    cols = [_wrap(text, size, fontsize) for text in cols or []]
    left = max((len(line) for text in rows for line in text.split("\n")), default=0)
    left = left * fontsize * 0.6 / 72  # inches for the row labels
    top = _lines(cols) * fontsize / 72 * 1.3  # inches for the column labels
    figsize = (ncols * size + left, nrows * (size + text_height) + top)  # inches
    fig, axes = plt.subplots(nrows, ncols, squeeze=False, figsize=figsize)
    pixels = to_uint8(images)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i >= b:
            continue
        ax.imshow(pixels[i], interpolation="nearest")
        if wrapped:
            ax.set_title(wrapped[i], fontsize=fontsize, y=-0.02, va="top", pad=0)
    _label_axes(axes, rows, cols, fontsize)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def _label_axes(axes: np.ndarray, rows, cols, fontsize: float) -> None:
    """Write `rows` left of the first image of each row and `cols` above the first
    row's images, outside the images."""
    for ax, label in zip(axes[:, 0], rows):
        ax.text(-0.04, 0.5, label, transform=ax.transAxes, ha="right", va="center",
                fontsize=fontsize)  # fmt: skip
    for ax, label in zip(axes[0], cols):
        ax.text(0.5, 1.03, label, transform=ax.transAxes, ha="center", va="bottom",
                fontsize=fontsize)  # fmt: skip


def _lines(texts: list[str]) -> int:
    """The most lines in any of `texts` (0 for none)."""
    return max((text.count("\n") + 1 for text in texts), default=0)


def _wrap(text: str, size: float, fontsize=MIN_FONTSIZE) -> str:
    """Break a caption into lines that fit under an image `size` inches wide, at
    `fontsize` points (a character is about 0.6 times as wide as the font is high);
    its own line breaks stay."""
    width, lines = int(size * 72 / (fontsize * 0.6)), []
    for paragraph in text.split("\n"):
        line = ""
        for word in paragraph.split():
            if line and len(line) + 1 + len(word) > width:
                lines.append(line)
                line = word
            else:
                line = f"{line} {word}".strip()
        lines.append(line)
    return "\n".join(lines)


# The parts of the pipeline and the lessons that build them: (x, y, width, label,
# lessons), in the map's units; the labels between boxes need the gaps left for them.
_MAP_BOXES = {
    "prompt": (0.08, 0.62, 0.24, '"a red circle\nabove a blue square"', ""),
    "text": (0.35, 0.62, 0.16, "tokenizer +\ntext encoder", "lesson 05"),
    "unet": (0.69, 0.62, 0.16, "UNet with\ncross-attention", "lessons 03, 06"),
    "step": (0.69, 0.12, 0.16, "sampler step\n+ guidance", "lessons 02, 04, 07"),
    "vae": (0.98, 0.62, 0.16, "VAE decoder", "lesson 08"),
    "image": (1.17, 0.62, 0.12, "image", ""),
}


def pipeline_map(text_shape: str, latent_shape: str, image_shape: str) -> plt.Figure:
    """A map of Stable Diffusion's parts, the shapes passed between them, and the
    lessons that build each (lesson 00).

    Args:
        text_shape: the text encoder's output, e.g. "(1, 32, 96)".
        latent_shape: one latent, e.g. "4×8×8".
        image_shape: one image, e.g. "3×32×32".
    """
    from matplotlib.patches import FancyBboxPatch

    fig, ax = plt.subplots(figsize=(11.5, 3.6))
    ax.set_xlim(-0.06, 1.25)
    ax.set_ylim(-0.08, 1.0)
    ax.axis("off")
    ax.add_patch(FancyBboxPatch((0.59, -0.06), 0.2, 0.96, boxstyle="round,pad=0.01",
                                fc="none", ec="#999", ls="--"))  # fmt: skip
    ax.text(0.69, 0.93, f"latent space: {latent_shape}, every step (lessons 01, 09)",
            ha="center", fontsize=9, style="italic")  # fmt: skip
    style = dict(boxstyle="round,pad=0.01", ec="#446")
    for name, (x, y, width, label, lessons) in _MAP_BOXES.items():
        label = f"{label}\n{image_shape}" if name == "image" else label
        fill = "#dde8f7" if lessons else "#f2f2f2"  # built in a lesson, or not
        box = FancyBboxPatch((x - width / 2, y - 0.1), width, 0.2, fc=fill, **style)
        ax.add_patch(box)
        ax.text(x, y, label, ha="center", va="center", fontsize=9)
        ax.text(x, y + (0.13 if y > 0.5 else -0.16), lessons, ha="center",
                fontsize=9, color="#a33")  # fmt: skip
    arrows = [((0.21, 0.62), (0.26, 0.62), "text", 0.0, 0.045),
              ((0.44, 0.62), (0.6, 0.62), text_shape, -0.01, 0.05),
              ((0.78, 0.62), (0.89, 0.62), "final\nlatent", 0.02, 0.08),
              ((1.07, 0.62), (1.1, 0.62), "", 0.0, 0.0),
              ((0.66, 0.52), (0.66, 0.22), "ε̂", -0.02, 0.0),
              ((0.72, 0.22), (0.72, 0.52), "x_t", 0.025, 0.0)]  # fmt: skip
    for start, end, label, dx, dy in arrows:
        ax.annotate("", end, start, arrowprops=dict(arrowstyle="-|>", color="#223"))
        ax.text((start[0] + end[0]) / 2 + dx, (start[1] + end[1]) / 2 + dy, label,
                ha="center", va="center", fontsize=9)  # fmt: skip
    around = "around it: img2img and inpainting (lesson 10),\n"
    around += "the judge and FID (lesson 11)"
    ax.text(0.25, 0.12, around, ha="center", fontsize=9, color="#555")
    return fig
