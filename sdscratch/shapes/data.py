"""Shapes: a procedural, captioned image dataset with ground-truth attributes.

Every image shows one or two shapes on a plain grey background, with a caption
(`sdscratch.shapes.captions`) of its attributes (`sdscratch.shapes.scenes`). Scenes
are drawn from a seed and a global index, rendered with anti-aliased signed distance
fields, and fast enough to generate on the fly. The names of the scenes and captions
modules are importable from here too: this module is the dataset's front door.
"""

import random
from collections import defaultdict

import numpy as np
import torch

from sdscratch.shapes.captions import (  # re-exported: the dataset's front door
    CAPTION_GRAMMARS,
    CAPTIONS,
    HELDOUT_TEMPLATES,
    NATURAL_PHRASINGS,
    NATURAL_WORDS,
    OMIT_ARTICLE,
    OMIT_POSITION,
    OMIT_SIZE,
    ONE_OBJECT_TEMPLATES,
    POSITION_WORDS,
    RELATION_WORDS,
    SIZE_WORDS,
    TWO_OBJECT_TEMPLATES,
    _grammar,
    asked_codes,
    canonical_caption,
    caption,
    codes_satisfy,
    describe,
    natural_caption,
    parse_caption,
    plain_caption,
    satisfies,
    satisfies_matrix,
    scene_codes,
    uses_template,
    vocabulary,
)
from sdscratch.shapes.scenes import (
    ALL_COLOURS,
    ALL_SHAPES,
    BACKGROUND,
    COLOURS,
    NOVEL_COLOURS,
    NOVEL_SHAPES,
    POSITIONS,
    RELATIONS,
    SHAPES,
    SIZES,
    SPLITS,
    concept_scenes,
    sample_attrs,
    strip_geometry,
)

__all__ = [
    "ALL_COLOURS",
    "ALL_SHAPES",
    "NOVEL_COLOURS",
    "NOVEL_SHAPES",
    "BACKGROUND",
    "CAPTIONS",
    "CAPTION_GRAMMARS",
    "COLOURS",
    "HELDOUT_TEMPLATES",
    "NATURAL_PHRASINGS",
    "NATURAL_WORDS",
    "OMIT_ARTICLE",
    "OMIT_POSITION",
    "OMIT_SIZE",
    "ONE_OBJECT_TEMPLATES",
    "POSITIONS",
    "POSITION_WORDS",
    "RELATIONS",
    "RELATION_WORDS",
    "SHAPES",
    "SIZES",
    "SIZE_WORDS",
    "SPLITS",
    "Shapes",
    "TWO_OBJECT_TEMPLATES",
    "asked_codes",
    "canonical_caption",
    "caption",
    "codes_satisfy",
    "collate",
    "concept_scenes",
    "describe",
    "natural_caption",
    "object_masks",
    "parse_caption",
    "plain_caption",
    "render",
    "render_batch",
    "sample_attrs",
    "satisfies",
    "satisfies_matrix",
    "scene_codes",
    "signed_distances",
    "strip_geometry",
    "uses_template",
    "vocabulary",
]

# ----------------------------------------------------------------------------------
# Rendering: signed distance fields (Quilez, "2D distance functions"), in units of the
# object's radius, on pixel centres. Negative inside, positive outside. They use only
# + - * / sqrt min max, which round exactly, so a pixel's value does not depend on
# how many images are rendered at once.


def _clamp(x, low, high):
    """np.clip, without its overhead on small arrays."""
    return np.minimum(np.maximum(x, low), high)


def _length(x, y):
    return np.sqrt(x * x + y * y)


def _box(x, y, half_width, half_height):
    qx, qy = np.abs(x) - half_width, np.abs(y) - half_height
    outside = _length(np.maximum(qx, 0.0), np.maximum(qy, 0.0))
    return outside + np.minimum(np.maximum(qx, qy), 0.0)


def _circle(x, y):
    return _length(x, y) - 1.0


def _square(x, y):
    return _box(x, y, 0.8, 0.8)


def _diamond(x, y, bx=0.8, by=1.0):
    """A rhombus, taller than wide, so that it is no rotated square."""
    x, y = np.abs(x), np.abs(y)
    h = _clamp(((bx - 2 * x) * bx - (by - 2 * y) * by) / (bx * bx + by * by), -1, 1)
    d = _length(x - 0.5 * bx * (1 - h), y - 0.5 * by * (1 + h))
    return d * np.sign(x * by + y * bx - bx * by)


def _triangle(x, y, qx=1.0, qy=1.85):
    """An isosceles triangle pointing up: apex at y = -1, base at y = 0.85."""
    x, y = np.abs(x), y + 1.0  # measured from the apex, downwards
    t = _clamp((x * qx + y * qy) / (qx * qx + qy * qy), 0, 1)
    ax, ay = x - qx * t, y - qy * t  # to the nearest point of the slanted side
    bx, by = x - qx * _clamp(x / qx, 0, 1), y - qy  # to the nearest point of the base
    squared = np.minimum(ax * ax + ay * ay, bx * bx + by * by)
    inside = np.maximum(x * qy - y * qx, y - qy) < 0  # below both sides
    return np.sqrt(squared) * np.where(inside, np.float32(-1), np.float32(1))


def _star(x, y, inner=0.5):
    """A five-pointed star pointing up; `inner` is the inner radius."""
    k1x, k1y = 0.809016994375, -0.587785252292  # fold lines of the 5-fold symmetry
    x, y = np.abs(x), -y  # y upwards from here on
    dot = np.maximum(k1x * x + k1y * y, 0.0)
    x, y = x - 2 * dot * k1x, y - 2 * dot * k1y
    dot = np.maximum(-k1x * x + k1y * y, 0.0)
    x, y = np.abs(x + 2 * dot * k1x), y - 2 * dot * k1y
    y = y - 1.0
    bax, bay = -inner * k1y, inner * k1x - 1.0  # from the tip to the inner corner
    h = _clamp((x * bax + y * bay) / (bax * bax + bay * bay), 0.0, 1.0)
    return _length(x - bax * h, y - bay * h) * np.sign(y * bax - x * bay)


def _cross(x, y, arm=0.95, half_thickness=0.32):
    return np.minimum(_box(x, y, arm, half_thickness), _box(x, y, half_thickness, arm))


def _heart(x, y, k=0.55):
    """A heart, lobes up, tip down (Quilez's heart, scaled by 1/k to span y in
    [-1, 1])."""
    x, y = np.abs(x) * k, 0.55 - y * k  # Quilez's frame: tip at 0, y upwards
    lobe = _length(x - 0.25, y - 0.75) - np.sqrt(np.float32(2.0)) / 4
    t = np.maximum(x + y, 0.0) * 0.5
    point = np.minimum((x * x + (y - 1.0) ** 2), (x - t) ** 2 + (y - t) ** 2)
    lower = np.sqrt(point) * np.sign(x - y)
    return np.where(x + y > 1.0, lobe, lower) / k


SDFS = {
    "circle": _circle,
    "square": _square,
    "triangle": _triangle,
    "diamond": _diamond,
    "star": _star,
    "cross": _cross,
    "heart": _heart,
}
_RGB = {
    name: np.array(rgb, np.float32) / 127.5 - 1 for name, rgb in ALL_COLOURS.items()
}


def _geometry(obj) -> tuple:
    x, y = POSITIONS[obj["position"]]
    return obj.get("x", x), obj.get("y", y), obj.get("radius", SIZES[obj["size"]])


def signed_distances(objects: list, size=32) -> np.ndarray:
    """Each object's signed distance from each pixel centre to its edge, in pixels.

    Args:
        objects: object dicts of scenes' attrs (see `sdscratch.shapes.scenes`).
        size: the image side in pixels.
    Returns:
        (K, H, W) float32 for K objects: negative inside, positive outside.
    """
    centres = (np.arange(size, dtype=np.float32) + 0.5) / size  # pixel centres
    out = np.empty((len(objects), size, size), np.float32)
    groups = defaultdict(list)
    for i, obj in enumerate(objects):
        groups[obj["shape"]].append(i)
    for shape, members in groups.items():
        geometry = np.array([_geometry(objects[i]) for i in members], np.float32)
        cx, cy, radius = (geometry[:, k, None, None] for k in range(3))  # (n, 1, 1)
        x = (centres[None, None, :] - cx) / radius  # (n, 1, W)
        y = (centres[None, :, None] - cy) / radius  # (n, H, 1)
        out[members] = SDFS[shape](x, y) * (radius * size)  # (n, H, W)
    return out


def _coverage(objects, size) -> np.ndarray:
    """The fraction of each pixel that each object covers, (N, H, W) float32.

    The coverage of a pixel is clamp(0.5 - d, 0, 1) with d the signed distance from
    its centre to the shape's edge, in pixels: a one-pixel ramp, i.e. anti-aliasing.
    """
    return _clamp(0.5 - signed_distances(objects, size), 0.0, 1.0)


def object_masks(attrs: dict, size=32) -> torch.Tensor:
    """Each object's coverage of each pixel, (K, H, W) in [0, 1] for K objects."""
    return torch.from_numpy(_coverage(attrs["objects"], size))


def render_batch(scenes: list, size=32) -> torch.Tensor:
    """Draw scenes, (N, 3, H, W) float32 in [-1, 1]; fast, vectorised over scenes.

    Objects never overlap, so each pixel is the background plus each object's
    coverage times (its colour - the background).
    """
    firsts = [scene["objects"][0] for scene in scenes]
    seconds = [
        (i, scene["objects"][1])
        for i, scene in enumerate(scenes)
        if len(scene["objects"]) > 1
    ]
    objects = firsts + [obj for _, obj in seconds]  # all N first objects, then the rest
    paint = np.stack([_RGB[obj["colour"]] for obj in objects]) - BACKGROUND  # (M, 3)
    coverage = _coverage(objects, size)[:, None]  # (M, 1, H, W)
    strokes = coverage * paint[:, :, None, None]  # (M, 3, H, W)
    images = BACKGROUND + strokes[: len(scenes)]  # (N, 3, H, W)
    images[[i for i, _ in seconds]] += strokes[len(scenes) :]
    return torch.from_numpy(images)


def render(attrs: dict, size=32) -> torch.Tensor:
    """Draw one scene, (3, H, W) float32 in [-1, 1] (`size` = H = W pixels)."""
    return render_batch([attrs], size)[0]


# ----------------------------------------------------------------------------------
# The dataset


class Shapes(torch.utils.data.Dataset):
    """Captioned shape scenes, generated on the fly: `ds[i] -> (image, caption, attrs)`.

    Scene i of a split is global scene `SPLITS[split][0] + i`, drawn from a generator
    seeded with (seed, global index): the same seed, split and index give the same
    bytes in any order and any process, and the splits never share a scene.

    Args:
        split: "train", "val" or "test".
        size: image width and height in pixels (32, or 64 for the same scenes larger).
        seed: selects the whole family of scenes.
        length: number of scenes (default: 100,000 for train, 10,000 for val/test,
            which is also their maximum).
        captions: "templates" (every caption names every attribute) or "natural"
            (captions as people write them, `natural_caption`); default `CAPTIONS`.
            The scenes and images are the same either way.
        novel: scenes with the novel shape and colour too (`NOVEL_SHAPES`,
            `NOVEL_COLOURS`; they then differ from the base world's).
    """

    def __init__(
        self, split="train", size=32, seed=0, length=None, captions=None, novel=False
    ):
        self.captions, self.novel = _grammar(captions), novel
        if split not in SPLITS:
            raise ValueError(f"Unknown split {split!r}; choose one of {list(SPLITS)}.")
        self.split, self.size, self.seed = split, size, seed
        self.start, default = SPLITS[split]
        self.length = default if length is None else length
        if split != "train" and not 0 <= self.length <= default:
            raise ValueError(f"The {split} split has at most {default} scenes.")

    def __len__(self):
        return self.length

    def global_index(self, i: int) -> int:
        """The index of scene i of this split in the index space all splits share."""
        if not -self.length <= i < self.length:
            raise IndexError(f"Scene {i} is out of range for {self.length} scenes.")
        return self.start + i % self.length

    def scene(self, i: int) -> tuple[str, dict]:
        """(caption, attrs) of scene i, without drawing it."""
        # Python's generator: seeding from a string is stable across processes and
        # versions, and much faster than numpy's for one small scene.
        rng = random.Random(f"shapes/{self.seed}/{self.global_index(i)}")
        attrs = sample_attrs(rng, novel=self.novel)
        return describe(attrs, rng, self.captions), attrs

    def batch(self, indices) -> tuple[torch.Tensor, list, list]:
        """Scenes `indices` as one batch, rendered together (faster than one by one).

        Returns:
            images (B, 3, H, W) in [-1, 1], B captions, B attrs: what `collate` makes.
        """
        captions, scenes = zip(*[self.scene(int(i)) for i in indices])
        return render_batch(scenes, self.size), list(captions), list(scenes)

    def __getitem__(self, i):
        images, captions, scenes = self.batch([i])
        return images[0], captions[0], scenes[0]

    def __getitems__(self, indices):
        """A DataLoader with a batch size fetches its batches through this, at speed."""
        images, captions, scenes = self.batch(indices)
        return list(zip(images, captions, scenes))

    def __repr__(self):
        return (
            f"Shapes(split={self.split!r}, size={self.size}, seed={self.seed}, "
            f"length={self.length}, captions={self.captions!r}, novel={self.novel})"
        )


def collate(batch):
    """DataLoader collate: [(image, caption, attrs)] -> (images, captions, attrs).

    Returns:
        images (B, 3, H, W), a list of B captions, a list of B attrs dicts.
    """
    images, captions, scenes = zip(*batch)
    return torch.stack(images), list(captions), list(scenes)
