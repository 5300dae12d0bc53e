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


def usual_mode(path) -> bool:
    """Has the file the mode open() gives (0o666 less the umask), not 0o600?"""
    import os

    umask = os.umask(0)
    os.umask(umask)
    wanted = (0o777 if path.is_dir() else 0o666) & ~umask
    return path.stat().st_mode & 0o777 == wanted


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


def test_the_novel_words_are_pieces_no_training_caption_holds(bundled):
    """What `data examples --help` says: shapes-ldm's tokenizer cuts "heart" and
    "pink" into several tokens, none of which its training captions use."""
    from sdscratch.shapes.data import Shapes

    tokenizer, scenes = bundled.tokenizer, Shapes("train", captions="templates")
    used = {i for n in range(2000) for i in tokenizer.encode(scenes.scene(n)[0])}
    for word in ("heart", "pink"):
        ids = tokenizer.encode(word)
        assert len(ids) > 1 and used.isdisjoint(ids), word
    assert not used.isdisjoint(tokenizer.encode("a large red circle"))


def test_examples_of_a_colour(tmp_path):
    """--colour pink: any base shape, painted pink, the token in the colour's place."""
    from sdscratch.shapes.scenes import ALL_COLOURS, SHAPES

    out = tmp_path / "pink"
    code, _, err = run_cli("data", "examples", "--colour", "pink", "--count", 3,
                           "--word", "<pink>", "--out", out)  # fmt: skip
    assert code == 0, err
    assert usual_mode(out)
    for line in (out / "metadata.jsonl").read_text().splitlines():
        entry = json.loads(line)
        words = entry["text"].split()
        assert "<pink>" in words and "pink" not in words
        assert words[words.index("<pink>") + 1] in SHAPES
        pixels = np.asarray(Image.open(out / entry["file_name"])).reshape(-1, 3)
        assert (np.abs(pixels - ALL_COLOURS["pink"]).max(axis=1) <= 2).sum() > 10


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
    err = failure("examples", "--shape", "heart", "--count", 10**6, "--out",
                  tmp_path / "many", command="data")  # fmt: skip
    assert "at most 1000 images" in err and not (tmp_path / "many").exists()
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
    # A1111's layout: {"emb_params": (n, D)}, the token being the file's name
    a1111 = tmp_path / "a1111" / "heart.safetensors"
    a1111.parent.mkdir()
    err = finetune("textual_inversion", "--images", examples / "heart-ti", "--out",
                   a1111, "--token", "<heart>", "--vectors", 2, "--init-token",
                   "circle", "--lr", 0.05, "--format", "a1111", *FEW)  # fmt: skip
    assert "prompts with heart.safetensors write 'heart', not '<heart>'" in err
    with safe_open(a1111, "pt") as file:
        assert list(file.keys()) == ["emb_params"]
        assert file.get_tensor("emb_params").equal(vectors)  # the same run
    same = drawn(tmp_path, "a1111", PROMPT, "--embedding", a1111)
    assert np.array_equal(same, tuned)


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
    assert all(usual_mode(path) for path in files.values())
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
    assert usual_mode(out) and usual_mode(out / "unet" / "model.safetensors")
    tuned = drawn(tmp_path, "tuned", PROMPT, "--model", out)  # verified, loaded
    assert changed(tuned, base["heart"]) > 1


# ----------------------------------------------------------------------------------
# The examples folder: metadata.jsonl, or --prompt


def folder(root, names=("a.png", "b.png"), side=32, metadata=None):
    """A folder of solid square PNGs, with metadata.jsonl lines if given."""
    root.mkdir()
    for i, name in enumerate(names):
        Image.new("RGB", (side, side), (40 * i, 90, 200)).save(root / name)
    if metadata is not None:
        lines = [json.dumps(line) if isinstance(line, dict) else line
                 for line in metadata]  # fmt: skip
        (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root


def test_metadata_gives_each_image_its_caption_in_its_order(tmp_path):
    from sdscratch.cli_examples import read_examples

    lines = [
        {"file_name": "b.png", "text": "a small blue heart on the left "},
        "",  # blank lines are allowed
        {"file_name": "./a.png", "text": "a large red heart at the top", "x": 1},
    ]
    root = folder(tmp_path / "d", metadata=lines)
    assert read_examples(root) == [
        (root / "b.png", "a small blue heart on the left"),
        (root / "a.png", "a large red heart at the top"),
    ]
    assert read_examples(root, prompt="a sks heart") == [
        (root / "b.png", "a sks heart"),
        (root / "a.png", "a sks heart"),
    ]
    plain = folder(tmp_path / "plain", names=("z.png", "y.jpg"))
    assert read_examples(plain, prompt="p") == [(plain / "y.jpg", "p"),
                                                (plain / "z.png", "p")]  # fmt: skip


def test_metadata_in_a_subfolder(tmp_path):
    from sdscratch.cli_examples import read_examples

    root = folder(tmp_path / "d", names=())
    (root / "train").mkdir()
    Image.new("RGB", (32, 32)).save(root / "train" / "0.png")
    line = {"file_name": "train/0.png", "text": "a heart"}
    (root / "metadata.jsonl").write_text(json.dumps(line) + "\n")
    assert read_examples(root) == [(root / "train" / "0.png", "a heart")]


def bad_metadata(tmp_path, *lines) -> str:
    """The sentence `finetune lora` says of a folder with these metadata lines."""
    root = folder(tmp_path / "bad", metadata=list(lines))
    return failure("lora", "--images", root, "--out", tmp_path / "x.safetensors")


@pytest.mark.parametrize(
    "lines, message",
    [
        (["{not json"], "line 1 is not JSON"),
        (["[1, 2]"], "is not a JSON object"),
        ([{"file_name": "a.png"}, {"file_name": "b.png", "text": "x"}],
         'needs "file_name" and "text"'),
        ([{"file_name": "a.png", "text": "x"}, {"file_name": "c.png", "text": "y"}],
         "line 2: c.png is not in"),
        ([{"file_name": "a.png", "text": "x"}], "b.png has no line in"),
        ([{"file_name": "a.png", "text": "x"}, {"file_name": "a.png", "text": "y"}],
         "a.png has a line already"),
        ([{"file_name": "../a.png", "text": "x"}], "not a file name inside"),
        ([{"file_name": "metadata.jsonl", "text": "x"}], "is not an image"),
    ],
)  # fmt: skip
def test_bad_metadata_is_one_sentence(tmp_path, lines, message):
    assert message in bad_metadata(tmp_path, *lines)
    assert list(tmp_path.glob("x*")) == []


# ----------------------------------------------------------------------------------
# Bad input: one sentence, exit code 2, nothing written, nothing lost


def test_bad_folders(tmp_path):
    out = ["--out", tmp_path / "x.safetensors", "--prompt", "a heart"]
    assert "no such folder" in failure("lora", "--images", tmp_path / "none", *out)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "holds no images" in failure("lora", "--images", empty, *out)
    notes = folder(tmp_path / "notes")
    (notes / "notes.txt").write_text("my notes")
    err = failure("lora", "--images", notes, *out)
    assert "notes.txt is not an image" in err
    plain = folder(tmp_path / "plain")
    assert "give --prompt" in failure("lora", "--images", plain, *out[:2])
    assert list(tmp_path.glob("x*")) == []


def test_bad_images(tmp_path, tiny):
    common = ["--out", tmp_path / "x.safetensors", "--prompt", "a heart",
              "--model", tiny]  # fmt: skip
    damaged = folder(tmp_path / "damaged")
    (damaged / "b.png").write_text("not a picture")
    err = failure("lora", "--images", damaged, *common)
    assert "b.png: not an image PIL can read" in err
    wide = folder(tmp_path / "wide", names=())
    Image.new("RGB", (40, 30)).save(wide / "w.png")
    err = failure("lora", "--images", wide, *common)
    assert "is 40×30 pixels; fine-tuning takes square images" in err
    assert list(tmp_path.glob("x*")) == []


def test_images_of_another_size_are_resized_with_one_warning(tmp_path, tiny):
    """The tiny model draws 16×16; the examples are 32×32 and 24×24. Its text
    encoder reads 16 tokens: a long caption is cut, and said so once too."""
    long = "a large red heart at the top " * 3
    texts = ["a red heart", "a blue heart", long]
    lines = [{"file_name": f"{n}.png", "text": t} for n, t in zip("abc", texts)]
    root = folder(tmp_path / "d", names=("a.png", "b.png", "c.png"), metadata=lines)
    Image.new("RGB", (24, 24)).save(root / "c.png")
    out = tmp_path / "x.safetensors"
    err = finetune("lora", "--images", root, "--out", out, "--model", tiny,
                   "--steps", 5)  # fmt: skip
    warnings = [line for line in err.splitlines() if "warning" in line]
    assert len(warnings) == 2, err
    assert "resized 3 of the 3 images" in warnings[1] and "to 16×16" in warnings[1]
    assert "1 of the 3 captions are longer than the 14 tokens" in warnings[0]
    assert out.is_file()


BAD_OPTIONS = {
    "textual inversion without --token": (["textual_inversion"], "needs --token"),
    "dreambooth without --class-prompt": (["dreambooth"], "needs --class-prompt"),
    "rank 0": (["lora", "--rank", 0], "must be 1 or more"),
    "alpha 0": (["lora", "--alpha", 0], "must be more than 0"),
    "lr nan": (["lora", "--lr", "nan"], "must be more than 0"),
    "rank for textual inversion": (
        ["textual_inversion", "--token", "<t>", "--rank", 4],
        "--rank is for lora",
    ),
    "class prompt for lora": (
        ["lora", "--class-prompt", "a"],
        "--class-prompt is for dreambooth",
    ),
    "kohya embedding": (
        ["textual_inversion", "--token", "<t>", "--format", "kohya"],
        "not a format of textual_inversion",
    ),
    "format for a model": (["full", "--format", "diffusers"], "writes a model folder"),
    "unknown method": (["hypernetwork"], "invalid choice: 'hypernetwork'"),
}


@pytest.mark.parametrize("case", BAD_OPTIONS)
def test_bad_options(examples, tmp_path, case):
    arguments, message = BAD_OPTIONS[case]
    out = tmp_path / (
        "x" if arguments[0] in ("dreambooth", "full") else "x.safetensors"
    )
    err = failure(*arguments, "--images", examples / "heart", "--out", out)
    assert message in err
    assert list(tmp_path.iterdir()) == []


def test_bad_tokens(examples, tmp_path, tiny):
    common = ["--out", tmp_path / "x.safetensors", "--model", tiny]
    ti = ["textual_inversion", "--images", examples / "heart-ti", *common]
    assert "already has this word" in failure(*ti, "--token", "circle")
    assert "without spaces" in failure(*ti, "--token", "my heart")
    err = failure(*ti, "--token", "<pink>")
    assert "lacks the token <pink>" in err
    assert list(tmp_path.iterdir()) == []


def test_bad_models(examples, tmp_path):
    common = [
        "lora",
        "--images",
        examples / "heart",
        "--out",
        tmp_path / "x.safetensors",
    ]
    not_model = tmp_path / "folder"
    not_model.mkdir()
    assert "MANIFEST.json is missing" in failure(*common, "--model", not_model)
    assert "No checkpoint 'nowhere' is bundled" in failure(
        *common, "--model", "nowhere"
    )
    assert list(tmp_path.glob("x*")) == []


def test_an_output_that_exists_is_kept_unless_force(examples, tmp_path, tiny):
    common = ["--images", examples / "heart", "--model", tiny, "--steps", 1]
    out, record = tmp_path / "mine.safetensors", tmp_path / "mine.json"
    out.write_bytes(b"precious")
    err = failure("lora", *common, "--out", out)
    assert "mine.safetensors exists already; pass --force" in err
    assert out.read_bytes() == b"precious"
    out.unlink()
    record.write_text("my notes")
    assert "mine.json exists already" in failure("lora", *common, "--out", out)
    assert not out.exists() and record.read_text() == "my notes"
    finetune("lora", *common, "--out", out, "--force")
    assert json.loads(record.read_text())["method"] == "lora"
    assert sorted(p.name for p in tmp_path.iterdir()) == [record.name, out.name]
    model = tmp_path / "model"
    model.mkdir()
    (model / "notes.txt").write_text("precious")
    err = failure("full", *common, "--out", model)
    assert "holds files already; pass --force" in err
    assert [p.name for p in model.iterdir()] == ["notes.txt"]
    assert "ending in .safetensors" in failure("lora", *common, "--out", model)


def test_a_run_that_fails_leaves_nothing_behind(examples, tmp_path, tiny, monkeypatch):
    def full_disk(state, path, metadata=None):
        open(path, "wb").write(b"half a file")
        raise OSError("No space left on device")

    common = ["--images", examples / "heart", "--model", tiny, "--steps", 1]
    monkeypatch.setattr("sdscratch.lora_files.save_file", full_disk)
    monkeypatch.setattr("sdscratch.checkpoint.save_file", full_disk)
    (tmp_path / "x.safetensors").write_bytes(b"precious")
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "notes.txt").write_text("precious")
    for method, out in (("lora", "x.safetensors"), ("full", "model")):
        code, _, err = run_cli("finetune", method, *common, "--out", tmp_path / out,
                               "--force")  # fmt: skip
        assert code == 2 and "Traceback" not in err
        assert err.splitlines()[-1] == "sdscratch: error: No space left on device"
    assert (tmp_path / "x.safetensors").read_bytes() == b"precious"
    assert (tmp_path / "model" / "notes.txt").read_text() == "precious"
    # no temporary file or folder either
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "x.safetensors"]
    assert [p.name for p in (tmp_path / "model").iterdir()] == ["notes.txt"]
