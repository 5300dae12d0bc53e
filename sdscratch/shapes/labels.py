"""Hand labels of generated images, and how far a reader (the judge, the outline
measure) agrees with them.

A measure of generated images is worth what a person would say of the same images.
The kit: `generate` draws images from a model, one seed per image; `sheet` tiles
them enlarged, each with its id, for a person to look at; the person writes what
they see into a labels file; `agreement` scores a reader against it, attribute by
attribute and by object size.

A labels file is JSON:

    {"model": "shapes-ldm", "model_unet_sha256": "…",
     "settings": {"sampler": "ddim", "num_inference_steps": 20, "guidance_scale": 7.5},
     "labeller": "who looked", "notes": "how, and what was hard to see",
     "images": [{"id": 0, "prompt": "a small red circle on the left", "seed": 0,
                 "png": "<base64 of the 8-bit PNG>", "sha256": "<of the PNG bytes>",
                 "objects": [{"shape": "circle", "colour": "red", "size": "small",
                              "position": "left"}]}, …]}

A file of a model with a LoRA loaded (at its scale, before drawing) also has
"lora": {"file": "shapes-heart-lora", "scale": 0.75, "sha256": "<of its weights>"},
the bundled LoRA's name; files without it are of the model alone.

Each object is what the labeller saw, not what was asked; its shape, colour or
size may be "unreadable" (a blob that is no shape, a colour between two). The
image itself is stored (a 32×32 PNG is ~1 KB), so the labels keep meaning what
they meant even if the model or the sampler changes; prompt, seed and settings
regenerate it.
"""

import base64
import hashlib
import io
import json
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from sdscratch.metrics import as_tensor
from sdscratch.shapes.data import ALL_COLOURS, ALL_SHAPES, POSITIONS, SIZES
from sdscratch.viz import from_pil, to_pil

UNREADABLE = "unreadable"
KEYS = ("shape", "colour", "size", "position")
VALUES = {
    "shape": ALL_SHAPES,
    "colour": tuple(ALL_COLOURS),
    "size": tuple(SIZES),
    "position": tuple(POSITIONS),
}
SETTINGS = {"sampler": "ddim", "num_inference_steps": 20, "guidance_scale": 7.5}


class LabelsError(ValueError):
    """A labels file that does not follow the format."""


# ----------------------------------------------------------------------------------
# Images to label


@torch.no_grad()
def generate(pipe, prompts: list, seeds: list, **settings) -> torch.Tensor:
    """One image per (prompt, seed), each drawn alone from its own seed.

    Args:
        pipe: a `sdscratch.pipeline.StableDiffusion`.
        prompts, seeds: N prompts and N integer seeds.
        settings: the pipeline's sampler settings (default `SETTINGS`).
    Returns:
        (N, 3, H, W) in [-1, 1].
    """
    settings = SETTINGS | settings
    images = [
        pipe(prompt, generator=torch.Generator().manual_seed(seed),
             output_type="pt", **settings).cpu()
        for prompt, seed in zip(prompts, seeds)
    ]  # fmt: skip
    return torch.cat(images)


def sheet(images, ids, scale=8, columns=5, captions=None) -> Image.Image:
    """A labelling sheet: images enlarged (nearest neighbour, so every pixel shows)
    in a grid, each under its id (and its caption, if given).

    Args:
        images: (N, 3, H, W) in [-1, 1], or N PIL images.
        ids: N ids to print above the images.
        scale: each pixel becomes scale × scale pixels.
        columns: images per row.
        captions: N strings to print under the ids, or None (a blind sheet).
    """
    tiles = to_pil(as_tensor(images))
    side = tiles[0].width * scale
    head = 14 if captions is None else 26
    rows = -(-len(tiles) // columns)
    out = Image.new("RGB", (columns * (side + 8), rows * (side + head + 8)), "white")
    draw = ImageDraw.Draw(out)
    for k, (tile, name) in enumerate(zip(tiles, ids)):
        x, y = (k % columns) * (side + 8) + 4, (k // columns) * (side + head + 8)
        draw.text((x, y + 1), str(name), fill="black")
        if captions is not None:
            draw.text((x, y + 13), captions[k][: side // 6], fill="black")
        out.paste(tile.resize((side, side), Image.NEAREST), (x, y + head))
    return out


# ----------------------------------------------------------------------------------
# The labels file


def encode_image(image: torch.Tensor) -> tuple[str, str]:
    """(3, H, W) in [-1, 1] -> (base64 of its 8-bit PNG, sha256 of the PNG bytes)."""
    buffer = io.BytesIO()
    to_pil(image[None])[0].save(buffer, format="PNG", optimize=True)
    data = buffer.getvalue()
    return base64.b64encode(data).decode("ascii"), hashlib.sha256(data).hexdigest()


def decode_image(entry: dict) -> torch.Tensor:
    """A labelled image's stored PNG -> (3, H, W) in [-1, 1], checked against its
    sha256."""
    data = base64.b64decode(entry["png"])
    if hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise LabelsError(f"Image {entry['id']}: its PNG does not match its sha256.")
    return from_pil(Image.open(io.BytesIO(data)))[0]


def check_object(obj: dict, where: str):
    """Raise `LabelsError` unless obj has every key with a known value."""
    if set(obj) != set(KEYS):
        raise LabelsError(f"{where}: an object needs exactly the keys {KEYS}.")
    for key in KEYS:
        allowed = VALUES[key] if key == "position" else (*VALUES[key], UNREADABLE)
        if obj[key] not in allowed:
            raise LabelsError(f"{where}: {obj[key]!r} is not a {key}.")


def parse_line(line: str) -> tuple[int, list[dict]]:
    """One line of a labeller's notes -> (id, objects).

    "12: star red large left | unreadable blue small right" (shape, colour, size,
    position of each object, "|" between objects; "12:" alone for an empty image).
    """
    name, _, rest = line.partition(":")
    objects = []
    for part in filter(str.strip, rest.split("|")):
        words = part.split()
        if len(words) != len(KEYS):
            raise LabelsError(f"{line.strip()!r}: an object is {' '.join(KEYS)}.")
        objects.append(dict(zip(KEYS, words)))
        check_object(objects[-1], f"line {line.strip()!r}")
    try:
        return int(name), objects
    except ValueError:
        raise LabelsError(f"{line.strip()!r} does not start with an id.") from None


def load_labels(path) -> dict:
    """Read and check a labels file (the format is in the module docstring)."""
    try:
        labels = json.loads(Path(path).read_text())
        images = labels["images"]
        for entry in images:
            for key in ("id", "prompt", "seed", "png", "sha256", "objects"):
                entry[key]  # noqa: B018 (raises KeyError if missing)
            for obj in entry["objects"]:
                check_object(obj, f"{path}, image {entry['id']}")
        if "lora" in labels and set(labels["lora"]) != {"file", "scale", "sha256"}:
            raise LabelsError(f"{path}: a lora needs exactly file, scale and sha256.")
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as error:
        raise LabelsError(f"{path} is not a labels file ({error!r}).") from error
    return labels


def labelled_images(labels: dict) -> torch.Tensor:
    """The stored images of a labels file, (N, 3, H, W) in [-1, 1]."""
    return torch.stack([decode_image(entry) for entry in labels["images"]])


def save_labels(path, labels: dict):
    """Write a labels file, one image per line (diffs stay readable)."""
    images = ",\n".join(json.dumps(entry) for entry in labels["images"])
    head = {key: value for key, value in labels.items() if key != "images"}
    text = json.dumps(head, indent=1)[:-2] + ',\n "images": [\n' + images + "\n]}\n"
    Path(path).write_text(text)


# ----------------------------------------------------------------------------------
# Readers, and their agreement with the labels


def judge_reader(judge=None):
    """The judge as a reader: images -> B lists of objects (`KEYS` each)."""
    from sdscratch.shapes.judge import bundled_judge

    def read(images):
        scenes = (judge or bundled_judge()).predict(images)
        return [scene["objects"] for scene in scenes]

    return read


def outline_reader(images) -> list[list[dict]]:
    """The outline measure as a reader (`sdscratch.shapes.outline.read_objects`)."""
    from sdscratch.shapes.outline import read_objects

    return read_objects(images)


def agreement(reads: list, labels: dict) -> dict:
    """How often a reader says what the labeller saw, per attribute and by size.

    Each labelled object is compared with the one object the reader finds at its
    position (none, or two there: every attribute disagrees). An image's "objects"
    agree when the reader finds objects at exactly the labelled positions. A colour
    or size the labeller marked unreadable is not compared; an unreadable shape is
    (a reader should say that a blob is no shape: the outline measure can).

    Args:
        reads: B lists of objects (dicts with `KEYS`), what a reader saw.
        labels: a labels file's contents (`load_labels`), B images.
    Returns:
        {"shape" | "colour" | "size" | "position": {"all" | "small" | "large":
        (agreeing, compared)}, "objects": {"all": (agreeing, images)}}; the groups
        by size follow the labelled size.
    """
    entries = labels["images"]
    if len(reads) != len(entries):
        raise ValueError(f"{len(reads)} reads but {len(entries)} labelled images.")
    counts = {key: {} for key in KEYS}
    positions = []
    for found, entry in zip(reads, entries):
        seen = sorted(obj["position"] for obj in found)
        positions.append(seen == sorted(obj["position"] for obj in entry["objects"]))
        for want in entry["objects"]:
            there = [obj for obj in found if obj["position"] == want["position"]]
            for key in KEYS:
                if want[key] == UNREADABLE and key != "shape":
                    continue  # the labeller could not tell: nothing to compare
                same = len(there) == 1 and there[0][key] == want[key]
                groups = ("all", want["size"]) if want["size"] in SIZES else ("all",)
                for group in groups:
                    right, total = counts[key].get(group, (0, 0))
                    counts[key][group] = (right + same, total + 1)
    counts["objects"] = {"all": (sum(positions), len(positions))}
    return counts


def prompt_shown(entry: dict) -> bool:
    """Whether the labeller saw what the image's prompt asked: objects at exactly
    the asked positions, each with the asked shape, colour and size (what
    `sdscratch.shapes.judge.check` calls "scene")."""
    from sdscratch.shapes.data import parse_caption

    asked = parse_caption(entry["prompt"])["objects"]
    seen = {obj["position"]: obj for obj in entry["objects"]}
    if sorted(seen) != sorted(obj["position"] for obj in asked):
        return False
    return all(seen[obj["position"]][key] == obj[key] for obj in asked for key in KEYS)


def rates(counts: dict) -> dict:
    """`agreement`'s counts -> {attribute: {group: fraction}}."""
    return {
        key: {group: right / total for group, (right, total) in groups.items()}
        for key, groups in counts.items()
    }
