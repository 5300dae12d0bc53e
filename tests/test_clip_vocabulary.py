"""Our tokenizer with OpenAI CLIP's real vocabulary (Stable Diffusion v1's).

The vocabulary is OpenAI's BPE file, `bpe_simple_vocab_16e6.txt.gz`, as the PyPI
wheel of open-clip-torch ships it. `make` downloads that wheel into .venv/wheels
without installing it (it would pull torchvision); the test reads the file from the
zip, derives vocab.json and merges.txt exactly as open_clip's SimpleTokenizer builds
its vocabulary (with OpenAI's special-token names, as SD v1.5's tokenizer has them),
and compares our ids with transformers' CLIPTokenizer built from the same files.
"""

import gzip
import json
import os
import random
import sys
import zipfile
from pathlib import Path

import pytest
from transformers import CLIPTokenizer

from sdscratch.shapes.data import Shapes
from sdscratch.tokenizer import Tokenizer, byte_to_unicode

WHEEL = "open_clip_torch-*.whl"
BPE = "open_clip/bpe_simple_vocab_16e6.txt.gz"
ROOT = Path(__file__).resolve().parents[1]


def find_wheel():
    for folder in (Path(sys.prefix) / "wheels", ROOT / ".venv" / "wheels"):
        wheels = sorted(folder.glob(WHEEL))
        if wheels:
            return wheels[-1]
    message = (
        "open-clip-torch's wheel (CLIP's BPE vocabulary) is not in .venv/wheels; "
        "`make .venv/.installed` downloads it."
    )
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """vocab.json + merges.txt derived from the wheel's BPE file."""
    with zipfile.ZipFile(find_wheel()) as wheel:
        lines = gzip.decompress(wheel.read(BPE)).decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    vocab = list(byte_to_unicode().values())
    vocab += [token + "</w>" for token in vocab]
    vocab += ["".join(pair) for pair in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder = tmp_path_factory.mktemp("clip-vocabulary")
    ids = {token: i for i, token in enumerate(vocab)}
    (folder / "vocab.json").write_text(json.dumps(ids, ensure_ascii=False))
    text = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges)
    (folder / "merges.txt").write_text(text, encoding="utf-8")
    return folder


SUBJECTS = [
    "an astronaut",
    "a cat",
    "a red fox",
    "the Eiffel Tower",
    "a café",
    "Zürich's old town",
    "a robot",
    "two dogs",
    "a bowl of ramen 🍜",
    "a Ferrari F40",
    "Mount Fuji (富士山)",
    "a portrait of Σωκράτης",
]
STYLES = [
    "oil painting",
    "photorealistic, 8k, ultra-detailed",
    "by Greg Rutkowski",
    "trending on ArtStation!!!",
    "35mm f/1.8, ISO-100",
    "in the style of Mucha",
    "low-poly 3D render",
    "watercolour; soft light",
    "[masterpiece], (best:1.2)",
    "unreal engine 5 — cinematic",
    "«vintage» poster",
    "#art @night 100%",
]
PLACES = [
    "riding a horse on Mars",
    "in a forest at dawn",
    "on the moon",
    "under the sea",
    "in Tōkyō at night",
    "next to a 1950s diner",
    "in 2077",
    "near Αθήνα",
    "on a rainy street in Москва",
    "at 3:45 p.m.",
    "with 42 balloons",
    "😀🎉👍",
]
ODD = [
    "",
    " ",
    "\t\n",
    "a  b\u00a0c\u3000d",
    "it's I'm we're they'll",
    "e\u0301 vs é",
    "İstanbul ß ẞ ﬁ",
    "½ ² ① Ⅻ",
    "zero\u200bwidth",
    "<|endoftext|>",
    "a,b;c:d!e?f",
    "3.14159 2,718 1e-5 0x1F 007",
    "C++ / C# / F#",
    "中文 日本語 한국어 مرحبا",
]


def prompts(n=1200, seed=0):
    """n seeded prompts: SD-style prompts, long ones (past 77 tokens), captions,
    punctuation, numbers, non-ASCII, emoji and odd whitespace."""
    rng = random.Random(seed)
    made = [Shapes("test").scene(i)[0] for i in range(100)] + ODD
    while len(made) < n:
        parts = [rng.choice(SUBJECTS), rng.choice(PLACES)]
        parts += rng.sample(STYLES, rng.randint(0, 4))
        prompt = ", ".join(parts)
        if rng.random() < 0.15:  # long: several prompts in one, past 77 tokens
            prompt = " ".join([prompt] * rng.randint(4, 8))
        if rng.random() < 0.2:
            prompt = prompt.upper() if rng.random() < 0.5 else prompt.title()
        if rng.random() < 0.1:
            prompt = rng.choice(["  ", "\n", "\t"]).join(prompt.split(" "))
        made.append(prompt)
    return made


def test_at_least_1000_prompts_some_long():
    made = prompts()
    assert len(made) >= 1000 and len(set(made)) >= 1000
    assert sum(len(p) > 400 for p in made) >= 50


def test_vocabulary_is_clips(folder):
    ours = Tokenizer.from_pretrained(folder)
    assert len(ours) == 49408  # CLIP ViT-L/14's vocab_size, SD v1's
    assert (ours.bos_id, ours.eos_id) == (49406, 49407)


def test_ids_equal_transformers_on_1200_prompts(folder):
    ours = Tokenizer.from_pretrained(folder)
    reference = CLIPTokenizer.from_pretrained(folder)
    made = prompts()
    unframed = reference(made, add_special_tokens=False).input_ids
    differ = [p for p, ids in zip(made, unframed) if ours.encode(p) != ids]
    assert not differ, f"{len(differ)} prompts differ, e.g. {differ[:3]}"
    framed = reference(made, padding="max_length", max_length=77, truncation=True,
                       return_tensors="pt").input_ids  # fmt: skip
    with pytest.warns(UserWarning, match="truncated"):
        assert ours(made).tolist() == framed.tolist()
