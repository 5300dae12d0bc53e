"""The command line: `python -m sdscratch COMMAND` (also installed as `sdscratch`).

Errors print one line on stderr and exit with code 2, never a traceback.
"""

import argparse
import math
import sys
import warnings
from pathlib import Path

from sdscratch.cli_files import (
    IMAGE_SIZE_FACTOR,
    decode_image,
    open_image,
    output_path,
    publish,
)
from sdscratch.samplers import SAMPLERS


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (exit code 2)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, got {value}")
    return value


def non_negative_float(text):
    value = float(text)
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def fraction(text):
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text}")
    return value


def seed(text):
    value = int(text)
    if not 0 <= value < 2**64:
        raise argparse.ArgumentTypeError(f"must be between 0 and 2**64 - 1, got {text}")
    return value


def cmd_generate(args):
    """Text-to-image (or img2img, inpainting) with a checkpoint; write one PNG."""
    import torch

    from sdscratch.lora_files import lora_argument
    from sdscratch.pipeline import StableDiffusion
    from sdscratch.viz import make_grid, to_pil

    out, image_format = output_path(args)  # before the slow part: fail early
    image, mask = open_image(args.init_image), open_image(args.mask)
    control = open_image(args.control)
    if mask is not None and image is None:
        raise ValueError("--mask needs --init-image, the image to repaint.")
    if args.strength is not None and image is None:
        raise ValueError("--strength needs --init-image, the image to start from.")
    pipe = StableDiffusion.from_pretrained(
        args.model, torch_dtype=args.dtype, device=pick_device(args.device)
    )
    for text in args.lora:  # FILE[:SCALE]
        pipe.load_lora_weights(*lora_argument(text))
    for path in args.embedding:
        pipe.load_textual_inversion(path)
    side = pipe.latent_shape[-1] * pipe.vae_scale_factor * IMAGE_SIZE_FACTOR
    image = decode_image(image, args.init_image, "RGB", side)
    mask = decode_image(mask, args.mask, "L", side)
    controlling = control_options(args, control, pipe, side)
    options = dict(
        negative_prompt=args.negative_prompt,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        guidance_rescale=args.guidance_rescale,
        sampler=args.sampler,
        karras=args.karras,
        generator=torch.Generator().manual_seed(args.seed),
        num_images_per_prompt=args.n,
        output_type="pt",
    )
    if mask is not None:
        strength = 1.0 if args.strength is None else args.strength
        images = pipe.inpaint(args.prompt, image, mask, strength, **options)
    elif image is not None:
        strength = 0.8 if args.strength is None else args.strength
        images = pipe.img2img(args.prompt, image, strength, **options)
    else:
        images = pipe(args.prompt, **options, **controlling)
    picture = make_grid(images, pad=2) if len(images) > 1 else images[0]
    publish(to_pil(picture[None])[0], out, image_format, args.force)
    print(out)


def control_options(args, control, pipe, side) -> dict:
    """--controlnet, --control (opened) and --control-scale as the pipeline's
    `controlnet`, `image` and `controlnet_conditioning_scale` ({}: no control)."""
    if args.controlnet is None and control is None:
        if args.control_scale is not None:
            raise ValueError("--control-scale needs --control and --controlnet.")
        return {}
    if args.controlnet is None or control is None:
        raise ValueError("--control IMAGE and --controlnet FOLDER go together.")
    if args.init_image is not None:
        raise ValueError("--control steers text-to-image; drop --init-image.")
    from sdscratch.checkpoint import load_component, resolve, verify
    from sdscratch.controlnet import ControlNet, ControlNetConfig, check_trained_for
    from sdscratch.loading import is_path

    folder = resolve(args.controlnet)  # a bundled name, or a folder
    if not is_path(args.controlnet):
        verify(folder)  # a bundled one: checked against its manifest
    check_trained_for(folder, args.model)  # the UNet it was trained on, if recorded
    controlnet = load_component(folder, ControlNet, ControlNetConfig)
    return dict(
        image=decode_image(control, args.control, "RGB", side),
        controlnet=controlnet.to(pipe.device, pipe.dtype),
        controlnet_conditioning_scale=1.0
        if args.control_scale is None
        else args.control_scale,
    )


def pick_device(name):
    """The torch device for --device (None: the CPU), or one sentence if absent."""
    import torch

    if name is None or name == "cpu":
        return torch.device("cpu")
    available = {"cuda": torch.cuda.is_available(),
                 "mps": torch.backends.mps.is_available()}  # fmt: skip
    if not available[name]:
        raise ValueError(f"--device {name}: this machine's torch has no {name} device.")
    return torch.device(name)


def add_generate_command(commands):
    generate = commands.add_parser(
        "generate",
        help="make an image from a prompt",
        description="Text-to-image with a trained checkpoint; writes a PNG (a grid "
        "when -n > 1) and prints its path.",
    )
    generate.add_argument("prompt", help='e.g. "a small red circle on the left"')
    generate.add_argument("--negative-prompt", help="what to steer away from")
    generate.add_argument(
        "--steps", type=positive_int, default=20, help="sampler steps (default: 20)"
    )
    generate.add_argument(
        "--guidance",
        type=non_negative_float,
        default=7.5,
        help="classifier-free guidance scale (default: 7.5)",
    )
    generate.add_argument(
        "--guidance-rescale",
        type=fraction,
        default=0.0,
        help="guidance rescale φ, 0 to 1 (default: 0, off; 0.7 tames a large "
        "--guidance)",
    )
    generate.add_argument(
        "--sampler", choices=SAMPLERS, default="ddim", help="default: ddim"
    )
    generate.add_argument(
        "--karras",
        action="store_true",
        help="Karras sigmas ("
        + ", ".join(name for name, spec in SAMPLERS.items() if spec.walks_sigmas)
        + ")",
    )
    generate.add_argument(
        "--seed",
        type=seed,
        default=0,
        help="seed of the noise: the same seed, the same image",
    )
    generate.add_argument(
        "-n", type=positive_int, default=1, help="how many images (default: 1)"
    )
    generate.add_argument(
        "-o", "--output", help="PNG to write (default: from the prompt and seed)"
    )
    generate.add_argument(
        "--force",
        action="store_true",
        help="replace the output if it exists (or appears while generating)",
    )
    generate.add_argument(
        "--model",
        default="shapes-ldm",
        help="a bundled name, a folder (ours or a diffusers SD "
        "v1.x one), a .safetensors single file or a Hub repo id "
        "such as stable-diffusion-v1-5/stable-diffusion-v1-5 "
        "(default: shapes-ldm)",
    )
    generate.add_argument(
        "--dtype",
        choices=("fp32", "fp16", "bf16"),
        default="fp32",
        help="the models' precision (default: fp32)",
    )
    generate.add_argument(
        "--device", choices=("cpu", "cuda", "mps"), help="where to run (default: cpu)"
    )
    generate.add_argument(
        "--init-image",
        help="img2img: start from this image instead of noise; "
        "used at its own size, which must be at most 8× the "
        "model's image size (256×256 for shapes-ldm) with sides "
        "divisible by the VAE's factor (4 for shapes-ldm)",
    )
    generate.add_argument(
        "--strength",
        type=fraction,
        help="img2img: how much to change it, 0 to 1 (default: 0.8)",
    )
    generate.add_argument(
        "--mask",
        help="inpainting: white where --init-image is repainted (the same size)",
    )
    generate.add_argument(
        "--control",
        help="ControlNet: a control image (e.g. an edge map) whose layout the "
        "images follow; resized to the images' size",
    )
    generate.add_argument(
        "--controlnet",
        help="ControlNet: the folder of a ControlNet for this model, or a bundled "
        "one (shapes-controlnet: outlines, for shapes-ldm)",
    )
    generate.add_argument(
        "--control-scale",
        type=float,
        help="ControlNet: how strongly it steers (default: 1; 0: not at all)",
    )
    generate.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="FILE[:SCALE]",
        help="a LoRA (diffusers' or kohya's .safetensors) used at SCALE (default: "
        "1); repeat it for several",
    )
    generate.add_argument(
        "--embedding",
        action="append",
        default=[],
        metavar="FILE",
        help="a textual-inversion embedding (diffusers' or A1111's .safetensors; "
        "A1111's token is the file's name); repeat it for several",
    )
    generate.set_defaults(func=cmd_generate)


def cmd_train(args):
    from sdscratch.recipes import run_recipe

    manifest = run_recipe(
        args.recipe,
        out=args.out,
        seed=args.seed,
        steps=args.steps,
        force=args.force,
        shards=args.shards,
        resume=args.resume,
        options=dict(
            base=args.base, control=args.control, connections=args.connections
        ),
    )
    print(f"trained in {manifest['wall_time_seconds']:.0f} s: {manifest['quality']}")


def positive_float(text):
    value = float(text)
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be more than 0, got {text}")
    return value


def add_finetune_command(commands):
    from sdscratch.cli_finetune import METHOD_OPTIONS, cmd_finetune
    from sdscratch.finetune import LEARNING_RATES, METHODS

    finetune = commands.add_parser(
        "finetune",
        help="teach a model something new from a few example images",
        description="Fine-tune a model on a folder of example images (and "
        'metadata.jsonl captions, Hugging Face ImageFolder\'s: lines {"file_name": '
        '..., "text": ...}). textual_inversion and lora write a .safetensors file '
        "for generate --embedding / --lora; dreambooth and full a model folder for "
        "generate --model. A JSON record (NAME.json beside a file, MANIFEST.json in "
        "a folder) says how it was made. Nothing is written until training ends.",
    )
    finetune.add_argument("method", choices=METHODS)
    finetune.add_argument(
        "--images",
        required=True,
        help="a folder of example images (PNG, JPEG...; square, resized to the "
        "model's size), with metadata.jsonl or --prompt; `sdscratch data examples` "
        "writes one",
    )
    finetune.add_argument(
        "--out",
        required=True,
        help="a .safetensors file (textual_inversion, lora), or a new or empty "
        "folder (dreambooth, full)",
    )
    finetune.add_argument(
        "--force", action="store_true", help="replace --out if it exists"
    )
    finetune.add_argument(
        "--model",
        default="shapes-ldm",
        help="the model to start from: a bundled name or a folder "
        "(default: shapes-ldm)",
    )
    finetune.add_argument(
        "--prompt",
        help="every image's caption (instead of metadata.jsonl's), e.g. "
        '"a large red heart at the top"',
    )
    only = {option: " and ".join(methods) for option, methods in METHOD_OPTIONS.items()}
    finetune.add_argument(
        "--token",
        help=f'{only["token"]}: the new word, e.g. "<heart>", which every caption '
        "holds where the concept's word goes",
    )
    finetune.add_argument(
        "--init-token",
        metavar="WORD",
        help=f"{only['init_token']}: a word the new vectors start from, e.g. circle "
        "(default: small random vectors)",
    )
    finetune.add_argument(
        "--vectors",
        type=positive_int,
        help=f"{only['vectors']}: vectors of the new word (default: 1)",
    )
    finetune.add_argument(
        "--rank", type=positive_int, help=f"{only['rank']}: r (default: 4)"
    )
    finetune.add_argument(
        "--alpha",
        type=positive_float,
        help=f"{only['alpha']}: α; the change is scaled by α/r (default: α = r)",
    )
    finetune.add_argument(
        "--class-prompt",
        help=f"{only['class_prompt']}: the class's prompt; the base model draws "
        "--class-images of it first, trained on beside the examples (prior "
        "preservation)",
    )
    finetune.add_argument(
        "--class-images",
        type=positive_int,
        help=f"{only['class_images']}: how many class images (default: 20)",
    )
    finetune.add_argument(
        "--steps", type=positive_int, default=300, help="AdamW steps (default: 300)"
    )
    finetune.add_argument(
        "--lr",
        type=positive_float,
        help="learning rate (default: "
        + ", ".join(f"{rate:g} for {method}" for method, rate in LEARNING_RATES.items())
        + ")",
    )
    finetune.add_argument(
        "--batch-size",
        type=positive_int,
        default=4,
        help="examples per step (default: 4)",
    )
    finetune.add_argument(
        "--seed", type=seed, default=0, help="seed of every random draw (default: 0)"
    )
    finetune.add_argument(
        "--format",
        choices=("diffusers", "kohya", "a1111"),
        help="the file's layout: diffusers (default), kohya (lora) or a1111 "
        "(textual_inversion; the token is then the file's name)",
    )
    finetune.set_defaults(func=cmd_finetune)


def cmd_evaluate(args):
    import json

    from sdscratch.shapes.evaluate import evaluate_model

    result = evaluate_model(
        args.model,
        args.samples,
        args.sampler,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        seed=args.seed,
        batch_size=args.batch_size,
        prompts=args.prompts,
    )
    settings = {key: getattr(args, key) for key in ("model", "samples", "sampler")}
    settings["prompts"] = args.prompts
    settings |= {key: getattr(args, key) for key in ("steps", "guidance", "seed")}
    print(json.dumps(settings | result))


def add_evaluate_command(commands):
    evaluate = commands.add_parser(
        "evaluate",
        help="generate for N test prompts; print prompt accuracy (by the judge and "
        "by the outline), mean outline IoU, FID, Inception Score, CLIP score",
    )
    evaluate.add_argument(
        "--model",
        default="shapes-ldm",
        help="bundled name or folder (default: shapes-ldm)",
    )
    evaluate.add_argument(
        "--samples",
        type=positive_int,
        default=1000,
        help="N, prompts and images (default: 1000)",
    )
    evaluate.add_argument(
        "--sampler",
        choices=SAMPLERS,
        default="ddim",
        help="the sampler (default: ddim)",
    )
    evaluate.add_argument(
        "--steps", type=positive_int, default=20, help="sampler steps (default: 20)"
    )
    evaluate.add_argument(
        "--guidance",
        type=non_negative_float,
        default=7.5,
        help="classifier-free guidance scale (default: 7.5)",
    )
    evaluate.add_argument(
        "--seed", type=seed, default=0, help="seed of the noise (default: 0)"
    )
    evaluate.add_argument(
        "--batch-size",
        type=positive_int,
        default=50,
        help="prompts per pipeline call (default: 50)",
    )
    evaluate.add_argument(
        "--prompts",
        choices=("full", "underspecified", "heldout"),
        default="full",
        help="full: every attribute named; underspecified: 'a red circle'...; "
        "heldout: phrasings no training caption uses (default: full)",
    )
    evaluate.set_defaults(func=cmd_evaluate)


def cmd_data_shards(args):
    """Write Shapes scenes, or a folder of captioned images, as tar shards."""
    from sdscratch.shards import folder_samples, write_shards

    if args.images is not None:
        samples = folder_samples(args.images)  # every caption checked first
        what = f"{len(samples)} images of {args.images}"
    else:
        from sdscratch.shapes.shards import shapes_samples

        samples = shapes_samples(args.scenes, args.split, args.size, args.seed)
        what = f"{args.scenes} Shapes {args.split} scenes"
    paths = write_shards(samples, args.out, args.count)
    print(f"wrote {what} into {len(paths)} shards in {args.out}")


def add_data_command(commands):
    data = commands.add_parser("data", help="training data: write it as tar shards")
    actions = data.add_subparsers(dest="action", required=True, parser_class=Parser)
    shards = actions.add_parser(
        "shards",
        help="write Shapes (or --images FOLDER) as webdataset tar shards",
        description="Write training data as webdataset tar shards (<key>.png and "
        "<key>.txt, its caption), which the recipes can stream: Shapes scenes, or "
        "the images of a folder, each with a caption in a .txt file of its name.",
    )
    shards.add_argument("--out", required=True, help="a new (or empty) folder")
    shards.add_argument(
        "--count", type=positive_int, required=True, help="number of shards"
    )
    shards.add_argument(
        "--images", help="a folder of your images, cat.png with cat.txt (caption)"
    )
    shards.add_argument(
        "--scenes",
        type=positive_int,
        default=10_000,
        help="Shapes scenes to write (default: 10000)",
    )
    shards.add_argument(
        "--split", choices=("train", "val", "test"), default="train", help="Shapes"
    )
    shards.add_argument(
        "--size", type=positive_int, default=32, help="Shapes image side (default: 32)"
    )
    shards.add_argument(
        "--seed", type=seed, default=0, help="Shapes' seed: the family of scenes"
    )
    shards.set_defaults(func=cmd_data_shards)
    add_examples_command(actions)


def add_examples_command(actions):
    from sdscratch.cli_examples import cmd_data_examples
    from sdscratch.shapes.scenes import ALL_COLOURS, ALL_SHAPES

    examples = actions.add_parser(
        "examples",
        help="write example images of a shape or colour for `sdscratch finetune`",
        description="Write one-object Shapes scenes of a shape and/or colour (also "
        "the novel heart and pink, which no bundled model knows) as PNGs, with "
        "their captions in metadata.jsonl: the examples `sdscratch finetune` "
        'learns from. The captions name the concept as --word says: "a large red '
        "heart at the top\" for lora, dreambooth and full (shapes-ldm's tokenizer "
        'cuts "heart", a word it never saw, into pieces none of its training '
        'captions holds: a rare identifier), --word "<heart>" for textual_inversion.',
    )
    examples.add_argument("--out", required=True, help="a new (or empty) folder")
    examples.add_argument("--shape", choices=ALL_SHAPES, help="e.g. heart")
    examples.add_argument(
        "--colour", choices=tuple(ALL_COLOURS), help="e.g. pink (default: any)"
    )
    examples.add_argument(
        "--count",
        type=positive_int,
        default=20,
        help="how many images (default: 20)",
    )
    examples.add_argument(
        "--word",
        help="the captions' word for the concept (default: the shape's, else the "
        'colour\'s), e.g. "<heart>" for textual inversion',
    )
    examples.add_argument(
        "--size", type=positive_int, default=32, help="image side (default: 32)"
    )
    examples.add_argument(
        "--seed", type=seed, default=0, help="seed of the scenes (default: 0)"
    )
    examples.set_defaults(func=cmd_data_examples)


def cmd_book_build(args):
    import time

    from sdscratch.book import build

    start = time.perf_counter()
    out = build(root=args.root, out=args.out)
    pages = len(list(out.glob("[0-9][0-9]_*.html")))
    print(f"built {pages} lessons into {out} in {time.perf_counter() - start:.1f} s")


def cmd_book_execute(args):
    from sdscratch.book import execute

    execute(args.notebooks, root=args.root)


def cmd_book_exercises(args):
    from sdscratch.exercises.notebooks import write_exercises

    root = Path(args.root)
    written = write_exercises(root / "lessons", root / "exercises", args.force)
    count = f"{len(written)} exercise notebook" + ("" if len(written) == 1 else "s")
    print(f"wrote {count} into {root / 'exercises'}")


def add_book_commands(commands):
    from sdscratch.book import ROOT

    book = commands.add_parser("book", help="the course website and its lessons")
    book.add_argument(
        "--root",
        default=ROOT,
        type=Path,
        help="the repository: book.toml, README.md, lessons/",
    )
    actions = book.add_subparsers(dest="action", required=True, parser_class=Parser)
    build = actions.add_parser("build", help="build the website into _build/site")
    build.add_argument("--out", help="site folder (default: _build/site)")
    build.set_defaults(func=cmd_book_build)
    execute = actions.add_parser(
        "execute", help="run lessons and store their outputs (as the tests run them)"
    )
    execute.add_argument("notebooks", nargs="*", help="default: every lesson")
    execute.set_defaults(func=cmd_book_execute)
    exercises = actions.add_parser(
        "exercises", help="write exercises/NN_topic.ipynb: the lessons, solutions out"
    )
    exercises.add_argument(
        "--force",
        action="store_true",
        help="replace exercise notebooks that differ (your work)",
    )
    exercises.set_defaults(func=cmd_book_exercises)


def build_parser() -> Parser:
    parser = Parser(prog="sdscratch", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    add_generate_command(commands)
    train = commands.add_parser(
        "train",
        help="run a recipe that makes a checkpoint",
        description="Run the recipe that made a bundled checkpoint. It writes a new "
        "folder (default: trained/<model>, e.g. trained/shapes-ldm, in the current "
        "folder), never the bundled copy unless --out names it and --force is given; "
        "the folder appears only when the run has finished.",
    )
    train.add_argument("recipe", help="which model to train, e.g. vae or ldm")
    train.add_argument("--seed", type=int, default=0, help="seed of every random draw")
    train.add_argument("--steps", type=positive_int, help="override the training steps")
    train.add_argument("--out", help="output folder (default: trained/<model>)")
    train.add_argument(
        "--shards",
        help="train on the images of these tar shards (`sdscratch data shards`), "
        "e.g. your own; recipes that can: vae, ldm, pixel-uncond, pixel-text",
    )
    train.add_argument(
        "--resume",
        metavar="DIR",
        help="go on with a stopped run from its checkpoint folder (<out>.checkpoint, "
        "which a run saves as it trains) or a file in it; give the options it was "
        "started with",
    )
    train.add_argument(
        "--force",
        action="store_true",
        help="replace --out if it holds files (when the run ends)",
    )
    train.add_argument(
        "--base", help="controlnet: the latent model to steer (default: shapes-ldm)"
    )
    train.add_argument(
        "--control",
        choices=("outline", "mask"),
        help="controlnet: the control images, edge maps or filled layout masks "
        "(default: outline)",
    )
    train.add_argument(
        "--connections",
        choices=("zero", "random"),
        help="controlnet: zero convolutions (default) or randomly initialised ones",
    )
    train.set_defaults(func=cmd_train)
    add_finetune_command(commands)
    add_evaluate_command(commands)
    add_data_command(commands)
    add_book_commands(commands)
    return parser


def one_line_warning(message, category, *args, **kwargs):
    """Warnings on the command line: one line, without the source line."""
    print(f"sdscratch: warning: {message}", file=sys.stderr)


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        with warnings.catch_warnings():
            warnings.showwarning = one_line_warning
            args.func(args)
    except (ValueError, OSError) as error:  # CheckpointError is a ValueError
        print(f"sdscratch: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sdscratch: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
