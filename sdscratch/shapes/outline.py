"""The outline measure: does each object's outline match the shape it should be?

A classifier can learn to call a round blob "a star"; an outline cannot. For each
image this module finds the objects (pixels far from the grey background, split into
connected components), reads each one's colour (the nearest palette colour), fits
its centre and radius, and compares its pixels with the ideal outline of every shape
at that centre and radius, drawn by the renderer itself (`sdscratch.shapes.data`).
The measure is the soft intersection over union of the object's coverage a and the
shape's coverage m, Σ min(a, m) / Σ max(a, m), with both coverage ramps steepened
from one pixel to half a pixel (`outline_iou`). The shape read is the best fitting
one, and a blob that fits no shape well (best IoU below `MIN_IOU`) reads as
"unreadable". Position follows from the fitted centre, size from the fitted radius
(from the blob's extent if it fits no shape).

    read_objects(images)              what is in each image, object by object
    outline_check(images, scenes)     which asked attributes each image shows
    outline_accuracy(images, scenes)  the fractions right, and the mean IoU
"""

import functools

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange

from sdscratch.metrics import as_tensor
from sdscratch.shapes.data import (
    ALL_COLOURS,
    ALL_SHAPES,
    BACKGROUND,
    POSITIONS,
    SDFS,
    SIZES,
    parse_caption,
)

UNREADABLE = "unreadable"  # the shape of a blob that fits no shape well
# A blob whose best IoU is below this fits no shape, by its size (extent). Chosen
# from Gaussian-blurred renders (benchmarks/outline.py): blurred by σ = 0.5 px at
# 32 pixels, every shape of either size still reads as itself; by σ = 1 px, small
# stars, crosses and triangles and large stars become blobs that read as no shape,
# while the other large shapes keep theirs. At 64 pixels the same blur (σ = 2 px)
# does the same, and small diamonds also read as no shape.
MIN_IOU = {"small": 0.85, "large": 0.78}
MIN_AREA = 0.2  # a component smaller than this share of a small circle is a speck
SPLIT_SIZE = (SIZES["small"] * SIZES["large"]) ** 0.5  # small below, large above
# The refinement of centre and radius: steps in pixels (centre) and in relative
# radius, coarse to fine; at each step size the best of 3×3×3 moves is taken.
STEPS = ((1.0, 0.08), (0.5, 0.04), (0.25, 0.02), (0.125, 0.01))
# Every colour and shape the renderer draws, the novel ones too: a reader should say
# what it sees, even what a model was not taught.
_PALETTE = torch.tensor(list(ALL_COLOURS.values()), dtype=torch.float32) / 127.5 - 1


# ----------------------------------------------------------------------------------
# Segmentation: which pixels belong to which object


def coverage_by_colour(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each pixel as background + c · (colour − background): the best colour and c.

    Anti-aliased edges are exactly such mixtures, so c is the object's coverage of
    the pixel (1 inside, 0 on the background).

    Args:
        images: (B, 3, H, W) in [-1, 1].
    Returns:
        colour index (B, H, W) long into `ALL_COLOURS`, coverage c (B, H, W) in [0, 1].
    """
    offset = rearrange(images.float() - BACKGROUND, "b c h w -> b h w 1 c")
    paint = _PALETTE - BACKGROUND  # (K, 3)
    c = (offset * paint).sum(-1) / paint.square().sum(-1)  # (B, H, W, K)
    c = c.clamp(0, 1)
    residual = (offset - c[..., None] * paint).square().sum(-1)  # (B, H, W, K)
    best = residual.argmin(-1)  # (B, H, W)
    return best, c.gather(-1, best[..., None])[..., 0]


def components(mask: torch.Tensor) -> torch.Tensor:
    """Connected components (4-neighbours) of a mask: (B, H, W) bool -> (B, H, W)
    long labels, 0 on the background, 1 … n in each image (in raster order)."""
    b, h, w = mask.shape
    ids = torch.arange(1, h * w + 1).view(1, h, w).expand(b, h, w)
    labels = torch.where(mask, ids, 0)
    while True:  # spread the largest id over each component
        padded = F.pad(labels, (1, 1, 1, 1))
        neighbours = torch.stack([
            padded[:, 1:-1, 1:-1], padded[:, :-2, 1:-1], padded[:, 2:, 1:-1],
            padded[:, 1:-1, :-2], padded[:, 1:-1, 2:],
        ])  # fmt: skip
        spread = torch.where(mask, neighbours.amax(0), 0)
        if torch.equal(spread, labels):
            break
        labels = spread
    out = torch.zeros_like(labels)
    for i in range(b):  # renumber 1 … n
        values = labels[i].unique()
        values = values[values > 0]
        out[i] = torch.searchsorted(values, labels[i]) + 1
    return torch.where(mask, out, 0)


# ----------------------------------------------------------------------------------
# The ideal outlines


@functools.cache
def _unit_moments(shape: str, n=512) -> tuple[float, float]:
    """A shape of radius 1: its area and the y of its centroid (its x is 0)."""
    grid = (np.arange(n, dtype=np.float32) + 0.5) / n * 2.4 - 1.2  # [-1.2, 1.2]
    inside = SDFS[shape](grid[None, :], grid[:, None]) < 0  # (n, n)
    area = inside.mean() * 2.4**2
    return float(area), float((inside * grid[:, None]).mean() * 2.4**2 / area)


def ideal_coverage(shape, cx, cy, radius, xs, ys, size) -> np.ndarray:
    """The renderer's coverage of pixels by a shape: clamp(0.5 − d, 0, 1), with d the
    signed distance in pixels (as `sdscratch.shapes.data.object_masks` draws it).

    Args:
        shape: a name in `ALL_SHAPES`.
        cx, cy, radius: (N, 1, 1) centres and radii, in units of the image width.
        xs, ys: (N, 1, S) and (N, S, 1) pixel centres, in units of the image width.
        size: the image width in pixels.
    Returns:
        (N, S, S) float32 coverage.
    """
    distance = SDFS[shape]((xs - cx) / radius, (ys - cy) / radius) * (radius * size)
    return np.clip(0.5 - distance, 0.0, 1.0).astype(np.float32)


def soft_iou(a: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Σ min(a, m) / Σ max(a, m) over the last two axes: (..., S, S) -> (...)."""
    union = np.maximum(a, m).sum((-2, -1))
    return np.minimum(a, m).sum((-2, -1)) / np.maximum(union, 1e-6)


def outline_iou(a: np.ndarray, m: np.ndarray) -> np.ndarray:
    """The soft IoU of two coverages with their one-pixel ramps steepened to half a
    pixel, clip(2c − 0.5, 0, 1): (..., S, S) -> (...).

    A slightly soft edge (a decoder's) then costs little, while a rounded corner or
    a missing star tip costs as much as it would on a crisp image.
    """
    return soft_iou(np.clip(2 * a - 0.5, 0, 1), np.clip(2 * m - 0.5, 0, 1))


def fit_shapes(a: np.ndarray, xs: np.ndarray, ys: np.ndarray, size: int) -> dict:
    """Fit every shape to a blob: centre and radius that maximise the IoU.

    Each shape starts at the radius its area implies and the centre its centroid
    implies (a triangle's centre lies above its centroid), then walks `STEPS`: at
    each step size, the best of the 27 moves (centre ± step, radius × (1 ± step))
    until none improves.

    Args:
        a: (S, S) the blob's coverage of a crop of pixels.
        xs, ys: (S,) the crop's pixel centres, in units of the image width.
        size: the image width in pixels.
    Returns:
        {shape: (iou, x, y, radius)} for every shape in `ALL_SHAPES`.
    """
    area = max(float(a.sum()), 1.0)  # pixels
    mx = float((a.sum(0) * xs).sum()) / area
    my = float((a.sum(1) * ys).sum()) / area
    moves = np.array([(i, j, k) for i in (-1, 0, 1) for j in (-1, 0, 1)
                      for k in (-1, 0, 1)], np.float32)  # fmt: skip
    fits = {}
    for shape in ALL_SHAPES:
        unit_area, unit_y = _unit_moments(shape)
        radius = (area / unit_area) ** 0.5 / size
        best = np.array([mx, my - unit_y * radius, radius], np.float32)
        iou = -1.0
        for step, scale in STEPS:
            for _ in range(4):
                cx = best[0] + moves[:, 0] * step / size
                cy = best[1] + moves[:, 1] * step / size
                r = best[2] * (1 + moves[:, 2] * scale)
                m = ideal_coverage(shape, cx[:, None, None], cy[:, None, None],
                                   r[:, None, None], xs[None, None, :],
                                   ys[None, :, None], size)  # fmt: skip
                ious = outline_iou(a[None], m)  # (27,)
                if ious.max() <= iou + 1e-6:
                    break
                iou, best = float(ious.max()), np.array([cx, cy, r])[:, ious.argmax()]
        fits[shape] = (iou, *map(float, best))
    return fits


# ----------------------------------------------------------------------------------
# Reading the objects of an image


def read_objects(images, min_iou=MIN_IOU) -> list[list[dict]]:
    """What each image shows, object by object, as its outlines read.

    Args:
        images: (B, 3, H, W) in [-1, 1], or B PIL images.
        min_iou: {size: IoU} (or one IoU for both sizes): a blob whose best fit is
            below it reads as `UNREADABLE`.
    Returns:
        B lists, one dict per object (specks too small to be an object are left
        out): "shape" (the best fitting, or "unreadable"), "colour", "size",
        "position" (nearest to the fitted centre), "x", "y", "radius" (fitted, in
        units of the image width), "iou" (the best fit's), "ious" ({shape: IoU}) and
        "area" (pixels of the component).
    """
    images = as_tensor(images)
    size = images.shape[-1]
    _, coverage = coverage_by_colour(images)
    labels = components(coverage > 0.5)  # (B, H, W)
    offset = rearrange(images - BACKGROUND, "b c h w -> b h w 1 c")
    paint = _PALETTE - BACKGROUND
    projected = ((offset * paint).sum(-1) / paint.square().sum(-1)).clamp(0, 1)
    min_area = MIN_AREA * np.pi * (SIZES["small"] * size) ** 2
    reads = []
    for b in range(len(images)):
        objects = []
        for k in range(1, int(labels[b].max()) + 1):
            pixels = labels[b] == k  # (H, W)
            if pixels.sum() >= min_area:
                blob = _blob(images[b], labels[b], pixels, projected[b])
                objects.append(_read_blob(*blob, size, min_iou))
        reads.append(objects)
    return reads


def _blob(image, labels, pixels, projected) -> tuple:
    """One component -> (its colour, its coverage a (H, W), its pixel count).

    The colour is the palette's nearest to the mean of its pixels; a is the
    coverage of that colour over the component grown by one pixel (the anti-aliased
    rim), without other components' pixels.
    """
    mean = image[:, pixels].mean(1)  # (3,)
    colour = int((_PALETTE - mean).square().sum(1).argmin())
    grown = F.max_pool2d(pixels[None, None].float(), 3, 1, 1)[0, 0].bool()
    region = grown & ((labels == 0) | pixels)
    a = (projected[..., colour] * region).numpy()
    return colour, a, int(pixels.sum())


def _read_blob(colour, a, area, size, min_iou) -> dict:
    """Fit shapes to a blob's coverage a (H, W) on a crop around it; read it."""
    rows, cols = np.nonzero(a)
    half = int(np.ceil(max(np.ptp(rows), np.ptp(cols)) / 2)) + 3
    top, left = int(rows.mean()) - half, int(cols.mean()) - half
    top, left = max(top, 0), max(left, 0)
    crop = a[top : top + 2 * half + 1, left : left + 2 * half + 1]
    centres = (np.arange(size, dtype=np.float32) + 0.5) / size
    ys = centres[top : top + crop.shape[0]]
    xs = centres[left : left + crop.shape[1]]
    fits = fit_shapes(crop, xs, ys, size)
    shape = max(fits, key=lambda name: fits[name][0])
    iou, x, y, radius = fits[shape]
    # The size by the blob's extent (every shape's is about 2 radii), which does
    # not depend on which shape fits best; by the fitted radius if one fits.
    inside_rows, inside_cols = np.nonzero(a > 0.5)
    extent = max(np.ptp(inside_rows), np.ptp(inside_cols)) + 1  # pixels
    size_read = "small" if extent / 2 / size < SPLIT_SIZE else "large"
    if isinstance(min_iou, dict):
        min_iou = min_iou[size_read]
    if iou >= min_iou:
        size_read = "small" if radius < SPLIT_SIZE else "large"
    position = min(POSITIONS, key=lambda p: (POSITIONS[p][0] - x) ** 2
                   + (POSITIONS[p][1] - y) ** 2)  # fmt: skip
    return {
        "shape": shape if iou >= min_iou else UNREADABLE,
        "colour": tuple(ALL_COLOURS)[colour],
        "size": size_read,
        "position": position,
        "x": x, "y": y, "radius": radius, "iou": iou,
        "ious": {name: fit[0] for name, fit in fits.items()},
        "area": area,
    }  # fmt: skip


# ----------------------------------------------------------------------------------
# Reads against prompts


def _asked(scene, objects: list) -> dict:
    """The scene's attrs, each value a prompt left out (None: any) taken from the
    object read there; an object asked without a position is the image's one
    object (if the outline reads exactly one; else it stays unplaced and is found
    nowhere, as a missing object)."""
    attrs = parse_caption(scene) if isinstance(scene, str) else scene
    filled = []
    for obj in attrs["objects"]:
        if obj["position"] is None:
            there = objects if len(objects) == 1 else []
        else:
            there = [read for read in objects if read["position"] == obj["position"]]
        if len(there) == 1:
            obj = {key: there[0][key] if value is None else value
                   for key, value in obj.items()}  # fmt: skip
        filled.append(obj)
    return attrs | {"objects": filled}


def match(objects: list, scene) -> list:
    """For each object a scene asks for, the object read at its position (None if
    there is none, or more than one)."""
    found = []
    for asked in _asked(scene, objects)["objects"]:
        there = [obj for obj in objects if obj["position"] == asked["position"]]
        found.append(there[0] if len(there) == 1 else None)
    return found


def outline_check(images, scenes, reads=None) -> dict[str, torch.Tensor]:
    """Which requested attributes each image shows, as its outlines read.

    The same verdicts as `sdscratch.shapes.judge.check`, from `read_objects`; an
    attribute a prompt leaves out accepts what is read (see `_asked`).

    Args:
        images: (B, 3, H, W) in [-1, 1], or B PIL images.
        scenes: B attrs or captions: what was asked.
        reads: `read_objects(images)`, if already made.
    Returns:
        {name: (B,) bool} for "position" (objects at exactly the requested
        positions, none elsewhere), "shape", "colour", "size" (of every requested
        object, at its position; an unreadable blob has no shape) and "scene".
    """
    reads = read_objects(images) if reads is None else reads
    if len(reads) != len(scenes):
        raise ValueError(f"{len(reads)} images but {len(scenes)} scenes.")
    right = {name: [] for name in ("position", "shape", "colour", "size")}
    for objects, scene in zip(reads, scenes):
        asked = _asked(scene, objects)["objects"]
        positions = sorted(obj["position"] for obj in objects)
        right["position"].append(positions == sorted(o["position"] for o in asked))
        found = match(objects, scene)
        for name in ("shape", "colour", "size"):
            right[name].append(all(
                obj is not None and obj[name] == want[name]
                for obj, want in zip(found, asked)
            ))  # fmt: skip
    right = {name: torch.tensor(values) for name, values in right.items()}
    right["scene"] = torch.stack(list(right.values())).all(0)
    return right


def asked_ious(reads: list, scenes) -> list[float]:
    """The IoU of each requested object's blob with the requested shape (0 where no
    object is at its position), over all scenes' objects in order."""
    ious = []
    for objects, scene in zip(reads, scenes):
        for obj, want in zip(match(objects, scene), _asked(scene, objects)["objects"]):
            ious.append(0.0 if obj is None else obj["ious"][want["shape"]])
    return ious


def outline_accuracy(images, scenes, reads=None) -> dict[str, float]:
    """The fraction of images that show each requested attribute right
    (`outline_check`), the fraction of requested objects read right in every
    attribute ("objects"), and the mean IoU of requested objects with their shape
    ("mean_iou")."""
    reads = read_objects(images) if reads is None else reads
    result = {
        name: ok.double().mean().item()
        for name, ok in outline_check(images, scenes, reads).items()
    }
    keys = ("shape", "colour", "size", "position")
    objects = [
        obj is not None and all(obj[key] == want[key] for key in keys)
        for found, scene in zip(reads, scenes)
        for obj, want in zip(match(found, scene), _asked(scene, found)["objects"])
    ]
    result["objects"] = sum(objects) / max(len(objects), 1)
    ious = asked_ious(reads, scenes)
    result["mean_iou"] = sum(ious) / max(len(ious), 1)
    return result
