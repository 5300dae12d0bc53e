"""Shapes captions: writing a scene's caption, and reading one back.

Two grammars. "templates": every caption names every attribute ("a small red circle
on the left", "a big blue star over a little green cross"), so a classifier can later
check whether a generated image shows what its prompt asked. "natural": captions as
people write prompts, leaving out what they do not care about ("red circle", "a
circle that is red", "on the left, a tiny red circle"); what a caption leaves out
means "any". `parse_caption` reads both, and the held-out phrasings no training
caption uses.
"""

import functools
import re

import torch

from sdscratch.shapes.scenes import (
    ALL_COLOURS,
    ALL_SHAPES,
    COLOURS,
    RELATIONS,
    SHAPES,
    _choice,
    strip_geometry,
)

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

# ----------------------------------------------------------------------------------
# Captions


def caption(attrs: dict, rng) -> str:
    """Describe a scene with a random template and random synonyms.

    Every caption names every attribute: shape, colour and size of each object, and
    the position (one object) or the relation (two objects), so `parse_caption`
    recovers `strip_geometry(attrs)` from it.
    """
    return _describe(attrs, lambda options: _choice(rng, options))


def describe(attrs: dict, rng, captions=None) -> str:
    """A random caption of a scene in a grammar ("templates": `caption`, "natural":
    `natural_caption`; default `CAPTIONS`)."""
    natural = _grammar(captions) == "natural"
    return natural_caption(attrs, rng) if natural else caption(attrs, rng)


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
        "colour": {c: (c,) for c in ALL_COLOURS},
        "shape": {s: (s,) for s in ALL_SHAPES},
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
        ValueError: if `text` follows none of the phrasings (e.g. "a teal hexagon").
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


# Codes for `satisfies_matrix`: [objects, the one object's shape, colour, size, then
# shape, colour, size of the object at each position]. -1 in asked: "any"; -2 in a
# scene: nobody there.
_VALUES = {
    "shape": ALL_SHAPES,
    "colour": tuple(ALL_COLOURS),
    "size": ("small", "large"),
}
_SLOTS = ("left", "right", "top", "bottom", "center")


def _object_code(obj, missing: int) -> list:
    if obj is None:
        return [missing] * 3
    return [-1 if obj[k] is None else _VALUES[k].index(obj[k]) for k in _VALUES]


def _scene_code(attrs: dict) -> list:
    objects = attrs["objects"]
    at = {obj["position"]: obj for obj in objects}
    one = objects[0] if len(objects) == 1 else None
    slots = [v for p in _SLOTS for v in _object_code(at.get(p), -2)]
    return [len(objects), *_object_code(one, -3), *slots]


def _asked_code(asked: dict) -> list:
    objects = asked["objects"]
    if objects[0]["position"] is None:  # one object, anywhere
        return [1, *_object_code(objects[0], -1), *[-1] * (3 * len(_SLOTS))]
    at = {obj["position"]: obj for obj in objects}
    slots = [v for p in _SLOTS for v in _object_code(at.get(p), -1)]
    return [len(objects), -1, -1, -1, *slots]


def scene_codes(scenes: list) -> torch.Tensor:
    """(N, 19) int codes of scenes, for `codes_satisfy`."""
    return torch.tensor([_scene_code(attrs) for attrs in scenes])


def asked_codes(asked: list) -> torch.Tensor:
    """(M, 19) int codes of what captions ask (`parse_caption`), for `codes_satisfy`."""
    return torch.tensor([_asked_code(said) for said in asked])


def codes_satisfy(shown: torch.Tensor, wanted: torch.Tensor) -> torch.Tensor:
    """(N, M) bool: whether scene i (`scene_codes`) satisfies caption j
    (`asked_codes`): every code the caption names is the scene's."""
    same = (wanted[None] == -1) | (wanted[None] == shown[:, None])  # (N, M, 19)
    return same.all(-1)


def satisfies_matrix(scenes: list, asked: list) -> torch.Tensor:
    """`satisfies` for every scene against every caption's attributes at once.

    Args:
        scenes: N scenes (attrs, every attribute named).
        asked: M captions' attributes (`parse_caption`; None: left out).
    Returns:
        (N, M) bool tensor: entry (i, j) is `satisfies(scenes[i], asked[j])`.
    """
    return codes_satisfy(scene_codes(scenes), asked_codes(asked))


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
