"""`sdscratch finetune` and `sdscratch data examples`: every method writes what
`generate` loads and draws differently with, and bad input is one sentence, exit
code 2, with nothing written and nothing replaced."""

import json

import numpy as np
import pytest
from PIL import Image
from safetensors import safe_open
from test_cli import tiny_checkpoint

from conftest import run_cli

PROMPT = "a large red heart at the top"
FEW = ["--steps", 6, "--batch-size", 2]  # enough to change the images, fast


@pytest.fixture(scope="module")
def examples(tmp_path_factory):
    """`data examples` of the novel heart: captions with "heart", and with the
    textual-inversion token "<heart>" in its place (4 images each)."""
    root = tmp_path_factory.mktemp("examples")
    for name, word in (("heart", []), ("heart-ti", ["--word", "<heart>"])):
        code, out, err = run_cli("data", "examples", "--shape", "heart", "--count", 4,
                                 "--out", root / name, *word)  # fmt: skip
        assert code == 0, err
    return root


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """test_cli's tiny random checkpoint: 16×16 images (the examples are 32×32)."""
    return tiny_checkpoint(tmp_path_factory.mktemp("tiny-ldm"))


def finetune(*args):
    """Run `sdscratch finetune ARGS`; check that it succeeded; return stderr."""
    code, out, err = run_cli("finetune", *args)
    assert code == 0, err
    return err


def failure(*args, command="finetune") -> str:
    """Run a command that must fail cleanly; return its one line."""
    code, out, err = run_cli(command, *args)
    assert code == 2, (code, out, err)
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


def drawn(tmp_path, name, prompt=PROMPT, *options) -> np.ndarray:
    """`generate PROMPT OPTIONS` (the bundled model unless --model is given), 3
    steps: the image as an array."""
    out = tmp_path / f"{name}.png"
    code, _, err = run_cli("generate", prompt, "--steps", 3, "-o", out, *options)
    assert code == 0, err
    return np.asarray(Image.open(out), dtype=np.float64)


def changed(image, base) -> float:
    """Mean absolute difference of two uint8 images, in levels of 255."""
    return float(np.abs(image - base).mean())


# ----------------------------------------------------------------------------------
# data examples


def test_examples_are_captioned_pngs_of_the_concept(examples):
    from sdscratch.shapes.captions import parse_caption
    from sdscratch.shapes.scenes import COLOURS

    lines = (examples / "heart" / "metadata.jsonl").read_text().splitlines()
    entries = [json.loads(line) for line in lines]
    assert [e["file_name"] for e in entries] == ["0.png", "1.png", "2.png", "3.png"]
    for entry in entries:
        with Image.open(examples / "heart" / entry["file_name"]) as image:
            assert image.size == (32, 32)
        said = parse_caption(entry["text"])
        assert said is not None, entry
        assert [o["shape"] for o in said["objects"]] == ["heart"]
        assert said["objects"][0]["colour"] in COLOURS  # the base world's colours
    token = (examples / "heart-ti" / "metadata.jsonl").read_text().splitlines()
    assert [json.loads(t)["text"] for t in token] == [
        e["text"].replace("heart", "<heart>") for e in entries
    ]
    same = (examples / "heart" / "0.png").read_bytes()
    assert (examples / "heart-ti" / "0.png").read_bytes() == same  # only words differ


def test_examples_draw_the_shape(examples):
    """The pixels are the heart the caption places: its colour at its position."""
    from sdscratch.shapes.captions import parse_caption
    from sdscratch.shapes.scenes import ALL_COLOURS, POSITIONS

    entry = json.loads((examples / "heart" / "metadata.jsonl").open().readline())
    obj = parse_caption(entry["text"])["objects"][0]
    pixels = np.asarray(Image.open(examples / "heart" / entry["file_name"]))
    x, y = POSITIONS[obj["position"]]
    centre = pixels[int(y * 32) + 1, int(x * 32)]  # a heart is solid at its centre
    assert np.abs(centre - np.array(ALL_COLOURS[obj["colour"]])).max() <= 2


def test_examples_bad_input(tmp_path):
    assert "--shape or --colour" in failure("examples", "--out", tmp_path / "x",
                                            command="data")  # fmt: skip
    assert not (tmp_path / "x").exists()
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "notes.txt").write_text("precious")
    err = failure("examples", "--shape", "heart", "--out", kept, command="data")
    assert "not an empty folder" in err
    assert [p.name for p in kept.iterdir()] == ["notes.txt"]
    assert "invalid choice: 'hexagon'" in failure(
        "examples", "--shape", "hexagon", "--out", kept, command="data"
    )


# ----------------------------------------------------------------------------------
# Each method: a file or folder that generate loads, and draws differently with


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """The bundled model's images of the concept's prompts, before fine-tuning."""
    root = tmp_path_factory.mktemp("base")
    return {
        "heart": drawn(root, "heart"),
        "<heart>": drawn(root, "token", PROMPT.replace("heart", "<heart>")),
    }


def record(path) -> dict:
    """The JSON record beside an adapter file, checked for what every run says."""
    data = json.loads(path.with_suffix(".json").read_text())
    assert data["steps"] == 6 and data["images"] == 4 and data["seed"] == 0
    assert data["command"].startswith("sdscratch finetune ")
    assert data["cpu_seconds"] > 0 and 0 < data["final_loss"] < 1
    return data


def test_textual_inversion_writes_an_embedding(examples, base, bundled, tmp_path):
    out = tmp_path / "heart.safetensors"
    finetune("textual_inversion", "--images", examples / "heart-ti", "--out", out,
             "--token", "<heart>", "--vectors", 2, "--init-token", "circle",
             "--lr", 0.05, *FEW)  # fmt: skip
    with safe_open(out, "pt") as file:  # diffusers' layout: {token: (n, D)}
        assert list(file.keys()) == ["<heart>"]
        vectors = file.get_tensor("<heart>")
    circle = bundled.text_encoder.embeddings.token_embedding.weight[575].detach()
    assert bundled.tokenizer.encode("circle") == [575]
    assert vectors.shape == (2, circle.shape[0])
    assert (vectors - circle).abs().max() > 1e-3  # trained away from "circle"
    assert record(out)["method"] == "textual_inversion"
    prompt = PROMPT.replace("heart", "<heart>")
    tuned = drawn(tmp_path, "tuned", prompt, "--embedding", out)
    assert changed(tuned, base["<heart>"]) > 1


def test_lora_writes_a_lora_in_both_formats(examples, base, tmp_path):
    files = {}
    for file_format in ("diffusers", "kohya"):
        files[file_format] = tmp_path / f"{file_format}.safetensors"
        finetune("lora", "--images", examples / "heart", "--out", files[file_format],
                 "--rank", 2, "--alpha", 4, "--lr", 3e-2, "--format", file_format,
                 *FEW)  # fmt: skip
        assert record(files[file_format])["format"] == file_format
    with safe_open(files["diffusers"], "pt") as file:
        assert all(key.startswith("unet.") for key in file.keys())
        assert "lora_adapter_metadata" in file.metadata()
    with safe_open(files["kohya"], "pt") as file:
        assert all(key.startswith("lora_unet_") for key in file.keys())
    tuned = {f: drawn(tmp_path, f, PROMPT, "--lora", path) for f, path in files.items()}
    assert changed(tuned["diffusers"], base["heart"]) > 1
    assert np.array_equal(tuned["kohya"], tuned["diffusers"])  # the same LoRA


@pytest.mark.parametrize("method", ["dreambooth", "full"])
def test_dreambooth_and_full_write_a_model_folder(examples, base, tmp_path, method):
    out = tmp_path / method
    extra = ["--class-prompt", "a large red circle at the top", "--class-images", 2]
    finetune(method, "--images", examples / "heart", "--out", out, "--lr", 1e-3,
             *FEW, *(extra if method == "dreambooth" else []))  # fmt: skip
    manifest = json.loads((out / "MANIFEST.json").read_text())
    assert manifest["steps"] == 6 and manifest["method"] == method
    assert 0 < manifest["quality"]["final_loss"] < 1
    assert "unet/model.safetensors" in manifest["sha256"]
    tuned = drawn(tmp_path, "tuned", PROMPT, "--model", out)  # verified, loaded
    assert changed(tuned, base["heart"]) > 1
