"""Shapes: a procedural, captioned image dataset with ground-truth attributes.

Every image shows one or two shapes on a plain grey background. Its caption names
every attribute ("a small red circle on the left", "a big blue star over a little
green cross"), so a classifier can later check whether a generated image shows what
its prompt asked; or, with `captions="natural"`, it is written as people write
prompts, leaving out what they do not care about ("red circle", "a circle that is
red", "on the left, a tiny red circle"): what it leaves out means "any".
Scenes are drawn from a seed and a global index, rendered with anti-aliased signed
distance fields, and fast enough to generate on the fly.

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

import functools
import random
import re
from collections import defaultdict

import numpy as np
import torch

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

# Captions: words for each attribute value (the first one is canonical) and templates.
SIZE_WORDS = {"small": ("small", "little"), "large": ("large", "big")}
POSITION_WORDS = {
    "left": ("on the left", "at the left"),
    "right": ("on the right", "at the right"),
    "top": ("at the top", "near the top"),
    "bottom": ("at the bottom", "near the bottom"),
    "center": ("in the center", "in the middle"),
}
RELATION_WORDS = {
    "above": ("above", "over"),
    "below": ("below", "under", "beneath"),
    "left of": ("left of", "to the left of"),
    "right of": ("right of", "to the right of"),
}
OBJECT_TEMPLATE = "a {size} {colour} {shape}"
ONE_OBJECT_TEMPLATES = (  # the first template is the canonical one
    "{a} {where}",
    "{where} there is {a}",
    "there is {a} {where}",
    "{a} is {where}",
)
TWO_OBJECT_TEMPLATES = (
    "{a} {relation} {b}",
    "there is {a} {relation} {b}",
    "{relation} {b} there is {a}",
    "{a} is {relation} {b}",
)

# Captions as people write them ("natural"): more synonyms and word orders, and size,
# position (one object) and the article left out at random. A caption that leaves an
# attribute out means "any": "a red circle" is one red circle of any size, anywhere.
CAPTION_GRAMMARS = ("templates", "natural")
# The grammar of `Shapes` captions unless a dataset is told otherwise. The bundled
# models learned from "templates" (every caption names every attribute); retraining
# them on captions as people write them flips this to "natural".
CAPTIONS = "templates"
OMIT_SIZE = 0.3  # the chance that a natural caption leaves out an object's size
OMIT_POSITION = 0.3  # ... the position of its one object
OMIT_ARTICLE = 0.25  # ... its articles ("red circle above blue square")
MORE_WORDS = {  # synonyms natural captions use besides today's words
    "small": ("tiny",),
    "center": ("in the centre",),
    "left": ("on the left side",),
    "right": ("on the right side",),
    "above": ("on top of",),
    "below": ("underneath",),
}
# How a natural caption names one object: {a} is the article ("a", "an" or nothing).
OBJECT_PHRASES = (  # the first is canonical; drawn 3 : 1 : 1
    "{a} {size} {colour} {shape}",
    "{a} {size} {colour} {shape}",
    "{a} {size} {colour} {shape}",
    "{a} {size} {shape} that is {colour}",
    "{a} {colour} {shape} that is {size}",  # only if the size is named
)
NATURAL_ONE_OBJECT_TEMPLATES = (*ONE_OBJECT_TEMPLATES, "{where}, {a}")
ANYWHERE_TEMPLATES = ("{a}", "there is {a}")  # one object, position left out
NATURAL_TWO_OBJECT_TEMPLATES = (*TWO_OBJECT_TEMPLATES, "{relation} {b}, {a}")
NATURAL_WORDS = {  # attribute -> value -> every phrase for it
    name: {value: words + MORE_WORDS.get(value, ()) for value, words in table.items()}
    for name, table in (
        ("size", SIZE_WORDS),
        ("position", POSITION_WORDS),
        ("relation", RELATION_WORDS),
    )
}
# Phrasings no training caption uses, of words training captions do use: what a model
# makes of them measures how far it generalises beyond the phrasings it saw.
HELDOUT_TEMPLATES = {
    1: ("{where} is {a}", "{a} that is {where}"),
    2: ("{relation} {b} is {a}", "{a} that is {relation} {b}"),
}

# The splits share one index space and never overlap: (first global index, length).
SPLITS = {"test": (0, 10_000), "val": (10_000, 10_000), "train": (20_000, 100_000)}


# ----------------------------------------------------------------------------------
# Attributes


def sample_attrs(rng, two_objects=TWO_OBJECT_FRACTION) -> dict:
    """Draw a random scene: one object at a position, or two objects and a relation.

    Args:
        rng: the source of every random draw: anything whose `.random()` returns a
            float in [0, 1), e.g. `random.Random(seed)` or `np.random.default_rng()`.
        two_objects: the probability of a two-object scene.
    Returns:
        attrs (see the module docstring), with jittered `x`, `y` and a `radius`.
    """
    if rng.random() >= two_objects:
        position = _choice(rng, POSITIONS)
        return {"objects": [_sample_object(rng, position)], "relation": None}
    relation = _choice(rng, RELATIONS)
    first = _sample_object(rng, RELATIONS[relation][0])
    second = _sample_object(rng, RELATIONS[relation][1])
    while _look(second) == _look(first):  # the two must differ in some attribute
        second = _sample_object(rng, RELATIONS[relation][1])
    return {"objects": [first, second], "relation": relation}


def _choice(rng, options):
    """One of `options`, uniformly (through `rng.random()` only, which is fast)."""
    options = tuple(options)
    return options[int(rng.random() * len(options))]


def _uniform(rng) -> float:
    """A float uniform in [-1, 1)."""
    return 2.0 * rng.random() - 1.0


def _sample_object(rng, position) -> dict:
    shape, colour = _choice(rng, SHAPES), _choice(rng, COLOURS)
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


# ----------------------------------------------------------------------------------
# Captions


def caption(attrs: dict, rng) -> str:
    """Describe a scene with a random template and random synonyms.

    Every caption names every attribute: shape, colour and size of each object, and
    the position (one object) or the relation (two objects), so `parse_caption`
    recovers `strip_geometry(attrs)` from it.
    """
    return _describe(attrs, lambda options: _choice(rng, options))


def canonical_caption(attrs: dict) -> str:
    """The one fixed description of a scene (first template, first synonyms).

    For evaluation prompts: "a small red circle on the left",
    "a large red circle above a small blue square".
    """
    return _describe(attrs, lambda options: options[0])


def _describe(attrs, pick) -> str:
    objects = attrs["objects"]
    phrases = [
        OBJECT_TEMPLATE.format(
            size=pick(SIZE_WORDS[o["size"]]), colour=o["colour"], shape=o["shape"]
        )
        for o in objects
    ]
    if attrs["relation"] is None:
        where = pick(POSITION_WORDS[objects[0]["position"]])
        return pick(ONE_OBJECT_TEMPLATES).format(a=phrases[0], where=where)
    relation = pick(RELATION_WORDS[attrs["relation"]])
    template = pick(TWO_OBJECT_TEMPLATES)
    return template.format(a=phrases[0], relation=relation, b=phrases[1])


def natural_caption(attrs: dict, rng) -> str:
    """Describe a scene as a person might: synonyms, word orders and omissions.

    Each object's size is left out with probability `OMIT_SIZE`, the position of a
    single object with `OMIT_POSITION`, the articles with `OMIT_ARTICLE`; shape,
    colour and the relation of two objects are always named. `parse_caption` reads
    back what the caption names, with None for what it leaves out.
    """
    said = strip_geometry(attrs)
    for obj in said["objects"]:
        if rng.random() < OMIT_SIZE:
            obj["size"] = None
    if said["relation"] is None and rng.random() < OMIT_POSITION:
        said["objects"][0]["position"] = None
    article = rng.random() >= OMIT_ARTICLE
    return _say(said, lambda options: _choice(rng, options), article)


def plain_caption(attrs: dict, article=True, template=None) -> str:
    """The plainest natural caption of attrs that may leave attributes out (None).

    "a red circle", "green triangle" (`article=False`), "an orange star on the
    left": first synonyms and, unless `template` is given, the first template.
    """
    if template is not None and not _fits(template, attrs):
        raise ValueError(f"The template {template!r} does not fit these attrs.")
    return _say(attrs, lambda options: options[0], article, template)


def _fits(template: str, attrs: dict) -> bool:
    """Whether a template says what attrs name: a relation, a position or neither."""
    two = attrs["relation"] is not None
    placed = not two and attrs["objects"][0]["position"] is not None
    return ("{relation}" in template) == two and ("{where}" in template) == placed


def _say(attrs, pick, article, template=None) -> str:
    objects, relation = attrs["objects"], attrs["relation"]
    phrases = [_name_object(obj, pick, article) for obj in objects]
    if relation is not None:
        templates = NATURAL_TWO_OBJECT_TEMPLATES
        place = pick(NATURAL_WORDS["relation"][relation])
    elif objects[0]["position"] is None:
        templates, place = ANYWHERE_TEMPLATES, None
    else:
        templates = NATURAL_ONE_OBJECT_TEMPLATES
        place = pick(NATURAL_WORDS["position"][objects[0]["position"]])
    if not article:  # nobody writes "there is red circle"
        templates = [t for t in templates if "there" not in t]
    template = template or pick(templates)
    return template.format(a=phrases[0], b=phrases[-1], where=place, relation=place)


def _name_object(obj, pick, article) -> str:
    """ "a big red circle", "a circle that is red", "red circle that is small"..."""
    form = pick(OBJECT_PHRASES)
    if obj["size"] is None and form.endswith("{size}"):
        form = OBJECT_PHRASES[0]
    size = "" if obj["size"] is None else pick(NATURAL_WORDS["size"][obj["size"]])
    words = form.format(a="", size=size, colour=obj["colour"], shape=obj["shape"])
    words = words.split()
    if article:
        words.insert(0, "an" if words[0][0] in "aeiou" else "a")
    return " ".join(words)


def _alternatives(words: dict, name: str) -> str:
    """A named regex group matching any phrase of `words`, longest first."""
    phrases = sorted((p for ps in words.values() for p in ps), key=len, reverse=True)
    return f"(?P<{name}>{'|'.join(map(re.escape, phrases))})"


def _object_regex(prefix: str) -> str:
    """Any form of `OBJECT_PHRASES`, with or without article and size; the k-th
    form's groups are named `{prefix}{k}_size` and so on."""
    words = {
        "size": NATURAL_WORDS["size"],
        "colour": {c: (c,) for c in COLOURS},
        "shape": {s: (s,) for s in SHAPES},
    }
    forms = []
    for k, form in enumerate(dict.fromkeys(OBJECT_PHRASES)):
        tokens = form.split()
        pattern = ""
        for i, token in enumerate(tokens):
            name = token.strip("{}")
            if token == "{a}":
                pattern += "(?:an? )?"
            elif name in words:
                group = _alternatives(words[name], f"{prefix}{k}_{name}")
                optional = name == "size" and i < len(tokens) - 1
                pattern += f"(?:{group} )?" if optional else f"{group} "
            else:
                pattern += f"{re.escape(token)} "
        forms.append(pattern[:-1])  # without the last space
    return f"(?:{'|'.join(forms)})"


@functools.cache
def _template_regex(template: str) -> re.Pattern:
    pattern = template.format(
        a=_object_regex("a"),
        b=_object_regex("b"),
        where=_alternatives(NATURAL_WORDS["position"], "where"),
        relation=_alternatives(NATURAL_WORDS["relation"], "relation"),
    )
    return re.compile(pattern)


# Every phrasing `parse_caption` reads: the natural grammar's (today's templates are
# among them), then the held-out ones.
NATURAL_PHRASINGS = (
    *NATURAL_ONE_OBJECT_TEMPLATES,
    *ANYWHERE_TEMPLATES,
    *NATURAL_TWO_OBJECT_TEMPLATES,
)
PHRASINGS = (*NATURAL_PHRASINGS, *HELDOUT_TEMPLATES[1], *HELDOUT_TEMPLATES[2])


def _normalise(text: str) -> str:
    """Lower case, one space between words, ", " after a comma, no final full stop."""
    text = re.sub(r"\s*,\s*", ", ", text.lower()).strip().removesuffix(".")
    return " ".join(text.split())


def uses_template(text: str, template: str) -> bool:
    """Whether a caption follows `template` (any synonyms, omissions, articles)."""
    return _template_regex(template).fullmatch(_normalise(text)) is not None


def _meaning(words: dict, phrase):
    if phrase is None:
        return None
    return next(value for value, phrases in words.items() if phrase in phrases)


def _named(groups: dict, prefix: str, name: str):
    """The phrase of attribute `name` of object `prefix`, whichever form matched."""
    found = [v for k, v in groups.items() if k.startswith(prefix) and
             k.endswith(f"_{name}") and v is not None]  # fmt: skip
    return found[0] if found else None


def parse_caption(text: str) -> dict:
    """Read a caption back into the attributes it names (no geometry).

    The inverse of `caption`, `natural_caption`, `plain_caption` and the held-out
    phrasings: what a caption leaves out (a size, one object's position) is None,
    which means "any" ("a red circle": `{"shape": "circle", "colour": "red",
    "size": None, "position": None}`).

    Raises:
        ValueError: if `text` follows none of the phrasings (e.g. "a pink heart").
    """
    normal = _normalise(text)
    for template in PHRASINGS:
        match = _template_regex(template).fullmatch(normal)
        if match:
            break
    else:
        raise ValueError(f"{text!r} is not a Shapes caption.")
    groups = match.groupdict()
    if "relation" in groups:
        relation = _meaning(NATURAL_WORDS["relation"], groups["relation"])
        positions = list(RELATIONS[relation])
    else:
        relation = None
        positions = [_meaning(NATURAL_WORDS["position"], groups.get("where"))]
    objects = [
        {
            "shape": _named(groups, prefix, "shape"),
            "colour": _named(groups, prefix, "colour"),
            "size": _meaning(NATURAL_WORDS["size"], _named(groups, prefix, "size")),
            "position": position,
        }
        for prefix, position in zip("ab", positions)
    ]
    return {"objects": objects, "relation": relation}


def satisfies(attrs: dict, asked: dict) -> bool:
    """Whether a scene shows what a caption asks, where None means "any".

    "a red circle" asks for one red circle of any size anywhere; "a red circle
    above a blue square" for a red circle at the top, a blue square at the bottom
    and nothing else. What `check` decides from the judge's reading of an image,
    decided here from the scene's attrs.

    Args:
        attrs: a scene (every attribute named, as `Shapes` gives it).
        asked: what a caption names (`parse_caption`; None: left out).
    """
    shown = {obj["position"]: obj for obj in attrs["objects"]}
    wanted = asked["objects"]
    if len(wanted) != len(shown):
        return False
    if wanted[0]["position"] is None:  # one object, anywhere
        wanted = [wanted[0] | {"position": attrs["objects"][0]["position"]}]
    for obj in wanted:
        there = shown.get(obj["position"])
        keys = ("shape", "colour", "size")
        if there is None or any(obj[k] not in (None, there[k]) for k in keys):
            return False
    return True


def vocabulary(captions=None) -> list[str]:
    """Every word (and punctuation mark) captions of a grammar use, sorted: what a
    tokenizer's vocabulary must keep whole.

    Args:
        captions: "templates" or "natural" (default: `CAPTIONS`). Natural captions
            use every word of the templates' too, and held-out phrasings only
            words of natural captions, so "natural" covers them all.
    """
    captions = _grammar(captions)
    phrases = [OBJECT_TEMPLATE, *ONE_OBJECT_TEMPLATES, *TWO_OBJECT_TEMPLATES]
    tables = [SIZE_WORDS, POSITION_WORDS, RELATION_WORDS]
    if captions == "natural":
        phrases += [*OBJECT_PHRASES, *NATURAL_PHRASINGS]
        phrases += ["an"]  # before "orange"
        tables = [NATURAL_WORDS[name] for name in ("size", "position", "relation")]
    phrases += [*SHAPES, *COLOURS]
    for words in tables:
        phrases += [phrase for options in words.values() for phrase in options]
    text = re.sub(r"\{\w+\}", " ", " ".join(phrases))
    return sorted(set(re.findall(r"\w+|[^\w\s]", text)))


def _grammar(captions) -> str:
    """The name of a caption grammar, checked (None: `CAPTIONS`)."""
    captions = CAPTIONS if captions is None else captions
    if captions not in CAPTION_GRAMMARS:
        raise ValueError(
            f"Unknown captions {captions!r}; choose one of {list(CAPTION_GRAMMARS)}."
        )
    return captions


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


SDFS = {
    "circle": _circle,
    "square": _square,
    "triangle": _triangle,
    "diamond": _diamond,
    "star": _star,
    "cross": _cross,
}
_RGB = {name: np.array(rgb, np.float32) / 127.5 - 1 for name, rgb in COLOURS.items()}


def _geometry(obj) -> tuple:
    x, y = POSITIONS[obj["position"]]
    return obj.get("x", x), obj.get("y", y), obj.get("radius", SIZES[obj["size"]])


def _coverage(objects, size) -> np.ndarray:
    """The fraction of each pixel that each object covers, (N, H, W) float32.

    The coverage of a pixel is clamp(0.5 - d, 0, 1) with d the signed distance from
    its centre to the shape's edge, in pixels: a one-pixel ramp, i.e. anti-aliasing.
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
        distance = SDFS[shape](x, y) * (radius * size)  # (n, H, W), in pixels
        out[members] = _clamp(0.5 - distance, 0.0, 1.0)
    return out


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
    """

    def __init__(self, split="train", size=32, seed=0, length=None, captions=None):
        self.captions = _grammar(captions)
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
        attrs = sample_attrs(rng)
        describe = natural_caption if self.captions == "natural" else caption
        return describe(attrs, rng), attrs

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
            f"length={self.length}, captions={self.captions!r})"
        )


def collate(batch):
    """DataLoader collate: [(image, caption, attrs)] -> (images, captions, attrs).

    Returns:
        images (B, 3, H, W), a list of B captions, a list of B attrs dicts.
    """
    images, captions, scenes = zip(*batch)
    return torch.stack(images), list(captions), list(scenes)
