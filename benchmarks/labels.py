"""Hand labels of generated images: make the sheets, pack the labels, score readers.

    python benchmarks/labels.py sheets --first 0 --count 80 -o /tmp/sheets
    python benchmarks/labels.py pack NOTES.txt -o tests/data/labels/NAME.json
    python benchmarks/labels.py agree [tests/data/labels/*.json]

The images are those of `evaluate`'s prompts (the canonical captions of the test
split, in order), image i drawn alone from seed i, with `SETTINGS` (20 DDIM steps,
guidance 7.5). `sheets` tiles them enlarged with their ids only (no prompt: the
labeller writes what they see, not what was asked). The labeller's notes have one
line per image, "12: star red large left | unreadable blue small right"; `pack`
regenerates the images, stores them with the labels (`sdscratch.shapes.labels`)
and `agree` prints how often the bundled judge and the outline measure say what
the labeller saw, per attribute and by size.
"""

import argparse
import hashlib
import time
from pathlib import Path

import torch
from _machine import machine  # benchmarks/_machine.py, beside this script

from sdscratch.checkpoint import resolve
from sdscratch.pipeline import StableDiffusion
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


def images_for(model, first, count):
    """Prompts first … first + count − 1 and their images, seed = index."""
    prompts, _ = evaluation_prompts(first + count)
    ids = list(range(first, first + count))
    prompts = [prompts[i] for i in ids]
    pipe = StableDiffusion.from_pretrained(model)
    return ids, prompts, generate(pipe, prompts, ids)


def make_sheets(args):
    ids, _, images = images_for(args.model, args.first, args.count)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    for k in range(0, len(ids), 20):
        path = Path(args.out) / f"sheet_{ids[k]:04d}.png"
        sheet(images[k : k + 20], ids[k : k + 20]).save(path)
        print(path)


def pack(args):
    lines = [line for line in Path(args.notes).read_text().splitlines() if line.strip()]
    notes = dict(parse_line(line) for line in lines)
    ids = sorted(notes)
    if ids != list(range(ids[0], ids[0] + len(ids))):
        raise SystemExit("The notes must label consecutive ids.")
    ids, prompts, images = images_for(args.model, ids[0], len(ids))
    unet = resolve(args.model) / "unet" / "model.safetensors"
    entries = []
    for i, prompt, image in zip(ids, prompts, images):
        png, sha = encode_image(image)
        entries.append({"id": i, "prompt": prompt, "seed": i, "png": png,
                        "sha256": sha, "objects": notes[i]})  # fmt: skip
    save_labels(args.out, {
        "model": args.model,
        "model_unet_sha256": hashlib.sha256(unet.read_bytes()).hexdigest(),
        "settings": SETTINGS,
        "labeller": args.labeller,
        "notes": args.about,
        "images": entries,
    })  # fmt: skip
    print(f"{len(entries)} labelled images -> {args.out}")


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
    for command in (sheets, packer):
        command.add_argument("--model", default="shapes-ldm")
    scorer = commands.add_parser("agree", help="readers against labels files")
    scorer.add_argument("files", nargs="*")
    args = parser.parse_args()
    torch.set_num_threads(1)
    {"sheets": make_sheets, "pack": pack, "agree": agree}[args.command](args)


if __name__ == "__main__":
    main()
