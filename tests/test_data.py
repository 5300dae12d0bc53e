import colorsys
import hashlib
import itertools
import math
import random
import subprocess
import sys

import numpy as np
import pytest
import torch

from sdscratch.shapes.data import (
    BACKGROUND,
    COLOURS,
    ONE_OBJECT_TEMPLATES,
    POSITION_WORDS,
    POSITIONS,
    RELATION_WORDS,
    RELATIONS,
    SHAPES,
    SIZE_WORDS,
    SIZES,
    SPLITS,
    TWO_OBJECT_TEMPLATES,
    Shapes,
    canonical_caption,
    caption,
    collate,
    object_masks,
    parse_caption,
    render,
    render_batch,
    sample_attrs,
    strip_geometry,
    vocabulary,
)

N = 600  # scenes per statistical test: enough to meet every attribute value


@pytest.fixture(scope="module")
def scenes():
    """(caption, attrs) of the first N test scenes."""
    ds = Shapes("test")
    return [ds.scene(i) for i in range(N)]


def one(shape="circle", colour="red", size="large", position="center", **geometry):
    """A one-object scene, by hand."""
    obj = {"shape": shape, "colour": colour, "size": size, "position": position}
    return {"objects": [{**obj, **geometry}], "relation": None}


# ----------------------------------------------------------------------------------
# What the scenes contain


def test_attribute_counts():
    assert len(SHAPES) >= 4 and len(COLOURS) >= 6
    assert len(SIZES) == 2 and len(POSITIONS) == 5
    assert set(RELATIONS) == {"above", "below", "left of", "right of"}


def test_every_attribute_value_occurs(scenes):
    objects = [obj for _, attrs in scenes for obj in attrs["objects"]]
    assert {obj["shape"] for obj in objects} == set(SHAPES)
    assert {obj["colour"] for obj in objects} == set(COLOURS)
    assert {obj["size"] for obj in objects} == set(SIZES)
    assert {obj["position"] for obj in objects} == set(POSITIONS)
    relations = [attrs["relation"] for _, attrs in scenes]
    assert set(relations) == {None, *RELATIONS}
    assert 0.4 < relations.count(None) / len(relations) < 0.6


def test_colours_have_clearly_different_hues_and_stand_out_from_the_background():
    hues = [colorsys.rgb_to_hsv(*(c / 255 for c in rgb))[0] for rgb in COLOURS.values()]
    for a, b in itertools.combinations(hues, 2):
        assert min(abs(a - b), 1 - abs(a - b)) * 360 >= 20
    grey = (BACKGROUND + 1) * 127.5
    for rgb in COLOURS.values():
        assert math.dist(rgb, (grey,) * 3) > 100


def test_two_objects_follow_their_relation_and_differ(scenes):
    for _, attrs in scenes:
        if attrs["relation"] is None:
            assert len(attrs["objects"]) == 1
            continue
        first, second = attrs["objects"]
        positions = first["position"], second["position"]
        assert positions == RELATIONS[attrs["relation"]]
        look = [(o["shape"], o["colour"], o["size"]) for o in (first, second)]
        assert look[0] != look[1]


# ----------------------------------------------------------------------------------
# Determinism and splits


def test_same_seed_split_index_gives_the_same_bytes_in_any_order():
    a, b = Shapes("val"), Shapes("val")
    forward = [a[i] for i in range(8)]
    backward = [b[i] for i in reversed(range(8))][::-1]
    for (x, cx, ax), (y, cy, ay) in zip(forward, backward):
        assert x.numpy().tobytes() == y.numpy().tobytes()
        assert cx == cy and ax == ay
    assert Shapes("val", seed=1)[0][1:] != a[0][1:]


def test_same_bytes_in_another_process():
    code = (
        "import hashlib; from sdscratch.shapes.data import Shapes; "
        "print(hashlib.sha256(Shapes('train')[123][0].numpy().tobytes()).hexdigest())"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    here = hashlib.sha256(Shapes("train")[123][0].numpy().tobytes()).hexdigest()
    assert out.stdout.strip() == here


def test_batch_rendering_gives_the_same_bytes_as_one_by_one():
    ds = Shapes("test", size=64)
    images, captions, attrs = ds.batch(range(40))
    for i in range(40):
        image, text, scene = ds[i]
        assert image.numpy().tobytes() == images[i].numpy().tobytes()
        assert (text, scene) == (captions[i], attrs[i])


def test_splits_never_share_an_index():
    indices = {}
    for split in SPLITS:
        ds = Shapes(split, length=None if split != "train" else 50_000)
        indices[split] = range(ds.global_index(0), ds.global_index(len(ds) - 1) + 1)
    for a, b in itertools.combinations(indices.values(), 2):
        assert not set(a) & set(b)
    assert len(Shapes("val")) == len(Shapes("test")) == 10_000
    assert len(Shapes("train", length=7)) == 7
    with pytest.raises(ValueError, match="at most 10000"):
        Shapes("test", length=10_001)
    with pytest.raises(ValueError, match="Unknown split"):
        Shapes("dev")
    with pytest.raises(IndexError):
        Shapes("val")[10_000]
    assert Shapes("val")[-1][1] == Shapes("val")[9_999][1]


def test_splits_differ_in_content():
    captions = {
        split: [Shapes(split).scene(i)[0] for i in range(50)] for split in SPLITS
    }
    assert captions["train"] != captions["val"] != captions["test"]


# ----------------------------------------------------------------------------------
# Rendering


def test_images_are_float_in_range_with_the_right_shape():
    for size in (32, 64):
        image, _, _ = Shapes("test", size=size)[3]
        assert image.shape == (3, size, size) and image.dtype == torch.float32
        assert image.min() >= -1 and image.max() <= 1


def test_edges_are_anti_aliased():
    image = render(one("circle", "blue"))
    coverage = object_masks(one("circle", "blue"))[0]
    partial = (coverage > 0.05) & (coverage < 0.95)
    assert partial.sum() >= 12, "a ring of partly covered pixels around the circle"
    blue = torch.tensor(COLOURS["blue"]) / 127.5 - 1
    pure = [torch.full((3,), BACKGROUND), blue]
    pixels = image.reshape(3, -1).T  # (H * W, 3)
    mixed = [p for p in pixels if all((p - q).abs().max() > 0.05 for q in pure)]
    assert len(mixed) >= 12, "edge pixels mix the colour with the background"


@pytest.mark.parametrize(
    "shape, area",  # in units of radius**2
    [
        ("circle", math.pi),
        ("square", 1.6**2),
        ("triangle", 1.0 * 1.85),
        ("diamond", 2 * 0.8 * 1.0),
        ("star", 5 * 1.0 * 0.5 * math.sin(math.radians(36))),
        ("cross", 2 * 1.9 * 0.64 - 0.64**2),
    ],
)
def test_coverage_adds_up_to_the_shape_area(shape, area):
    """Coverage from a signed distance is exact on straight edges, close elsewhere."""
    for size in (32, 64):
        coverage = object_masks(one(shape, x=0.47, y=0.53), size)[0]
        pixels = area * (SIZES["large"] * size) ** 2
        assert coverage.sum().item() == pytest.approx(pixels, rel=0.015)


@pytest.mark.parametrize(
    "shape, inside, outside",  # points in units of the radius, y downwards
    [
        ("circle", (0.0, 0.95), (0.7, 0.75)),
        ("square", (0.75, 0.75), (0.0, 0.85)),
        ("triangle", (0.0, -0.9), (0.6, -0.5)),
        ("diamond", (0.0, 0.85), (0.5, 0.5)),
        ("star", (0.0, -0.8), (0.0, 0.6)),
        ("cross", (0.0, 0.9), (0.6, 0.6)),
    ],
)
def test_shapes_have_their_outline(shape, inside, outside):
    size, radius = 256, SIZES["large"]
    coverage = object_masks(one(shape), size)[0]
    for (x, y), expected in ((inside, 1.0), (outside, 0.0)):
        column = int((0.5 + x * radius) * size)
        row = int((0.5 + y * radius) * size)
        assert coverage[row, column] == expected, (x, y)


def test_the_shapes_differ_even_when_small():
    masks = {s: object_masks(one(s, size="small"))[0] for s in SHAPES}
    for a, b in itertools.combinations(SHAPES, 2):
        assert (masks[a] - masks[b]).abs().sum() > 6, (a, b)


def test_64_pixels_show_the_same_scene_scaled():
    small, large = Shapes("test", size=32), Shapes("test", size=64)
    for i in range(20):
        (x32, c32, a32), (x64, c64, a64) = small[i], large[i]
        assert (c32, a32) == (c64, a64)
        pooled = torch.nn.functional.avg_pool2d(x64[None], 2)[0]
        assert (pooled - x32).abs().mean() < 0.01


def centroids(masks):
    """(x, y) of the centre of mass of each (H, W) mask, in pixels."""
    size = masks.shape[-1]
    ys, xs = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    mass = masks.sum((1, 2))
    x, y = (masks * xs).sum((1, 2)) / mass, (masks * ys).sum((1, 2)) / mass
    return list(zip(x.tolist(), y.tolist()))


def test_objects_never_overlap_and_sit_where_their_attrs_say():
    ds = Shapes("train", size=32)
    centres = {p: [v * 32 - 0.5 for v in xy] for p, xy in POSITIONS.items()}
    for i in range(300):
        _, _, attrs = ds[i]
        masks = object_masks(attrs)
        if len(masks) == 2:
            assert (masks[0] * masks[1] == 0).all(), "not even edge pixels are shared"
        for obj, centroid in zip(attrs["objects"], centroids(masks)):
            nearest = min(POSITIONS, key=lambda p: math.dist(centroid, centres[p]))
            assert nearest == obj["position"]


def test_relations_are_geometrically_true(scenes):
    for _, attrs in scenes:
        if attrs["relation"] is None:
            continue
        (x0, y0), (x1, y1) = centroids(object_masks(attrs))
        gap = 8  # pixels, at least
        true = {
            "above": y0 < y1 - gap,
            "below": y0 > y1 + gap,
            "left of": x0 < x1 - gap,
            "right of": x0 > x1 + gap,
        }
        assert true[attrs["relation"]], attrs


def test_size_and_colour_are_recoverable_from_the_pixels():
    ds = Shapes("train")
    areas = {}
    for i in range(400):
        image, _, attrs = ds[i]
        for obj, mask in zip(attrs["objects"], object_masks(attrs)):
            areas.setdefault((obj["shape"], obj["size"]), []).append(mask.sum().item())
            full = image[:, mask == 1]  # pixels entirely inside the object
            colour = torch.tensor(COLOURS[obj["colour"]]) / 127.5 - 1
            assert full.shape[1] > 0
            torch.testing.assert_close(full, colour[:, None].expand_as(full))
    for shape in SHAPES:
        assert max(areas[shape, "small"]) * 1.8 < min(areas[shape, "large"])


# ----------------------------------------------------------------------------------
# Captions


def test_captions_name_every_attribute_and_parse_back(scenes):
    for text, attrs in scenes:
        assert parse_caption(text) == strip_geometry(attrs), text
        assert parse_caption(canonical_caption(attrs)) == strip_geometry(attrs)
        for obj in attrs["objects"]:
            assert obj["shape"] in text.split() and obj["colour"] in text.split()
            assert any(word in text.split() for word in SIZE_WORDS[obj["size"]])
        if attrs["relation"] is None:
            position = attrs["objects"][0]["position"]
            assert any(phrase in text for phrase in POSITION_WORDS[position])
        else:
            assert any(phrase in text for phrase in RELATION_WORDS[attrs["relation"]])


def test_captions_vary_templates_and_synonyms(scenes):
    texts = [text for text, _ in scenes]
    starts = {text.split()[0] for text in texts}
    assert {"a", "there", "on", "above"} <= starts, "the word order varies"
    for words in (SIZE_WORDS, POSITION_WORDS, RELATION_WORDS):
        for phrase in (p for ps in words.values() for p in ps):
            assert any(f" {phrase} " in f" {text} " for text in texts), phrase
    rng = random.Random(0)
    attrs = sample_attrs(rng, two_objects=1.0)
    variants = {caption(attrs, rng) for _ in range(200)}
    assert len(variants) >= len(TWO_OBJECT_TEMPLATES) * 2
    assert len({parse_caption(text)["relation"] for text in variants}) == 1


def test_canonical_caption_is_fixed():
    assert canonical_caption(one("circle", "red", "small", "left")) == (
        "a small red circle on the left"
    )
    attrs = sample_attrs(random.Random(3), two_objects=1.0)
    assert canonical_caption(attrs) == canonical_caption(attrs)
    first, second = attrs["objects"]
    assert canonical_caption(attrs) == (
        f"a {first['size']} {first['colour']} {first['shape']} {attrs['relation']} "
        f"a {second['size']} {second['colour']} {second['shape']}"
    )
    assert len(ONE_OBJECT_TEMPLATES) >= 3 and len(TWO_OBJECT_TEMPLATES) >= 3


def test_vocabulary_is_exactly_the_words_captions_use(scenes):
    used = {word for text, _ in scenes for word in text.split()}
    assert used == set(vocabulary())
    assert vocabulary() == sorted(vocabulary())


def test_parse_caption_refuses_other_text():
    for text in ("a red circle", "a small red circle on the moon", "a big dog"):
        with pytest.raises(ValueError, match="not a Shapes caption"):
            parse_caption(text)


def test_sample_attrs_accepts_numpy_generators():
    attrs = sample_attrs(np.random.default_rng(0))
    assert parse_caption(caption(attrs, np.random.default_rng(1))) == strip_geometry(
        attrs
    )


# ----------------------------------------------------------------------------------
# Batches


def test_collate_batches_images_captions_and_attrs():
    ds = Shapes("val", length=10)
    images, captions, attrs = collate([ds[i] for i in range(4)])
    assert images.shape == (4, 3, 32, 32)
    assert captions == [ds[i][1] for i in range(4)]
    assert attrs == [ds[i][2] for i in range(4)]


def test_dataloader_batches_equal_single_items():
    ds = Shapes("val", length=10)
    loader = torch.utils.data.DataLoader(ds, batch_size=4, collate_fn=collate)
    batches = list(loader)
    assert [len(b[1]) for b in batches] == [4, 4, 2]
    images, captions, attrs = batches[1]
    assert images.shape == (4, 3, 32, 32)
    torch.testing.assert_close(images, torch.stack([ds[i][0] for i in range(4, 8)]))
    assert captions == [ds[i][1] for i in range(4, 8)]


def test_render_batch_matches_render():
    scenes = [one(s, c) for s, c in zip(SHAPES, COLOURS)]
    batch = render_batch(scenes, 64)
    assert batch.shape == (len(scenes), 3, 64, 64)
    for scene, image in zip(scenes, batch):
        assert torch.equal(render(scene, 64), image)
