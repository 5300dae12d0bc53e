"""The outline measure: segmentation, the renderer's own outlines, and its reads of
real, blurred and broken scenes."""

import numpy as np
import pytest
import torch
from scipy import ndimage

from sdscratch.shapes.data import (
    ALL_SHAPES,
    Shapes,
    object_masks,
    render_batch,
)
from sdscratch.shapes.judge import gaussian_blur
from sdscratch.shapes.outline import (
    UNREADABLE,
    components,
    coverage_by_colour,
    ideal_coverage,
    outline_accuracy,
    outline_check,
    read_objects,
)
from sdscratch.viz import to_pil


def scene(shape, colour="red", size="small", position="center", **geometry):
    obj = {"shape": shape, "colour": colour, "size": size, "position": position}
    return {"objects": [obj | geometry], "relation": None}


def test_components_match_scipy():
    """The same partition as scipy.ndimage.label (4-neighbours) on random masks."""
    g = torch.Generator().manual_seed(0)
    masks = torch.rand(8, 24, 24, generator=g) < 0.45  # many odd components
    labels = components(masks)
    for mask, ours in zip(masks.numpy(), labels.numpy()):
        theirs, n = ndimage.label(mask)
        assert ours.max() == n
        pairs = set(zip(ours[mask].tolist(), theirs[mask].tolist()))
        assert len(pairs) == n  # a one-to-one map between the two labellings
        assert (ours[~mask] == 0).all()


def test_coverage_is_the_renderers():
    """On a rendered image, the coverage read back is the objects' masks."""
    images, _, scenes = Shapes("test", size=32).batch(range(6))
    _, coverage = coverage_by_colour(images)
    for c, attrs in zip(coverage, scenes):
        masks = object_masks(attrs, 32).sum(0)
        torch.testing.assert_close(c, masks, atol=1e-4, rtol=0)


def test_ideal_coverage_is_the_renderers():
    """`ideal_coverage` on pixel centres draws what `object_masks` draws."""
    centres = (np.arange(64, dtype=np.float32) + 0.5) / 64
    for shape in ALL_SHAPES:
        attrs = scene(shape, x=0.41, y=0.57, radius=0.16)
        cx, cy, radius = (np.float32([[[v]]]) for v in (0.41, 0.57, 0.16))
        xs, ys = centres[None, None, :], centres[None, :, None]
        ours = ideal_coverage(shape, cx, cy, radius, xs, ys, 64)
        np.testing.assert_allclose(ours[0], object_masks(attrs, 64)[0], atol=1e-5)


@pytest.mark.parametrize("size, novel", [(32, False), (64, False), (64, True)])
def test_reads_real_scenes(size, novel):
    """Every object of 60 real test scenes (small stars included; with `novel`,
    pink and hearts too) is read right."""
    images, _, scenes = Shapes("test", size=size, novel=novel).batch(range(60))
    shown = {(o["shape"], o["colour"]) for attrs in scenes for o in attrs["objects"]}
    assert novel == any("heart" in pair or "pink" in pair for pair in shown)
    result = outline_accuracy(images, scenes)
    assert result["objects"] == 1.0
    assert result["scene"] == 1.0
    assert result["mean_iou"] > 0.9


@pytest.mark.parametrize("size", ["small", "large"])
def test_each_shape_reads_as_itself(size):
    """Each shape (the novel heart too), alone and crisp, at 32 px: no reader that
    calls everything one shape passes this."""
    scenes = [scene(shape, size=size) for shape in ALL_SHAPES]
    reads = read_objects(render_batch(scenes, 32))
    assert [objects[0]["shape"] for objects in reads] == list(ALL_SHAPES)
    assert all(objects[0]["size"] == size for objects in reads)


def test_blurred_small_stars_crosses_diamonds_are_not_read_as_such():
    """Rounded by a Gaussian blur (σ = 1.5 px at 32), a small star, cross or diamond
    is a blob: unreadable, or another shape, but not what was drawn."""
    places = (("blue", "left"), ("yellow", "top"))
    scenes = [scene(shape, colour=colour, position=position)
              for shape in ("star", "cross", "diamond")
              for colour, position in places]  # fmt: skip
    images = render_batch(scenes, 32)
    assert outline_check(images, scenes)["shape"].all()  # crisp: right
    blurred = gaussian_blur(images, torch.full((len(images),), 1.5))
    assert not outline_check(blurred, scenes)["shape"].any()
    reads = read_objects(blurred)
    assert any(objects[0]["shape"] == UNREADABLE for objects in reads)


def test_check_counts_missing_and_extra_objects():
    """A missing object fails shape and position; an extra one fails position."""
    two = {"objects": [
        {"shape": "star", "colour": "red", "size": "large", "position": "top"},
        {"shape": "square", "colour": "blue", "size": "small", "position": "bottom"},
    ], "relation": "above"}  # fmt: skip
    top_only = {"objects": two["objects"][:1], "relation": None}
    images = render_batch([two, top_only], 32)
    right = outline_check(images, [top_only, two])
    assert right["position"].tolist() == [False, False]
    assert right["shape"].tolist() == [True, False]
    assert right["colour"].tolist() == [True, False]


def test_reads_pil_images_and_captions():
    images = render_batch([scene("triangle", "green", "large", "left")], 64)
    right = outline_check(to_pil(images), ["a large green triangle on the left"])
    assert right["scene"].all()
    wrong = outline_check(images, ["a large green circle on the left"])
    assert not wrong["shape"].any() and wrong["colour"].all()
