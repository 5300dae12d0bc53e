"""Shapes scenes: what can be in a picture, and drawing a random scene.

A scene's attributes ("attrs") are a plain dict:

    {"objects": [{"shape": "circle", "colour": "red", "size": "small",
                  "position": "left", "x": 0.26, "y": 0.49, "radius": 0.12}, ...],
     "relation": None}            # or "above", "below", "left of", "right of"

One object: `relation` is None and the object is at its `position`. Two objects:
the relation says where the first object is with respect to the second, and their
positions follow from it ("above": the first at the top, the second at the bottom;
"left of": the first on the left, the second on the right). The two never overlap and
differ in shape, colour or size. `x`, `y` (the centre in [0, 1], y downwards,
jittered around the position's centre) and `radius` (in units of the image width) are
optional: without them an object is drawn at its position's centre with its size's
radius. `strip_geometry(attrs)` drops them; it is what a caption says. Note that
"A above B" and "B below A" are two attrs (and captions) for the same picture.
"""

import random

SHAPES = ("circle", "square", "triangle", "diamond", "star", "cross")
# Six well separated hues, as RGB in [0, 255].
COLOURS = {
    "red": (220, 30, 30),
    "orange": (255, 130, 0),
    "yellow": (245, 215, 20),
    "green": (30, 170, 50),
    "blue": (30, 80, 230),
    "purple": (150, 40, 200),
}
# A seventh shape and a seventh colour that the renderer, the judge and the outline
# measure know but no base model learns (nor the tokenizer: the words are new to it):
# what fine-tuning teaches a model. Scenes hold them only when asked (`novel`).
NOVEL_SHAPES = ("heart",)
NOVEL_COLOURS = {"pink": (255, 105, 180)}
ALL_SHAPES = SHAPES + NOVEL_SHAPES
ALL_COLOURS = COLOURS | NOVEL_COLOURS
BACKGROUND = 0.0  # mid grey in [-1, 1]: every colour stands out from it
SIZES = {"small": 0.12, "large": 0.19}  # radius, in units of the image width
POSITIONS = {  # centre (x, y) in [0, 1], y downwards
    "left": (0.25, 0.5),
    "right": (0.75, 0.5),
    "top": (0.5, 0.25),
    "bottom": (0.5, 0.75),
    "center": (0.5, 0.5),
}
# A relation places the first object at one position and the second at another.
RELATIONS = {
    "above": ("top", "bottom"),
    "below": ("bottom", "top"),
    "left of": ("left", "right"),
    "right of": ("right", "left"),
}
# ± this much of the width around the position's centre. Two large objects 0.5 apart
# then keep a gap of at least 0.5 - 2 * 0.04 - 2 * 0.19 = 0.04 (> 1 pixel at 32x32).
POSITION_JITTER = 0.04
TWO_OBJECT_FRACTION = 0.5

# The splits share one index space and never overlap: (first global index, length).
SPLITS = {"test": (0, 10_000), "val": (10_000, 10_000), "train": (20_000, 100_000)}

# ----------------------------------------------------------------------------------
# Attributes


def sample_attrs(rng, two_objects=TWO_OBJECT_FRACTION, novel=False) -> dict:
    """Draw a random scene: one object at a position, or two objects and a relation.

    Args:
        rng: the source of every random draw: anything whose `.random()` returns a
            float in [0, 1), e.g. `random.Random(seed)` or `np.random.default_rng()`.
        two_objects: the probability of a two-object scene.
        novel: draw shapes and colours from the novel ones too (`NOVEL_SHAPES`,
            `NOVEL_COLOURS`); without, the scenes are those of the base world.
    Returns:
        attrs (see the module docstring), with jittered `x`, `y` and a `radius`.
    """
    shapes, colours = (ALL_SHAPES, ALL_COLOURS) if novel else (SHAPES, COLOURS)

    def draw(position):
        return _sample_object(rng, position, shapes, colours)

    if rng.random() >= two_objects:
        return {"objects": [draw(_choice(rng, POSITIONS))], "relation": None}
    relation = _choice(rng, RELATIONS)
    first, second = (draw(position) for position in RELATIONS[relation])
    while _look(second) == _look(first):  # the two must differ in some attribute
        second = draw(RELATIONS[relation][1])
    return {"objects": [first, second], "relation": relation}


def concept_scenes(count: int, seed=0, shape=None, colour=None) -> list[dict]:
    """`count` one-object scenes showing a concept: every object has `shape` and/or
    `colour` (e.g. the novel "heart"); its other attributes, the position and the
    jitter are drawn as `sample_attrs` draws them, from a generator seeded with
    `seed` and the concept. What fine-tuning learns from, and is measured on."""
    known_shapes, known_colours = ALL_SHAPES, ALL_COLOURS
    if shape is not None and shape not in known_shapes:
        raise ValueError(f"Unknown shape {shape!r}; one of {known_shapes}.")
    if colour is not None and colour not in known_colours:
        raise ValueError(f"Unknown colour {colour!r}; one of {tuple(known_colours)}.")
    rng = random.Random(f"concept/{shape}/{colour}/{seed}")
    shapes = (shape,) if shape else SHAPES
    colours = {colour: known_colours[colour]} if colour else COLOURS
    return [
        {
            "objects": [_sample_object(rng, _choice(rng, POSITIONS), shapes, colours)],
            "relation": None,
        }
        for _ in range(count)
    ]


def _choice(rng, options):
    """One of `options`, uniformly (through `rng.random()` only, which is fast)."""
    options = tuple(options)
    return options[int(rng.random() * len(options))]


def _uniform(rng) -> float:
    """A float uniform in [-1, 1)."""
    return 2.0 * rng.random() - 1.0


def _sample_object(rng, position, shapes=SHAPES, colours=COLOURS) -> dict:
    shape, colour = _choice(rng, shapes), _choice(rng, colours)
    size = _choice(rng, SIZES)
    x, y = POSITIONS[position]
    return {
        "shape": shape,
        "colour": colour,
        "size": size,
        "position": position,
        "x": x + POSITION_JITTER * _uniform(rng),
        "y": y + POSITION_JITTER * _uniform(rng),
        "radius": SIZES[size],
    }


def _look(obj) -> tuple:
    return obj["shape"], obj["colour"], obj["size"]


def strip_geometry(attrs: dict) -> dict:
    """attrs without `x`, `y`, `radius`: only what a caption says."""
    keys = ("shape", "colour", "size", "position")
    objects = [{key: obj[key] for key in keys} for obj in attrs["objects"]]
    return {"objects": objects, "relation": attrs["relation"]}
