"""The command line's fine-tuning: `sdscratch finetune METHOD` teaches a model
something new from a folder of example images, and `sdscratch data examples`
writes such a folder for the Shapes world's novel shape or colour.

The examples folder has Hugging Face ImageFolder's layout: images (PNG, JPEG...)
and, optionally, `metadata.jsonl` with one line {"file_name": "0.png", "text":
"a caption"} per image; without it, `--prompt` is every image's caption. Every
image, caption, option and the output are checked before training starts, and
what a run makes appears whole when it ends: a run that fails or is interrupted
leaves nothing behind and replaces nothing.

What each method writes:

    textual_inversion  an embedding .safetensors (diffusers' learned_embeds layout;
                       A1111's with --format a1111): `generate --embedding FILE`
    lora               a LoRA .safetensors (diffusers' pytorch_lora_weights
                       layout; kohya's with --format kohya): `generate --lora FILE`
    dreambooth, full   a model folder with its MANIFEST.json: `generate --model DIR`

A file comes with a JSON record beside it (`NAME.json`: the command, seed, steps,
CPU seconds, the loss at the start and the end); a folder's MANIFEST.json holds the
same. Errors are one ValueError sentence, which `__main__` prints with exit code 2.
"""

import json
import os
import re
import secrets
import shlex
import time
import warnings
from pathlib import Path

from sdscratch.cli_files import _link, decode_image, open_image

METADATA = "metadata.jsonl"  # Hugging Face ImageFolder's captions file
MAX_IMAGES = 1000  # examples per run: a few (≤ 20 in the course), never a dataset
LOSS_WINDOW = 10  # the record's first and final loss: means over this many steps
DEFAULTS = {"rank": 4, "vectors": 1, "class_images": 20}
# the options only some methods take (None in args: not given)
METHOD_OPTIONS = {
    "token": ("textual_inversion",),
    "init_token": ("textual_inversion",),
    "vectors": ("textual_inversion",),
    "rank": ("lora",),
    "alpha": ("lora",),
    "class_prompt": ("dreambooth",),
    "class_images": ("dreambooth",),
}
FILE_FORMATS = {  # what --format each method takes; the first is the default
    "textual_inversion": ("diffusers", "a1111"),
    "lora": ("diffusers", "kohya"),
}
CLASS_IMAGE_STEPS = 20  # sampler steps for DreamBooth's class images
MAX_EXAMPLE_SIDE = 512  # `data examples --size`


def cmd_finetune(args):
    """`sdscratch finetune METHOD`: check everything, train, write the output."""
    from sdscratch.pipeline import StableDiffusion

    file_format = check_options(args)
    out, record = planned_output(args)  # before the slow part: fail early
    examples = read_examples(args.images, args.prompt)
    pipe = StableDiffusion.from_pretrained(args.model)
    side = pipe.latent_shape[-1] * pipe.vae_scale_factor
    if args.method == "textual_inversion":
        check_token(pipe.tokenizer, args.token, examples)
    captions = [caption for _, caption in examples]
    check_lengths(pipe.tokenizer, captions, args.token, args.vectors)
    images = load_images([path for path, _ in examples], side, args.images)
    start = time.process_time(), time.perf_counter()
    trained, losses = train(pipe, args, images, captions)
    summary = run_summary(args, losses, len(images), start)
    if out.suffix == ".safetensors":
        write_file(trained, args, file_format, out, record, summary)
    else:
        write_model(pipe, out, summary, args.force)
    print(
        f"{out}: {args.method} on {len(images)} images, {args.steps} steps, loss "
        f"{summary['initial_loss']:.4f} -> {summary['final_loss']:.4f}"
    )


def check_options(args) -> str | None:
    """Refuse options the method does not take, and a missing token or class
    prompt; return the file format (None for a model folder)."""
    for option, methods in METHOD_OPTIONS.items():
        if getattr(args, option) is not None and args.method not in methods:
            flag = "--" + option.replace("_", "-")
            raise ValueError(
                f"{flag} is for {' and '.join(methods)}, not {args.method}."
            )
    if args.method == "textual_inversion" and not args.token:
        raise ValueError(
            "Textual inversion needs --token, the new word, e.g. --token '<heart>'."
        )
    if args.method == "dreambooth" and not args.class_prompt:
        raise ValueError(
            "DreamBooth needs --class-prompt, what the base model "
            "draws for prior preservation, e.g. 'a large red circle'."
        )
    formats = FILE_FORMATS.get(args.method)
    if formats is None:
        if args.format is not None:
            raise ValueError(
                f"--format is for embedding and LoRA files; "
                f"{args.method} writes a model folder."
            )
        return None
    if args.format is not None and args.format not in formats:
        raise ValueError(
            f"--format {args.format} is not a format of "
            f"{args.method} files; one of {', '.join(formats)}."
        )
    return args.format or formats[0]


# ----------------------------------------------------------------------------------
# The output


def planned_output(args) -> tuple[Path, Path | None]:
    """(--out, the JSON record beside it), checked to be writable and new (or
    --force): a .safetensors file for an adapter, a folder for a model."""
    out = Path(args.out).expanduser()
    if args.method not in FILE_FORMATS:
        from sdscratch.recipes.common import _check_out

        _check_out(out, args.force)  # train's rule: a new or empty folder
        return out, None
    if out.suffix != ".safetensors":
        what = "an embedding" if args.method == "textual_inversion" else "a LoRA"
        raise ValueError(
            f"--out {out}: {what} is one .safetensors file; give a "
            "name ending in .safetensors."
        )
    record = out.with_suffix(".json")
    for path in (out, record):
        if path.is_dir():
            raise ValueError(f"Cannot write {path}: it is a folder.")
        if path.is_symlink() and not path.exists():
            raise ValueError(f"Cannot write {path}: it is a symlink to nothing.")
        if path.exists() and not args.force:
            raise ValueError(f"{path} exists already; pass --force to overwrite it.")
    if not out.parent.is_dir():
        raise ValueError(f"Cannot write {out}: the folder {out.parent} does not exist.")
    if not os.access(out.parent, os.W_OK):
        raise ValueError(
            f"Cannot write {out}: the folder {out.parent} is not writable."
        )
    return out, record


def write_file(trained, args, file_format, out: Path, record: Path, summary: dict):
    """Write an embedding or a LoRA file and its record under temporary names
    beside them, then give them their names (replacing old ones only with
    --force); a file that appeared meanwhile is kept."""
    from sdscratch.lora_files import save_lora
    from sdscratch.textual_inversion import save_embedding

    if file_format == "a1111" and out.stem != args.token:
        warnings.warn(
            f"A1111 names an embedding's token after its file: prompts "
            f"with {out.name} write {out.stem!r}, not {args.token!r}."
        )
    tag = secrets.token_hex(4)
    temporary = out.parent / f".{out.stem}.{tag}.partial.safetensors"
    temporary_record = out.parent / f".{record.name}.{tag}.partial"
    try:
        if args.method == "textual_inversion":
            save_embedding(trained.vectors, args.token, temporary, file_format)
        else:
            save_lora(trained, temporary, file_format)
        usual_mode(temporary)
        summary = summary | {"format": file_format}
        temporary_record.write_text(json.dumps(summary, indent=2) + "\n")
        _place(temporary, out, args.force)
        try:
            _place(temporary_record, record, args.force)
        except ValueError:
            out.unlink()  # ours, just placed: no file without its record
            raise
    finally:
        for path in (temporary, temporary_record):
            if os.path.lexists(path):
                os.unlink(path)


def usual_mode(path: Path):
    """Give a file (or folder) that a library made private (0o600, mkdtemp's
    0o700) the mode `open()` (`mkdir()`) gives: 0o666 (0o777) less the umask."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


def _place(temporary: Path, out: Path, force: bool):
    """Give a finished temporary file the name `out` (see `cli_files.publish`)."""
    if force:
        os.replace(temporary, out)
        return
    try:
        _link(temporary, out)
    except FileExistsError:
        raise ValueError(
            f"{out} appeared while training; pass --force to overwrite it."
        ) from None


def write_model(pipe, out: Path, summary: dict, force: bool):
    """Save the fine-tuned pipeline into a hidden folder beside `out` with its
    MANIFEST.json (the summary in it), then move it into place (as `train`)."""
    import shutil
    import tempfile

    from sdscratch.checkpoint import write_manifest
    from sdscratch.recipes.common import _move_into_place

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        usual_mode(staging)
        pipe.save_pretrained(staging)
        summary = dict(summary)  # the caller's stays whole
        quality = {key: summary.pop(key) for key in ("initial_loss", "final_loss")}
        write_manifest(
            staging,
            summary.pop("command"),
            summary.pop("seed"),
            summary.pop("wall_seconds"),
            quality,
            **summary,
        )
    except BaseException:  # also Ctrl-C: no half-written model stays behind
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _move_into_place(staging, out, force)


def run_summary(args, losses, count, start) -> dict:
    """What the record says of a run: command, settings, time and loss."""
    cpu_start, wall_start = start
    window = min(LOSS_WINDOW, len(losses))
    return {
        "command": command_line(args),
        "method": args.method,
        "seed": args.seed,
        "steps": args.steps,
        "images": count,
        "cpu_seconds": round(time.process_time() - cpu_start, 1),
        "wall_seconds": round(time.perf_counter() - wall_start, 1),
        "initial_loss": round(sum(losses[:window]) / window, 5),
        "final_loss": round(sum(losses[-window:]) / window, 5),
        "loss_window_steps": window,
    }


def command_line(args) -> str:
    """The `sdscratch finetune` command that repeats this run (every option)."""
    words = ["sdscratch", "finetune", args.method]
    for name in (
        "images",
        "out",
        "model",
        "prompt",
        "token",
        "init_token",
        "vectors",
        "rank",
        "alpha",
        "class_prompt",
        "class_images",
        "steps",
        "lr",
        "batch_size",
        "seed",
        "format",
    ):
        value = getattr(args, name)
        if value is not None:
            words += ["--" + name.replace("_", "-"), str(value)]
    return shlex.join(words)


# ----------------------------------------------------------------------------------
# Training


def train(pipe, args, images, captions):
    """Run `sdscratch.finetune.finetune` with the command line's options.

    Args:
        images: (N, 3, H, W) in [-1, 1]; captions: their N captions.
    Returns:
        (the trained `NewTokens`, `LoRA` or UNet, the loss at every step).
    """
    import torch

    from sdscratch.finetune import class_images, finetune

    options = {}
    if args.method == "textual_inversion":
        options = dict(
            token=args.token,
            init_token=args.init_token,
            num_vectors=args.vectors or DEFAULTS["vectors"],
        )
    elif args.method == "lora":
        options = dict(rank=args.rank or DEFAULTS["rank"], alpha=args.alpha)
    elif args.method == "dreambooth":
        count = args.class_images or DEFAULTS["class_images"]
        drawn = class_images(
            pipe,
            args.class_prompt,
            count,
            seed=args.seed,
            num_inference_steps=CLASS_IMAGE_STEPS,
        )
        options = dict(prior=(drawn, [args.class_prompt] * count))
    with torch.random.fork_rng(), warnings.catch_warnings():
        torch.manual_seed(args.seed)  # LoRA's starting A: drawn from --seed
        warnings.filterwarnings("ignore", "Prompt truncated")  # check_lengths'
        return finetune(
            pipe,
            args.method,
            images,
            captions,
            steps=args.steps,
            lr=args.lr,
            batch_size=args.batch_size,
            seed=args.seed,
            progress=True,
            **options,
        )


def check_token(tokenizer, token: str, examples):
    """Refuse a textual-inversion token that is not a new word, or that a
    caption lacks (its image would teach the token nothing)."""
    if re.search(r"\s", token):
        raise ValueError(f"--token {token!r}: a token is one word, without spaces.")
    if (
        token in tokenizer.vocab
        or token in tokenizer.added_tokens
        or len(tokenizer.encode(token)) == 1
    ):
        raise ValueError(
            f"--token {token}: the tokenizer already has this word; "
            f"choose a new one, e.g. <{token.strip('<>')}-new>."
        )
    for path, caption in examples:
        if token not in caption:
            raise ValueError(
                f"The caption of {path} ({caption!r}) lacks the token "
                f"{token}: write it where the new concept's word goes."
            )


# ----------------------------------------------------------------------------------
# The examples: a folder of images and their captions


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
# `sdscratch data examples`: example images of the Shapes world's novel concepts


def cmd_data_examples(args):
    """Write `--count` one-object Shapes scenes of `--shape` and/or `--colour` (the
    novel heart and pink too) as PNGs and metadata.jsonl into a new folder."""
    import random

    from sdscratch.shapes.captions import caption
    from sdscratch.shapes.data import render_batch
    from sdscratch.shapes.scenes import sample_attrs

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
    scenes, lines = [], []
    for i in range(args.count):
        rng = random.Random(f"examples/{args.seed}/{i}")
        attrs = sample_attrs(rng, two_objects=0.0)  # the base world's attributes...
        for key in ("shape", "colour"):
            attrs["objects"][0][key] = getattr(args, key) or attrs["objects"][0][key]
        scenes.append(attrs)  # ...and the concept's
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


def check_lengths(tokenizer, captions, token=None, vectors=None):
    """Warn once if captions are longer than the text encoder reads (their ends
    are cut, at every step); `token`: textual inversion's, `vectors` tokens."""
    limit = tokenizer.context_length - 2  # without the start and end tokens

    def length(caption: str) -> int:
        parts = caption.split(token) if token else [caption]
        new = (vectors or DEFAULTS["vectors"]) * (len(parts) - 1)
        return new + sum(len(tokenizer.encode(part)) for part in parts)

    long = [caption for caption in captions if length(caption) > limit]
    if long:
        warnings.warn(
            f"{len(long)} of the {len(captions)} captions are longer than the "
            f"{limit} tokens this text encoder reads; their ends are cut, e.g. "
            f"{long[0]!r}."
        )
