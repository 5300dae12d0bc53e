import colorsys
import hashlib
import itertools
import math
import random
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from sdscratch.shapes.data import (
    ALL_SHAPES,
    BACKGROUND,
    CAPTIONS,
    COLOURS,
    HELDOUT_TEMPLATES,
    NATURAL_PHRASINGS,
    NATURAL_WORDS,
    OMIT_ARTICLE,
    OMIT_POSITION,
    OMIT_SIZE,
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
    plain_caption,
    render,
    render_batch,
    sample_attrs,
    strip_geometry,
    uses_template,
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
        # two halves of (a right triangle of legs 1/√2 + a half disc of radius
        # √2/4), in Quilez's frame, scaled by 1/0.55
        ("heart", 2 * (0.25 + math.pi / 16) / 0.55**2),
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
        ("heart", (0.55, -0.6), (0.0, -0.9)),  # in a lobe; the notch between them
        ("heart", (0.0, 0.9), (0.6, 0.5)),  # near the tip; beside it
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
    masks = {s: object_masks(one(s, size="small"))[0] for s in ALL_SHAPES}
    for a, b in itertools.combinations(ALL_SHAPES, 2):
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
    assert used == set(vocabulary("templates")) == set(vocabulary())
    assert vocabulary() == sorted(vocabulary())


@pytest.mark.parametrize(
    "text",
    ["a teal hexagon", "a small red circle on the moon", "a big dog", "a red",
     "circle red", "a red circle above", "a large circle", "a red circle, a blue star"],
)  # fmt: skip
def test_parse_caption_refuses_other_text(text):
    with pytest.raises(ValueError) as error:
        parse_caption(text)
    assert str(error.value) == f"{text!r} is not a Shapes caption."


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


# ----------------------------------------------------------------------------------
# Captions as people write them


def words(text: str) -> list[str]:
    """The words and punctuation marks of a caption, as a tokenizer splits them."""
    return re.findall(r"\w+|[^\w\s]", text)


@pytest.fixture(scope="module")
def natural():
    """(caption, attrs) of 3,000 natural training captions, over three seeds."""
    return [
        Shapes("train", seed=seed, captions="natural").scene(i)
        for seed in range(3)
        for i in range(1000)
    ]


def obj(shape, colour, size=None, position=None):
    return {"shape": shape, "colour": colour, "size": size, "position": position}


@pytest.mark.parametrize(
    "text, objects, relation",
    [
        ("red circle", [obj("circle", "red")], None),
        ("a big red circle", [obj("circle", "red", "large")], None),
        ("a circle that is red", [obj("circle", "red")], None),
        ("a red circle on the left", [obj("circle", "red", None, "left")], None),
        ("on the left, a small red circle", [obj("circle", "red", "small", "left")],
         None),
        ("  On the left ,a Small red circle. ", [obj("circle", "red", "small", "left")],
         None),
        ("an orange star that is tiny", [obj("star", "orange", "small")], None),
        ("there is a blue square in the centre",
         [obj("square", "blue", None, "center")], None),
        ("a small red circle on the left", [obj("circle", "red", "small", "left")],
         None),
        ("red circle above blue square",
         [obj("circle", "red", None, "top"), obj("square", "blue", None, "bottom")],
         "above"),
        ("on top of a green cross, a star that is yellow",
         [obj("star", "yellow", None, "top"), obj("cross", "green", None, "bottom")],
         "above"),
        ("a big diamond that is purple to the right of a little blue triangle",
         [obj("diamond", "purple", "large", "right"),
          obj("triangle", "blue", "small", "left")],
         "right of"),
    ],
)  # fmt: skip
def test_parse_caption_reads_what_people_write(text, objects, relation):
    assert parse_caption(text) == {"objects": objects, "relation": relation}


def test_natural_captions_parse_back_to_what_they_name(natural):
    sizes = {w for options in NATURAL_WORDS["size"].values() for w in options}
    places = {"left", "right", "top", "bottom", "center", "centre", "middle"}
    for text, attrs in natural:
        truth, read = strip_geometry(attrs), parse_caption(text)
        assert read["relation"] == truth["relation"], text
        assert len(read["objects"]) == len(truth["objects"]), text
        for got, want in zip(read["objects"], truth["objects"]):
            assert (got["shape"], got["colour"]) == (want["shape"], want["colour"])
            assert got["size"] in (None, want["size"]), text
            assert got["position"] in (None, want["position"]), text
        named = [o["size"] for o in read["objects"] if o["size"] is not None]
        assert len(named) == sum(word in sizes for word in words(text)), text
        if truth["relation"] is None:  # a position word iff a position is read
            placed = read["objects"][0]["position"] is not None
            assert placed == bool(places & set(words(text))), text
        else:
            assert [o["position"] for o in read["objects"]] == [
                o["position"] for o in truth["objects"]
            ]


def test_natural_captions_leave_out_size_position_and_article_at_random(natural):
    read = [parse_caption(text) for text, _ in natural]
    sizes = [o["size"] is None for attrs in read for o in attrs["objects"]]
    ones = [a["objects"][0]["position"] is None for a in read if not a["relation"]]
    bare = [not {"a", "an"} & set(words(text)) for text, _ in natural]
    rates = ((sizes, OMIT_SIZE), (ones, OMIT_POSITION), (bare, OMIT_ARTICLE))
    for omitted, rate in rates:
        assert abs(sum(omitted) / len(omitted) - rate) < 0.04  # > 3 standard errors
    two = [a for a in read if a["relation"]]
    assert all(o["position"] for a in two for o in a["objects"]), "relations stay"


def test_natural_captions_use_every_phrasing_and_word(natural):
    texts = [text for text, _ in natural]
    for template in NATURAL_PHRASINGS:
        assert any(uses_template(text, template) for text in texts), template
    colours, sizes = (
        "|".join(COLOURS),
        "|".join(NATURAL_WORDS["size"]["small"] + NATURAL_WORDS["size"]["large"]),
    )
    for form in (rf"that is ({colours})\b", rf"that is ({sizes})\b", "an orange"):
        assert any(re.search(form, text) for text in texts), form
    used = {word for text in texts for word in words(text)}
    assert used == set(vocabulary("natural"))
    assert set(vocabulary("templates")) < set(vocabulary("natural"))
    assert len(set(texts)) > 0.9 * len(texts)


def variants(attrs):
    """attrs with every pattern of omissions: each object's size, and the position
    of a single object."""
    out = []
    for sizes in itertools.product((False, True), repeat=len(attrs["objects"])):
        for position in (False, True) if attrs["relation"] is None else (False,):
            objects = [
                o | {"size": None if drop else o["size"]}
                for o, drop in zip(attrs["objects"], sizes)
            ]
            if position:
                objects[0] = objects[0] | {"position": None}
            out.append({"objects": objects, "relation": attrs["relation"]})
    return out


def fits(template, attrs):
    two = attrs["relation"] is not None
    placed = not two and attrs["objects"][0]["position"] is not None
    return ("{relation}" in template) == two and ("{where}" in template) == placed


HELDOUT = [t for templates in HELDOUT_TEMPLATES.values() for t in templates]


def test_every_phrasing_and_omission_pattern_round_trips():
    rng = random.Random(0)
    for _ in range(150):
        attrs = strip_geometry(sample_attrs(rng))
        for variant in variants(attrs):
            for template in (*NATURAL_PHRASINGS, *HELDOUT):
                if not fits(template, variant):
                    with pytest.raises(ValueError, match="does not fit"):
                        plain_caption(variant, template=template)
                    continue
                for article in (True, False):
                    text = plain_caption(variant, article, template)
                    assert parse_caption(text) == variant, text
                    assert uses_template(text, template)


def test_no_training_caption_uses_a_heldout_phrasing(scenes):
    natural = Shapes("train", seed=7, captions="natural")
    texts = [natural.scene(i)[0] for i in range(10_000)] + [t for t, _ in scenes]
    for text in texts:
        assert not any(uses_template(text, template) for template in HELDOUT), text


def test_heldout_phrasings_are_new_known_words_and_parse():
    known = set(vocabulary("natural"))
    rng = random.Random(1)
    for _ in range(300):
        attrs = strip_geometry(sample_attrs(rng))
        for template in HELDOUT_TEMPLATES[len(attrs["objects"])]:
            text = plain_caption(attrs, template=template)
            assert parse_caption(text) == attrs, text
            assert not any(uses_template(text, t) for t in NATURAL_PHRASINGS), text
            assert set(words(text)) <= known, text
    assert all(len(templates) >= 2 for templates in HELDOUT_TEMPLATES.values())


def test_natural_captions_describe_the_same_scenes_and_images():
    plain, natural = Shapes("val"), Shapes("val", captions="natural")
    x, said, attrs = plain.batch(range(30))
    y, written, same = natural.batch(range(30))
    assert torch.equal(x, y) and attrs == same
    assert sum(a == b for a, b in zip(said, written)) < 10


def test_one_switch_selects_the_grammar(monkeypatch):
    import sdscratch.shapes.captions

    assert CAPTIONS == "templates", "the bundled models learned today's captions"
    assert Shapes("val").captions == "templates"
    monkeypatch.setattr(sdscratch.shapes.captions, "CAPTIONS", "natural")
    assert Shapes("val").captions == "natural"
    assert Shapes("val").scene(5) == Shapes("val", captions="natural").scene(5)
    assert Shapes("val").scene(5) != Shapes("val", captions="templates").scene(5)
    assert vocabulary() == vocabulary("natural")
    with pytest.raises(ValueError, match="Unknown captions 'casual'"):
        Shapes("val", captions="casual")


def test_novel_scenes_hold_hearts_and_pink_and_base_scenes_never():
    """About one object in seven is a heart, one in seven pink, in novel scenes; the
    base world's scenes have neither (and are what they were: the same draws)."""
    counts = {}
    for novel in (False, True):
        data = Shapes("train", novel=novel)
        objects = [o for i in range(1000) for o in data.scene(i)[1]["objects"]]
        hearts = sum(o["shape"] == "heart" for o in objects) / len(objects)
        pinks = sum(o["colour"] == "pink" for o in objects) / len(objects)
        counts[novel] = (hearts, pinks)
    assert counts[False] == (0.0, 0.0)
    assert all(abs(share - 1 / 7) < 0.03 for share in counts[True])
    base, novel = Shapes("train").scene(5)[1], Shapes("train", novel=True).scene(5)[1]
    assert [o["position"] for o in base["objects"]] == [
        o["position"] for o in novel["objects"]
    ]  # the same random draws, read against longer lists


def test_concept_scenes_show_the_concept_in_every_other_variation():
    from sdscratch.shapes.data import concept_scenes

    scenes = concept_scenes(60, seed=0, shape="heart")
    objects = [scene["objects"][0] for scene in scenes]
    assert all(len(scene["objects"]) == 1 for scene in scenes)
    assert {obj["shape"] for obj in objects} == {"heart"}
    assert {obj["colour"] for obj in objects} == set(COLOURS)
    assert {obj["size"] for obj in objects} == set(SIZES)
    assert len({obj["position"] for obj in objects}) == len(POSITIONS)
    assert concept_scenes(60, seed=0, shape="heart") == scenes
    assert concept_scenes(60, seed=1, shape="heart") != scenes
    pink = concept_scenes(30, colour="pink")
    assert {scene["objects"][0]["colour"] for scene in pink} == {"pink"}
    assert {scene["objects"][0]["shape"] for scene in pink} == set(SHAPES)
    with pytest.raises(ValueError, match="Unknown shape 'hearts'"):
        concept_scenes(1, shape="hearts")
