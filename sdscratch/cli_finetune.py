"""The command line's fine-tuning: `sdscratch finetune METHOD` teaches a model
something new from a folder of example images (`sdscratch.cli_examples` reads it:
images, and captions from metadata.jsonl or --prompt).

Every image, caption, option and the output are checked before training starts,
and what a run makes appears whole when it ends: a run that fails or is
interrupted leaves nothing behind and replaces nothing.

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

from sdscratch.cli_examples import load_images, read_examples, usual_mode
from sdscratch.cli_files import _link

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
RECORDED_OPTIONS = (  # the options a record's command repeats, in this order
    "images out model prompt token init_token vectors rank alpha class_prompt "
    "class_images steps lr batch_size seed format"
).split()


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
        pipe.save_pretrained(staging)
        for path in [staging, *staging.rglob("*")]:
            usual_mode(path)  # safetensors writes 0o600 files
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
    for name in RECORDED_OPTIONS:
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
