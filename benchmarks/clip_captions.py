"""Captions as people write them, and how CLIP's hard negatives must be phrased.

    python benchmarks/clip_captions.py [--steps 1200] [--templates]
    python benchmarks/clip_captions.py --negatives-only  # seconds: the first table

Natural captions ("red circle", "a circle that is red", "on the left, a tiny red
circle") leave attributes out at random, and what a caption leaves out means "any".
The clip recipe pairs every caption with a hard negative, the caption of a scene
one change away, which is what teaches CLIP word order and binding. Phrased with its
own random draws, a natural negative differs from its caption in many words besides
the changed ones (other synonyms, another word order, other omissions), and now and
then it leaves out the changed attribute and says nothing false. Phrased with its
caption's draws ("paired", changing only what the caption names), it differs from
the caption in the changed words alone.

First, for the recipe's first 2,000 training scenes in each grammar and phrasing,
the share of hard negatives that the caption's own image satisfies (no negative at
all). Then
this trains the clip recipe (`sdscratch.recipes.clip.train_clip`, `--steps` steps,
one thread) on natural captions with independent and with paired negatives, and
prints their zero-shot accuracy on the recipe's 1,000 held-out test scenes, asked in
the canonical template phrasing, beside the bundled CLIP's (template captions,
independent negatives; `--templates` trains that one again too).
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from _machine import machine  # benchmarks/_machine.py, beside this script

from sdscratch import assets_dir
from sdscratch.recipes.clip import _pairs, train_clip
from sdscratch.recipes.common import scenes_seed
from sdscratch.shapes.data import Shapes, codes_satisfy
from sdscratch.tokenizer import train_bpe

QUESTIONS = (
    "one_object_caption",
    "two_object_caption",
    "relation",
    "order",
    "binding",
)


def satisfied_negatives(captions, negatives, pool=2000) -> float:
    """The share of the first `pool` hard negatives that their image satisfies."""
    train = Shapes("train", seed=scenes_seed("clip", 0), captions=captions)
    tokenizer = train_bpe([train.scene(i)[0] for i in range(500)], vocab_size=400)
    *_, shown, asked = _pairs(train, pool, tokenizer, 0, negatives)
    return codes_satisfy(shown, asked[1]).diagonal().float().mean().item()


def run(captions, negatives, steps) -> dict:
    """Zero-shot accuracies (QUESTIONS) and CPU seconds of one clip recipe run."""
    with tempfile.TemporaryDirectory() as folder:
        start = time.process_time()
        quality = train_clip(
            Path(folder), 0, steps, captions=captions, negatives=negatives
        )
        seconds = time.process_time() - start
    return {q: quality["zero_shot"][q]["accuracy"] for q in QUESTIONS} | {
        "cpu_seconds": round(seconds)
    }


def bundled() -> dict:
    """The bundled CLIP's zero-shot accuracies, from its manifest."""
    manifest = assets_dir() / "models" / "shapes-clip" / "MANIFEST.json"
    made = json.loads(manifest.read_text())
    quality = made["quality"]["zero_shot"]
    return {q: quality[q]["accuracy"] for q in QUESTIONS} | {
        "cpu_seconds": made["cpu_seconds"]
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--templates", action="store_true",
                        help="train the template-caption CLIP too")  # fmt: skip
    parser.add_argument("--negatives-only", action="store_true",
                        help="only the share of negatives that are none")  # fmt: skip
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(machine())
    for captions in ("templates", "natural"):
        for negatives in ("independent", "paired"):
            share = satisfied_negatives(captions, negatives)
            print(f"{captions}, {negatives} negatives: {share:.1%} are satisfied by"
                  " their caption's image")  # fmt: skip
    if args.negatives_only:
        return
    rows = {}
    if args.templates:
        rows["templates, independent"] = run("templates", "independent", args.steps)
    else:
        rows["templates, independent (bundled)"] = bundled()
    for negatives in ("independent", "paired"):
        rows[f"natural, {negatives}"] = run("natural", negatives, args.steps)
    print(f"{'captions, negatives':<34}" + "".join(f"{q:>19}" for q in QUESTIONS)
          + f"{'CPU s':>8}")  # fmt: skip
    for name, row in rows.items():
        cells = "".join(f"{row[q]:>19.3f}" for q in QUESTIONS)
        print(f"{name:<34}{cells}{row['cpu_seconds']:>8}")


if __name__ == "__main__":
    main()
