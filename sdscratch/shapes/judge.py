"""The judge: a small classifier that reads what a Shapes image shows, and prompt
accuracy, the share of generated images that show what their prompt asked.

A Shapes prompt names the attributes of its scene, so whether an image shows what
was asked can be *checked*: the judge, trained on real Shapes images, reads shape,
colour and size of the object at each of the five positions, and `prompt_accuracy`
counts the images in which every requested attribute is right (an attribute the
prompt leaves out, as "a red circle" leaves out size and position, may be anything,
but one object is one object). Its penultimate features (`image_features`) are what
FID compares on Shapes, where Heusel et al. 2017 use Inception-v3's for photographs.

The judge reads *positions*, not "first" and "second" objects: "a red circle above a
blue square" and "a blue square below a red circle" are one picture (circle at the
top, square at the bottom), and both prompts ask the same of the judge's "top" and
"bottom" slots. So relations, and which attribute belongs to which object (attribute
binding), are checked without choosing an order.
"""

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from sdscratch.checkpoint import load_component, resolve, verify
from sdscratch.metrics import as_tensor
from sdscratch.shapes.data import (
    ALL_COLOURS,
    ALL_SHAPES,
    COLOURS,
    POSITIONS,
    RELATIONS,
    SHAPES,
    SIZES,
    parse_caption,
)

SLOTS = tuple(POSITIONS)  # ("left", "right", "top", "bottom", "center")


def attributes(novel=False) -> dict[str, tuple]:
    """What a judge reads at each slot, and the values each attribute can take
    (with `novel`, the novel shape and colour too)."""
    return {
        "present": (False, True),
        "shape": ALL_SHAPES if novel else SHAPES,
        "colour": tuple(ALL_COLOURS if novel else COLOURS),
        "size": tuple(SIZES),
    }


ATTRIBUTES = attributes()  # the base world's
VALUES = ("shape", "colour", "size")  # what a caption says of each object
IGNORE = -100  # target of an attribute at an empty slot: no loss (cross_entropy's)

# ----------------------------------------------------------------------------------
# The judge


@dataclass
class JudgeConfig:
    image_size: int = 32  # images are resized to (3, image_size, image_size)
    channels: tuple[int, ...] = (16, 32, 64)  # one stage each; each halves H and W
    hidden: int = 128  # width of the penultimate layer: the features FID compares
    novel: bool = False  # reads the novel shape and colour too (`attributes`)


class Judge(nn.Module):
    """A small conv net: an image -> for each of the five positions, whether an
    object is there, and its shape, colour and size.

    Each stage is conv 3×3, GroupNorm, SiLU, then a stride-2 conv 3×3, GroupNorm,
    SiLU (the layout of `sdscratch.clip.ImageEncoder`). The last feature map is
    flattened (not averaged, so that *where* survives), then one hidden layer (the
    features of `embed`), then a linear read-out per slot and attribute.
    """

    def __init__(self, config: JudgeConfig):
        super().__init__()
        self.config = config
        layers, c_in = [], 3
        for c in config.channels:
            layers += [nn.Conv2d(c_in, c, 3, padding=1), nn.GroupNorm(8, c), nn.SiLU()]
            layers += [nn.Conv2d(c, c, 3, stride=2, padding=1), nn.GroupNorm(8, c)]
            layers += [nn.SiLU()]
            c_in = c
        self.body = nn.Sequential(*layers)
        side = config.image_size // 2 ** len(config.channels)
        self.hidden = nn.Sequential(
            nn.Linear(c_in * side * side, config.hidden), nn.SiLU()
        )
        self.attributes = attributes(config.novel)
        outputs = len(SLOTS) * sum(len(values) for values in self.attributes.values())
        self.head = nn.Linear(config.hidden, outputs)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> (B, hidden) penultimate features."""
        size = self.config.image_size
        if images.shape[-2:] != (size, size):  # e.g. 64×64 images: average pixels
            images = F.interpolate(images, size=(size, size), mode="area")
        features = self.body(images)  # (B, C, size / 2^n, size / 2^n)
        return self.hidden(rearrange(features, "b c h w -> b (c h w)"))

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """(B, 3, H, W) -> {attribute: logits (B, slots, values)}."""
        logits = rearrange(
            self.head(self.embed(images)), "b (s v) -> b s v", s=len(SLOTS)
        )
        sizes = [len(values) for values in self.attributes.values()]
        return dict(zip(self.attributes, logits.split(sizes, dim=-1)))

    @torch.no_grad()
    def read(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """(B, 3, H, W) -> {attribute: (B, slots) index of the most likely value}."""
        return {name: logits.argmax(-1) for name, logits in self(images).items()}

    @torch.no_grad()
    def predict(self, images) -> list[dict]:
        """Images (a (B, 3, H, W) tensor or PIL images) -> B attrs, as a caption says.

        Two objects at top and bottom read as "above" (the top one first), at left and
        right as "left of"; any other arrangement has relation None.
        """
        read = self.read(as_tensor(images).to(_device(self)))
        scenes = []
        for b, present in enumerate(read["present"].bool()):
            objects = [
                {name: self.attributes[name][read[name][b, s]] for name in VALUES}
                | {"position": SLOTS[s]}
                for s in present.nonzero()[:, 0].tolist()
            ]
            scenes.append(canonical({"objects": objects, "relation": None}))
        return scenes

    @classmethod
    def from_pretrained(cls, name_or_path="shapes-judge", device=None) -> "Judge":
        """Load the judge/ component of a checkpoint, checked against its manifest."""
        root = resolve(name_or_path)
        verify(root, components=("judge",))
        judge = load_component(root / "judge", cls, JudgeConfig)
        return judge.to(device or torch.device("cpu")).eval()


@functools.cache
def bundled_judge() -> Judge:
    """The bundled judge (assets/models/shapes-judge), loaded once."""
    return Judge.from_pretrained("shapes-judge")


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


# ----------------------------------------------------------------------------------
# Attributes <-> what the judge reads


def slot_targets(scenes: list, values=ATTRIBUTES) -> dict[str, torch.Tensor]:
    """attrs (or captions) -> {attribute: (B, slots) long}: the judge's targets.

    `present` is 1 at the positions an object occupies; the other attributes are
    the value's index in `values` (a judge's `attributes`) there, and IGNORE at
    empty slots and where a caption leaves the attribute out (None: any value).

    Raises:
        ValueError: if an object has no position (`check` places such objects), or
            a value the judge does not read (a pink heart, for the base judge).
    """
    targets = {
        name: torch.full((len(scenes), len(SLOTS)), IGNORE) for name in ATTRIBUTES
    }
    targets["present"].zero_()
    for b, attrs in enumerate(scenes):
        attrs = parse_caption(attrs) if isinstance(attrs, str) else attrs
        for obj in attrs["objects"]:
            if obj["position"] is None:
                raise ValueError("slot_targets needs every object's position.")
            s = SLOTS.index(obj["position"])
            targets["present"][b, s] = 1
            for name in VALUES:
                if obj[name] is None:
                    continue
                if obj[name] not in values[name]:
                    read = f"the {name} {obj[name]!r}"
                    raise ValueError(f"This judge does not read {read}.")
                targets[name][b, s] = values[name].index(obj[name])
    return targets


def canonical(attrs: dict) -> dict:
    """One attrs per picture: "below" and "right of" become "above" and "left of".

    "a blue square below a red circle" -> "a red circle above a blue square": the
    objects are swapped and the relation reversed. Geometry (x, y, radius) is
    dropped. Objects that no relation describes (one object, or a pair such as
    left and center) are listed in `SLOTS` order, with relation None.
    """
    keys = ("shape", "colour", "size", "position")
    objects = [{key: obj[key] for key in keys} for obj in attrs["objects"]]
    objects.sort(key=lambda obj: SLOTS.index(obj["position"]))
    positions = [obj["position"] for obj in objects]
    relation = None
    for name in ("above", "left of"):
        if sorted(positions) == sorted(RELATIONS[name]):
            objects.sort(key=lambda obj: obj["position"] != RELATIONS[name][0])
            relation = name
    return {"objects": objects, "relation": relation}


def degrade(images, generator, blur=0.8, noise=0.05, colour=0.05) -> torch.Tensor:
    """Mild imperfections of generated images, at a random strength per image.

    Each image is blurred (Gaussian, σ uniform in [0, blur] pixels), its colours
    shifted (each channel by up to ± colour) and its contrast scaled (by 1 ± colour),
    and Gaussian noise added (std uniform in [0, noise]). Training the judge on such
    images keeps it fair to a decoder's slightly soft, slightly off-colour output.

    Args:
        images: (B, 3, H, W) in [-1, 1].
        generator: a `torch.Generator`, the source of every random draw.
    Returns:
        (B, 3, H, W), clamped to [-1, 1].
    """
    b = len(images)

    def uniform(*shape, low=0.0, high=1.0):
        return low + (high - low) * torch.rand(shape, generator=generator)

    images = gaussian_blur(images, uniform(b, high=blur))
    scale = uniform(b, 1, 1, 1, low=1 - colour, high=1 + colour)
    shift = uniform(b, 3, 1, 1, low=-colour, high=colour)
    images = images * scale + shift
    std = uniform(b, 1, 1, 1, high=noise)
    images = images + std * torch.randn(images.shape, generator=generator)
    return images.clamp(-1, 1)


def gaussian_blur(images: torch.Tensor, sigma: torch.Tensor, radius=2) -> torch.Tensor:
    """Blur each image with its own Gaussian of std `sigma` (B,) pixels (0: none).

    A separable (2 radius + 1)-tap kernel, applied along H then along W, with the
    image's edge pixels repeated outside it.
    """
    b, c = images.shape[:2]
    offsets = torch.arange(-radius, radius + 1, dtype=images.dtype)  # (K,)
    sigma = sigma.to(images.dtype).clamp(min=1e-3)[:, None]  # (B, 1)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = kernel / kernel.sum(-1, keepdim=True)  # (B, K)
    kernel = kernel.repeat_interleave(c, dim=0)  # (B·C, K): one per channel
    x = rearrange(images, "b c h w -> 1 (b c) h w")
    x = F.pad(x, (radius, radius, radius, radius), mode="replicate")
    x = F.conv2d(x, kernel[:, None, :, None], groups=b * c)  # along H
    x = F.conv2d(x, kernel[:, None, None, :], groups=b * c)  # along W
    return rearrange(x, "1 (b c) h w -> b c h w", b=b)


def judge_loss(judge: Judge, images: torch.Tensor, scenes: list) -> torch.Tensor:
    """The judge's training loss: cross-entropy of every attribute at every slot
    (shape, colour and size only where an object is), summed over attributes."""
    logits = judge(images)
    targets = slot_targets(scenes, judge.attributes)
    losses = [
        F.cross_entropy(
            logits[name].flatten(0, 1), targets[name].flatten(), ignore_index=IGNORE
        )
        for name in ATTRIBUTES
    ]
    return sum(losses)


# ----------------------------------------------------------------------------------
# Prompt accuracy: does the image show what the prompt asked?


@torch.no_grad()
def _batched(fn, images, batch_size=500) -> list:
    """fn over images (tensor or PIL list) in batches, on the judge's device."""
    images = as_tensor(images)
    return [fn(images[i : i + batch_size]) for i in range(0, len(images), batch_size)]


def check(images, scenes, judge=None) -> dict[str, torch.Tensor]:
    """Which requested attributes each image shows, as the judge reads it.

    An attribute a prompt leaves out (None, as in "a red circle") accepts any value.
    A one-object prompt without a position asks for exactly one object, anywhere;
    its shape, colour and size are read at the object that shows most of them.

    Args:
        images: (B, 3, H, W) in [-1, 1], or B PIL images.
        scenes: B attrs (dicts, as `Shapes` gives) or captions: what was asked.
        judge: a `Judge` (default: the bundled one).
    Returns:
        {name: (B,) bool} for "position" (objects at exactly the requested positions,
        none elsewhere: for two objects this is the relation; a prompt without a
        position asks for exactly one object anywhere), "shape", "colour",
        "size" (of every requested object, read at its position; a missing object
        has none right) and "scene" (all of them).
    """
    images = as_tensor(images)
    if len(images) != len(scenes):
        raise ValueError(f"{len(images)} images but {len(scenes)} scenes.")
    judge = judge or bundled_judge()
    device = _device(judge)
    batches = _batched(lambda x: judge.read(x.to(device)), images)
    read = {name: torch.cat([b[name] for b in batches]).cpu() for name in ATTRIBUTES}
    scenes = [parse_caption(s) if isinstance(s, str) else s for s in scenes]
    # an object asked anywhere is placed where the judge reads one (so its position
    # is right if that is the only object the judge reads)
    values = judge.attributes
    placed = [_place(attrs, read, b, values) for b, attrs in enumerate(scenes)]
    targets = slot_targets(placed, values)
    asked = targets["present"].bool()  # (B, slots)
    right = {"position": (read["present"] == targets["present"]).all(1)}
    for name in VALUES:
        same = (read[name] == targets[name]) | (targets[name] == IGNORE)
        found = read["present"].bool() & same
        right[name] = (found | ~asked).all(1)
    right["scene"] = torch.stack(list(right.values())).all(0)
    return right


def _anywhere(attrs: dict) -> bool:
    """Whether attrs leave the position of their one object out."""
    unplaced = [obj["position"] is None for obj in attrs["objects"]]
    if any(unplaced) and len(unplaced) != 1:
        raise ValueError("Only a one-object scene can leave its position out.")
    return any(unplaced)


def _place(attrs: dict, read: dict, b: int, values=ATTRIBUTES) -> dict:
    """attrs with an object that has no position put at the slot where the judge
    reads an object that shows most of what was asked (the first such slot;
    "center" if the judge reads none, where it then finds nothing right)."""
    if not _anywhere(attrs):
        return attrs
    obj = attrs["objects"][0]

    def agrees(s):  # how many of the asked attributes the object at slot s shows
        shown = {name: values[name][read[name][b, s]] for name in VALUES}
        return sum(obj[name] in (None, shown[name]) for name in VALUES)

    present = read["present"][b].nonzero()[:, 0].tolist()
    best = max(present, key=agrees, default=SLOTS.index("center"))
    return {"objects": [obj | {"position": SLOTS[best]}], "relation": None}


def attribute_accuracy(images, scenes, judge=None) -> dict[str, float]:
    """The fraction of images that show each requested attribute right (`check`)."""
    return {
        name: ok.double().mean().item()
        for name, ok in check(images, scenes, judge).items()
    }


def prompt_accuracy(images, scenes, judge=None) -> float:
    """The fraction of images in which every requested attribute is right.

    The success rate of a text-to-image model: how often a prompt gives what it
    asked. For the breakdown by attribute, see `attribute_accuracy`.

    Args:
        images: (B, 3, H, W) in [-1, 1], or B PIL images.
        scenes: B attrs or captions, one per image.
        judge: a `Judge` (default: the bundled one).
    """
    return check(images, scenes, judge)["scene"].double().mean().item()


def image_features(images, judge=None, batch_size=500) -> torch.Tensor:
    """The judge's penultimate features of images, (N, hidden) float32 on the CPU.

    FID (`sdscratch.metrics.frechet_distance`) compares these between two sets of
    images, as Heusel et al. 2017 compare Inception-v3's pool features of photographs.
    """
    judge = judge or bundled_judge()
    device = _device(judge)
    batches = _batched(lambda x: judge.embed(x.to(device)).cpu(), images, batch_size)
    return torch.cat(batches)
