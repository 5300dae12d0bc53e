"""Hand labels of generated images: make the sheets, pack the labels, score readers.

    python benchmarks/labels.py sheets --first 0 --count 80 -o /tmp/sheets
    python benchmarks/labels.py pack NOTES.txt -o tests/data/labels/NAME.json
    python benchmarks/labels.py agree [tests/data/labels/*.json]
    python benchmarks/labels.py sheets --prompts heart --lora shapes-heart-lora:0.75 \
        --count 60 -o /tmp/sheets

The images are those of `evaluate`'s prompts (the canonical captions of the test
split, in order), image i drawn alone from seed i, with `SETTINGS` (20 DDIM steps,
guidance 7.5). `sheets` tiles them enlarged with their ids only (no prompt: the
labeller writes what they see, not what was asked). The labeller's notes have one
line per image, "12: star red large left | unreadable blue small right"; `pack`
regenerates the images, stores them with the labels (`sdscratch.shapes.labels`)
and `agree` prints how often the bundled judge and the outline measure say what
the labeller saw, per attribute and by size.

`--prompts heart` takes the held-out heart prompts instead (the captions of
`concept_set(n, seed=1)`, "a large red heart at the top"); `--lora NAME:SCALE`
loads a bundled LoRA into the model first (stored in the labels file, with its
sha256); `--offset K` numbers the images K + index (seeds stay the index), and
`pack --append` adds them to an existing labels file of the same model, so one
file can hold several prompt sets.
"""

import argparse
import hashlib
import time
from pathlib import Path

import torch
from _machine import machine  # benchmarks/_machine.py, beside this script

from sdscratch.checkpoint import resolve
from sdscratch.pipeline import StableDiffusion
from sdscratch.shapes.concepts import concept_set
from sdscratch.shapes.evaluate import evaluation_prompts
from sdscratch.shapes.judge import check
from sdscratch.shapes.labels import (
    KEYS,
    SETTINGS,
    agreement,
    encode_image,
    generate,
    judge_reader,
    labelled_images,
    load_labels,
    outline_reader,
    parse_line,
    prompt_shown,
    save_labels,
    sheet,
)
from sdscratch.shapes.outline import outline_check

LABELS = Path(__file__).parent.parent / "tests" / "data" / "labels"


def lora_of(text):
    """ "NAME:SCALE" -> the labels file's "lora" entry (None for no LoRA)."""
    if not text:
        return None
    name, _, scale = text.rpartition(":")
    try:
        scale = float(scale)
    except ValueError:
        raise ValueError(f"--lora {text!r}: give NAME:SCALE, e.g. "
                         "shapes-heart-lora:0.75.") from None  # fmt: skip
    weights = resolve(name) / "pytorch_lora_weights.safetensors"
    if not weights.is_file():
        raise ValueError(f"--lora {name!r} has no pytorch_lora_weights.safetensors.")
    sha = hashlib.sha256(weights.read_bytes()).hexdigest()
    return {"file": name, "scale": scale, "sha256": sha}


def images_for(args, first, count):
    """Prompts first … first + count − 1 of `args.prompts` and their images (seed =
    index), from `args.model` with `args.lora` loaded."""
    if args.prompts == "heart":
        _, prompts, _ = concept_set(first + count, seed=1)
    else:
        prompts, _ = evaluation_prompts(first + count)
    seeds = list(range(first, first + count))
    prompts = [prompts[i] for i in seeds]
    pipe = StableDiffusion.from_pretrained(args.model)
    lora = lora_of(args.lora)
    if lora is not None:
        weights = resolve(lora["file"]) / "pytorch_lora_weights.safetensors"
        pipe.load_lora_weights(weights, lora["scale"])
    return seeds, prompts, generate(pipe, prompts, seeds)


def make_sheets(args):
    seeds, _, images = images_for(args, args.first, args.count)
    ids = [args.offset + seed for seed in seeds]
    Path(args.out).mkdir(parents=True, exist_ok=True)
    for k in range(0, len(ids), 20):
        path = Path(args.out) / f"sheet_{ids[k]:04d}.png"
        sheet(images[k : k + 20], ids[k : k + 20]).save(path)
        print(path)


def pack(args):
    lines = [line for line in Path(args.notes).read_text().splitlines() if line.strip()]
    notes = dict(parse_line(line) for line in lines)
    ids = sorted(notes)
    if ids != list(range(ids[0], ids[0] + len(ids))) or ids[0] < args.offset:
        raise SystemExit("The notes must label consecutive ids from --offset on.")
    seeds, prompts, images = images_for(args, ids[0] - args.offset, len(ids))
    unet = resolve(args.model) / "unet" / "model.safetensors"
    entries = []
    for i, seed, prompt, image in zip(ids, seeds, prompts, images):
        png, sha = encode_image(image)
        entries.append({"id": i, "prompt": prompt, "seed": seed, "png": png,
                        "sha256": sha, "objects": notes[i]})  # fmt: skip
    head = {
        "model": args.model,
        "model_unet_sha256": hashlib.sha256(unet.read_bytes()).hexdigest(),
        "settings": SETTINGS,
        "labeller": args.labeller,
        "notes": args.about,
    }
    if args.lora:
        head["lora"] = lora_of(args.lora)
    if args.append:
        head, entries = appended(args.out, head, entries)
    save_labels(args.out, head | {"images": entries})
    print(f"{len(entries)} labelled images -> {args.out}")


def appended(path, head, entries):
    """The labels file at `path` with `entries` added: (its head, all entries)."""
    labels = load_labels(path)
    for key in ("model", "model_unet_sha256", "settings", "lora"):
        if labels.get(key) != head.get(key):
            raise ValueError(f"{path} has another {key}; cannot append to it.")
    old = labels.pop("images")
    if {entry["id"] for entry in old} & {entry["id"] for entry in entries}:
        raise ValueError(f"{path} already has some of these ids (see --offset).")
    return labels, old + entries


def agree(args):
    print(f"machine: {machine()}")
    files = args.files or sorted(LABELS.glob("*.json"))
    for path in files:
        labels = load_labels(path)
        images = labelled_images(labels)
        objects = sum(len(entry["objects"]) for entry in labels["images"])
        print(f"\n{path}: {len(images)} images, {objects} labelled objects")
        shown = torch.tensor([prompt_shown(entry) for entry in labels["images"]])
        prompts = [entry["prompt"] for entry in labels["images"]]
        print(f"  the labeller sees the prompt's scene in {int(shown.sum())} images")
        for name, verdict in (("judge", check), ("outline", outline_check)):
            says = verdict(images, prompts)["scene"]
            print(f"  {name} says so of {int(says.sum())}; its verdict agrees with the "
                  f"labeller's on {int((says == shown).sum())}/{len(shown)}: "
                  f"{int((says & ~shown).sum())} false yes, "
                  f"{int((~says & shown).sum())} false no")  # fmt: skip
        for name, reader in (("judge", judge_reader()), ("outline", outline_reader)):
            start = time.perf_counter()
            counts = agreement(reader(images), labels)
            seconds = time.perf_counter() - start
            print(f"  {name} ({seconds:.1f} s)")
            for key in (*KEYS, "objects"):
                cells = "  ".join(
                    f"{group} {100 * right / total:5.1f} % ({right}/{total})"
                    for group, (right, total) in counts[key].items()
                )
                print(f"    {key:9s} {cells}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    sheets = commands.add_parser("sheets", help="labelling sheets (PNG)")
    sheets.add_argument("--first", type=int, default=0)
    sheets.add_argument("--count", type=int, default=80)
    sheets.add_argument("-o", "--out", required=True, help="a folder")
    packer = commands.add_parser("pack", help="notes -> a labels file")
    packer.add_argument("notes")
    packer.add_argument("-o", "--out", required=True)
    packer.add_argument("--labeller", default="")
    packer.add_argument("--about", default="", help="how the labels were made")
    packer.add_argument("--append", action="store_true",
                        help="add to the file -o instead of writing it")  # fmt: skip
    for command in (sheets, packer):
        command.add_argument("--model", default="shapes-ldm")
        command.add_argument("--prompts", choices=("full", "heart"), default="full")
        command.add_argument("--lora", default="", help="NAME:SCALE of a bundled LoRA")
        command.add_argument("--offset", type=int, default=0, help="id of seed 0")
    scorer = commands.add_parser("agree", help="readers against labels files")
    scorer.add_argument("files", nargs="*")
    args = parser.parse_args()
    torch.set_num_threads(1)
    try:
        {"sheets": make_sheets, "pack": pack, "agree": agree}[args.command](args)
    except ValueError as error:
        parser.exit(2, f"{error}\n")


if __name__ == "__main__":
    main()
