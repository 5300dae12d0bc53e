"""Controls drawn from scenes: the outline lies on the rendered objects' boundary,
the mask is their rendered silhouette, read back from the rendered pictures."""

import pytest
import torch
import torch.nn.functional as F

from sdscratch.shapes.controls import draw_control, draw_controls
from sdscratch.shapes.data import BACKGROUND, Shapes, object_masks
from sdscratch.shapes.outline import components, coverage_by_colour


@pytest.fixture(scope="module", params=[32, 64])
def scenes(request):
    """120 test scenes, rendered at 32 or 64 pixels: images, attrs, size."""
    size = request.param
    images, _, attrs = Shapes("test", size=size, length=120).batch(range(120))
    return images, attrs, size


def test_mask_is_the_rendered_silhouette(scenes):
    images, attrs, size = scenes
    masks = draw_controls(attrs, "mask", size)  # (B, 3, H, W)
    assert masks.shape == (len(images), 3, size, size)
    assert torch.equal(masks, masks[:, :1].expand_as(masks))  # grey
    # read back from the pictures: a pixel is background + c · (colour − background)
    _, coverage = coverage_by_colour(images)  # (B, H, W)
    assert (masks[:, 0] - coverage).abs().max() < 1e-4
    # and nothing but the objects differs from the grey background
    painted = (images - BACKGROUND).abs().amax(1) > 1e-6
    assert torch.equal(painted, masks[:, 0] > 0)


def test_outline_lies_on_the_rendered_boundary(scenes):
    images, attrs, size = scenes
    edges = draw_controls(attrs, "outline", size)[:, 0]  # (B, H, W)
    _, coverage = coverage_by_colour(images)
    # the line's core: exactly the pixels a rendered object covers only in part
    boundary = (coverage > 1e-4) & (coverage < 1 - 1e-4)
    assert torch.equal(edges > 0.5, boundary)
    # and no line pixel lies deep inside an object or far out on the background
    inside = -F.max_pool2d(-(coverage > 0.999).float()[:, None], 3, 1, 1)[:, 0]
    outside = -F.max_pool2d(-(coverage < 1e-4).float()[:, None], 3, 1, 1)[:, 0]
    assert not ((edges > 0) & ((inside > 0) | (outside > 0))).any()


def test_outline_is_one_closed_line_per_object(scenes):
    _, attrs, size = scenes
    for scene in attrs:
        for obj in scene["objects"]:
            edges = draw_control({"objects": [obj], "relation": None}, size=size)[0]
            assert int(components((edges > 0.25)[None]).max()) == 1  # one line
            # closed: the object's inside is cut off from the picture's border
            holes = components((edges <= 0.25)[None])[0]
            border = {*holes[0].tolist(), *holes[-1].tolist(),
                      *holes[:, 0].tolist(), *holes[:, -1].tolist()}  # fmt: skip
            inside = (object_masks({"objects": [obj]}, size)[0] > 0.999) & (holes > 0)
            assert inside.any() and not set(holes[inside].tolist()) & border


def test_controls_ignore_colour_and_follow_the_shape():
    scene = Shapes("test", length=1)[0][2]
    objects = scene["objects"]
    recoloured = {**scene, "objects": [dict(o, colour="blue") for o in objects]}
    other = {o["shape"]: "star" if o["shape"] != "star" else "circle" for o in objects}
    reshaped = {**scene, "objects": [dict(o, shape=other[o["shape"]]) for o in objects]}
    for kind in ("outline", "mask"):
        control = draw_control(scene, kind)
        assert torch.equal(control, draw_control(recoloured, kind))
        assert (control - draw_control(reshaped, kind)).abs().max() > 0.5


def test_unknown_control_is_one_sentence():
    with pytest.raises(ValueError, match="Unknown control 'canny'"):
        draw_controls([Shapes("test", length=1)[0][2]], "canny")
