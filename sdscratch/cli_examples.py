"""The command line's example folders: reading one for `sdscratch finetune`, and
writing one of the Shapes world's novel shape or colour (`sdscratch data examples`).

An examples folder has Hugging Face ImageFolder's layout: images (PNG, JPEG...) and,
optionally, `metadata.jsonl`, one line {"file_name": "0.png", "text": "a caption"}
per image (then it names every image); without it, one prompt captions them all.
Everything is checked before anything is used or written: errors are one ValueError
sentence, which `__main__` prints with exit code 2.
"""

import json
import os
import warnings
from pathlib import Path

from sdscratch.cli_files import decode_image, open_image

METADATA = "metadata.jsonl"  # Hugging Face ImageFolder's captions file
MAX_IMAGES = 1000  # examples per run: a few (≤ 20 in the course), never a dataset
MAX_EXAMPLE_SIDE = 512  # `data examples --size`


# ----------------------------------------------------------------------------------
# Reading


def read_examples(folder, prompt=None) -> list[tuple[Path, str]]:
    """The example images of `folder` and their captions, all checked.

    Args:
        folder: images, and optionally metadata.jsonl (then it names every image).
        prompt: every image's caption (instead of metadata.jsonl's).
    Returns:
        [(image path, caption)], sorted by file name without metadata.jsonl, else in
        its order.
    """
    from sdscratch.shards import IMAGE_SUFFIXES

    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise ValueError(f"--images {folder}: no such folder.")
    files = sorted(
        p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")
    )
    for path in files:
        if path.name != METADATA and path.suffix.lower() not in IMAGE_SUFFIXES:
            raise ValueError(
                f"{path} is not an image ({', '.join(IMAGE_SUFFIXES)}); "
                f"the folder may hold only images and {METADATA}."
            )
    images = [path for path in files if path.name != METADATA]
    captions = read_metadata(folder) if (folder / METADATA).is_file() else None
    if captions is not None:
        unlisted = [path for path in images if path not in captions]
        if unlisted:
            raise ValueError(f"{unlisted[0]} has no line in {folder / METADATA}.")
        images = list(captions)
    if not images:
        raise ValueError(f"{folder} holds no images ({', '.join(IMAGE_SUFFIXES)}).")
    if len(images) > MAX_IMAGES:
        raise ValueError(
            f"{folder} holds {len(images)} images; fine-tuning takes at "
            f"most {MAX_IMAGES} (a few, ~20, teach a concept)."
        )
    if prompt is None and captions is None:
        raise ValueError(
            f"{folder} has no {METADATA}: give --prompt, every image's caption."
        )
    return [(path, prompt if prompt is not None else captions[path]) for path in images]


def read_metadata(folder: Path) -> dict[Path, str]:
    """{image path: caption} of folder/metadata.jsonl, in its order: lines
    {"file_name": ..., "text": ...} naming image files inside the folder."""
    from sdscratch.shards import IMAGE_SUFFIXES

    where = folder / METADATA
    try:
        lines = where.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise ValueError(f"{where} is not UTF-8 text.") from None
    captions = {}
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        name, text = _metadata_line(line, f"{where}, line {number}")
        path = folder / name
        if path in captions:
            raise ValueError(f"{where}, line {number}: {name} has a line already.")
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            raise ValueError(
                f"{where}, line {number}: {name} is not an image "
                f"({', '.join(IMAGE_SUFFIXES)})."
            )
        if not path.is_file():
            raise ValueError(f"{where}, line {number}: {name} is not in {folder}.")
        captions[path] = text
    return captions


def _metadata_line(line: str, where: str) -> tuple[str, str]:
    """(file_name, text) of one metadata.jsonl line, or one sentence."""
    try:
        entry = json.loads(line)
    except json.JSONDecodeError:
        raise ValueError(f"{where} is not JSON.") from None
    if not isinstance(entry, dict):
        raise ValueError(
            f'{where} is not a JSON object {{"file_name": ..., "text": ...}}.'
        )
    name, text = entry.get("file_name"), entry.get("text")
    if not isinstance(name, str) or not isinstance(text, str):
        raise ValueError(
            f'{where} needs "file_name" and "text" (the caption), both strings.'
        )
    parts = Path(name).parts
    if not parts or Path(name).is_absolute() or ".." in parts:
        raise ValueError(f"{where}: {name!r} is not a file name inside the folder.")
    return name, text.strip()


def load_images(paths, side: int, folder):
    """The images at `paths` as (N, 3, side, side) in [-1, 1]: square ones of
    another size are resized (one warning says how many), others refused."""
    from PIL import Image

    from sdscratch.cli_files import IMAGE_SIZE_FACTOR
    from sdscratch.viz import from_pil

    pictures, resized = [], []
    for path in paths:
        image = decode_image(open_image(path), path, "RGB", side * IMAGE_SIZE_FACTOR)
        if image.width != image.height:
            raise ValueError(
                f"{path} is {image.width}×{image.height} pixels; "
                f"fine-tuning takes square images (this model's are "
                f"{side}×{side}): crop it."
            )
        if image.width != side:
            resized.append(f"{path.name} ({image.width}×{image.height})")
            image = image.resize((side, side), Image.Resampling.LANCZOS)
        pictures.append(image)
    if resized:
        warnings.warn(
            f"resized {len(resized)} of the {len(paths)} images of "
            f"{folder} to {side}×{side}, this model's size (e.g. "
            f"{resized[0]})."
        )
    return from_pil(pictures)  # (N, 3, side, side)


# ----------------------------------------------------------------------------------
# Writing: `sdscratch data examples`, the Shapes world's novel concepts


def cmd_data_examples(args):
    """Write `--count` one-object Shapes scenes of `--shape` and/or `--colour` (the
    novel heart and pink too) as PNGs and metadata.jsonl into a new folder."""
    import random

    from sdscratch.shapes.captions import caption
    from sdscratch.shapes.data import concept_scenes, render_batch

    if args.shape is None and args.colour is None:
        raise ValueError("Give --shape or --colour (or both): what the examples show.")
    if args.count > MAX_IMAGES or args.size > MAX_EXAMPLE_SIDE:
        raise ValueError(
            f"Examples: at most {MAX_IMAGES} images (--count) of at "
            f"most {MAX_EXAMPLE_SIDE} pixels a side (--size)."
        )
    out = Path(args.out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(
            f"{out} exists and is not an empty folder; choose another --out."
        )
    concept = "shape" if args.shape is not None else "colour"
    word = args.word or getattr(args, concept)
    scenes = concept_scenes(args.count, args.seed, args.shape, args.colour)
    rng, lines = random.Random(f"examples/{args.seed}"), []  # the captions' wording
    for i, attrs in enumerate(scenes):
        said = {**attrs, "objects": [{**attrs["objects"][0], concept: word}]}
        name = f"{i:0{len(str(args.count - 1))}d}.png"
        lines.append(json.dumps({"file_name": name, "text": caption(said, rng)}))
    images = render_batch(scenes, args.size)  # (count, 3, size, size)
    write_examples(out, images, lines)
    print(
        f"wrote {args.count} examples into {out}, e.g. {json.loads(lines[0])['text']!r}"
    )


def write_examples(out: Path, images, lines: list):
    """Write PNGs and metadata.jsonl (whose lines name them) into a hidden folder
    beside `out`, then rename it `out` (which is absent or an empty folder)."""
    import shutil
    import tempfile

    from sdscratch.viz import to_pil

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        usual_mode(staging)
        for picture, line in zip(to_pil(images), lines):
            picture.save(staging / json.loads(line)["file_name"])
        (staging / METADATA).write_text("\n".join(lines) + "\n", encoding="utf-8")
        if out.is_dir():
            out.rmdir()  # empty (checked): nothing to lose; refuses if not
        staging.rename(out)
    except BaseException:  # also Ctrl-C: no half-written folder stays behind
        shutil.rmtree(staging, ignore_errors=True)
        raise


def usual_mode(path: Path):
    """Give a file (or folder) that a library made private (0o600, mkdtemp's
    0o700) the mode `open()` (`mkdir()`) gives: 0o666 (0o777) less the umask."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)
