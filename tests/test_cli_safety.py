"""No lost data: every way the command line could destroy or corrupt a file, a
bundled checkpoint or the user's work ends in one sentence and exit code 2."""

import hashlib
import json
import shutil
import struct
import zlib

import pytest
from PIL import Image
from test_cli import failure, generate, tiny_checkpoint

from conftest import run_cli


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """test_cli's tiny random text-to-image checkpoint: 16×16 images."""
    return tiny_checkpoint(tmp_path_factory.mktemp("tiny-ldm"))


# ----------------------------------------------------------------------------------
# train


def digests(root) -> dict:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def bundled(tmp_path, monkeypatch):
    """A copy of the bundled judge as the assets folder, and tmp_path as the
    current folder."""
    from sdscratch import assets_dir

    assets = tmp_path / "assets"
    judge = assets / "models" / "shapes-judge"
    shutil.copytree(assets_dir() / "models" / "shapes-judge", judge)
    monkeypatch.setenv("SDSCRATCH_ASSETS", str(assets))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sdscratch.recipes.judge.JUDGE_HELDOUT", 20)
    return judge


def test_train_without_out_leaves_the_bundled_checkpoint_alone(bundled, tmp_path):
    before = digests(bundled)
    code, out, err = run_cli("train", "judge", "--steps", 1)
    assert code == 0, err
    assert digests(bundled) == before
    made = tmp_path / "trained" / "shapes-judge"
    assert json.loads((made / "MANIFEST.json").read_text())["quality"]["steps"] == 1
    assert [p.name for p in made.parent.iterdir()] == ["shapes-judge"]  # no leftovers
    code, _, err = run_cli("train", "judge", "--steps", 1)  # again: refused
    assert code == 2 and err.count("\n") == 1
    assert "holds files already; pass --force" in err


def test_train_refuses_an_existing_folder_without_force(bundled, tmp_path):
    before = digests(bundled)
    code, _, err = run_cli("train", "judge", "--steps", 1, "--out", bundled)
    assert code == 2 and "pass --force" in err and err.count("\n") == 1
    assert digests(bundled) == before
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("precious")
    assert run_cli("train", "judge", "--steps", 1, "--out", mine)[0] == 2
    assert (mine / "notes.txt").read_text() == "precious"
    code, _, err = run_cli("train", "judge", "--steps", 1, "--out", mine, "--force")
    assert code == 0, err
    assert not (mine / "notes.txt").exists()  # replaced, not mixed
    assert sorted(p.name for p in mine.iterdir()) == ["MANIFEST.json", "judge"]


def test_train_that_fails_leaves_no_half_checkpoint(bundled, tmp_path, monkeypatch):
    import sdscratch.recipes

    def broken(out, seed, steps):
        (out / "half.bin").write_bytes(b"x")
        raise ValueError("The recipe broke.")

    monkeypatch.setitem(sdscratch.recipes.RECIPES, "broken", (broken, "broken"))
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "old.txt").write_text("kept")
    code, _, err = run_cli("train", "broken", "--out", mine, "--force")
    assert code == 2 and "The recipe broke." in err
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    assert (mine / "old.txt").read_text() == "kept"


# ----------------------------------------------------------------------------------
# generate's output


def test_generate_keeps_a_file_that_appears_while_it_runs(checkpoint, tmp_path,
                                                          monkeypatch):  # fmt: skip
    """Two runs with one output: the one that finishes second exits 2 and the
    first one's picture stays (here the second run starts inside the first)."""
    from sdscratch.pipeline import StableDiffusion

    out = tmp_path / "same.png"
    call = StableDiffusion.__call__
    inner = []

    def racing(self, *args, **kwargs):
        if not inner:  # the outer run: let another run write `out` meanwhile
            inner.append("running")
            inner[0] = generate("b", "--model", checkpoint, "--steps", 1,
                                "--seed", 9, "-o", out)  # fmt: skip
        return call(self, *args, **kwargs)

    monkeypatch.setattr(StableDiffusion, "__call__", racing)
    err = failure("a", "--model", checkpoint, "--steps", 1, "-o", out)
    assert inner[0][0] == 0
    assert "appeared while generating; pass --force" in err
    first = out.read_bytes()
    assert Image.open(out).size == (16, 16)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["same.png"]  # no temp file
    inner.append("no race")
    code, _, _ = generate("a", "--model", checkpoint, "--steps", 1, "-o", out,
                          "--force")  # fmt: skip
    assert code == 0 and out.read_bytes() != first  # --force: the later run wins


def test_generate_refuses_a_dangling_symlink(checkpoint, tmp_path):
    link = tmp_path / "link.png"
    link.symlink_to(tmp_path / "elsewhere" / "target.png")
    for force in ([], ["--force"]):
        err = failure("a", "--model", checkpoint, "--steps", 1, "-o", link, *force)
        assert "symlink to nothing" in err
    target = tmp_path / "target.png"
    link.unlink()
    link.symlink_to(target)  # could be created by the run: still refused
    assert "symlink to nothing" in failure("a", "--model", checkpoint, "-o", link)
    assert not target.exists()


@pytest.mark.parametrize("suffix", [".psd", ".pdf_", ""])
def test_generate_checks_the_format_before_generating(checkpoint, tmp_path, suffix,
                                                      monkeypatch):  # fmt: skip
    from sdscratch.pipeline import StableDiffusion

    def never(*args, **kwargs):
        raise AssertionError("generated an image it cannot write")

    monkeypatch.setattr(StableDiffusion, "from_pretrained", never)
    err = failure("a", "--model", checkpoint, "-o", tmp_path / f"x{suffix}")
    assert "PIL cannot write" in err and "ending in .png" in err


def test_other_formats_pil_writes_are_written(checkpoint, tmp_path):
    out = tmp_path / "x.jpg"
    assert generate("a", "--model", checkpoint, "--steps", 1, "-o", out)[0] == 0
    assert Image.open(out).format == "JPEG"


# ----------------------------------------------------------------------------------
# --init-image and --mask: the size is read from the header, before any decoding


def header_only_png(path, width, height):
    """A PNG whose header claims width × height but which holds 8×8 pixels: PIL
    reads the size without decoding, decoding it would fail."""
    Image.new("RGB", (8, 8)).save(path)
    data = bytearray(path.read_bytes())
    data[16:24] = struct.pack(">II", width, height)  # IHDR's width and height
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF)
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize("side", [100_000, 12_000, 129])
def test_generate_refuses_a_huge_image_before_decoding_it(checkpoint, tmp_path, side):
    huge = header_only_png(tmp_path / "huge.png", side, side)
    err = failure("a", "--model", checkpoint, "--init-image", huge)
    if side == 100_000:  # beyond what PIL opens at all
        assert "has more than" in err and "pixels" in err
    else:  # the tiny model draws 16×16: at most 8 × 16 = 128 pixels a side
        assert f"is {side}×{side} pixels" in err and "at most 128×128" in err
    image = tmp_path / "image.png"
    Image.new("RGB", (16, 16)).save(image)
    err = failure("a", "--model", checkpoint, "--init-image", image, "--mask", huge)
    assert "huge.png" in err and "Traceback" not in err


def test_generate_accepts_an_image_up_to_the_limit(checkpoint, tmp_path):
    image = tmp_path / "image.png"
    Image.new("RGB", (128, 64), (200, 30, 30)).save(image)
    out = tmp_path / "o.png"
    code, _, err = generate("a", "--model", checkpoint, "--steps", 2,
                            "--init-image", image, "-o", out)  # fmt: skip
    assert code == 0, err
    assert Image.open(out).size == (128, 64)


# ----------------------------------------------------------------------------------
# Guidance that overflows, and over-long prompts


def test_non_finite_latents_are_an_error_not_a_black_picture(checkpoint, tmp_path):
    out = tmp_path / "black.png"
    err = failure("a", "--model", checkpoint, "--steps", 3, "--guidance", 1e30,
                  "-o", out)  # fmt: skip
    assert "non-finite latents" in err
    assert not out.exists()


def test_an_over_long_prompt_warns_in_one_short_line(checkpoint, tmp_path):
    prompt = " ".join(["red"] * 500)
    code, _, err = generate(prompt, "--model", checkpoint, "--steps", 1,
                            "-o", tmp_path / "o.png")  # fmt: skip
    assert code == 0
    assert err.count("\n") == 1 and len(err) < 160, err
    assert "the last 486 of its 500 tokens" in err  # the tiny tokenizer keeps 14


# ----------------------------------------------------------------------------------
# Checkpoint metadata, checked before any tensor is allocated


def edited(checkpoint, tmp_path, file, edit, rehash=True):
    """A copy of the checkpoint with `edit(record)` applied to one json file and,
    if `rehash`, the manifest rewritten so that the sha256 still match."""
    from sdscratch.checkpoint import write_manifest

    root = tmp_path / "edited"
    shutil.copytree(checkpoint, root)
    path = root / file
    record = json.loads(path.read_text())
    edit(record)
    path.write_text(json.dumps(record))
    if rehash:
        write_manifest(root, "python -m sdscratch train ldm", 0, 0.0, {})
    return root


def drop(key):
    return lambda record: record.pop(key)


def put(key, value, section=None):
    def edit(record):
        (record[section] if section else record)[key] = value

    return edit


MANIFEST_CASES = {
    "no sha256": (drop("sha256"), "lists no files with their sha256"),
    "sha256 a list": (put("sha256", []), "lists no files with their sha256"),
    "sha256 empty": (put("sha256", {}), "lists no files with their sha256"),
    "no command": (drop("command"), "has no \"command\""),
    "a key outside": (lambda r: r["sha256"].update({"../x": "0" * 64}),
                      '"../x", which is not a file inside the folder'),
    "an absolute key": (lambda r: r["sha256"].update({"/etc/hostname": "0" * 64}),
                        "which is not a file inside the folder"),
    "a digest not hex": (lambda r: r["sha256"].update({"unet/config.json": 5}),
                         "is not 64 hex digits"),
    "a file left out": (lambda r: r["sha256"].pop("unet/model.safetensors"),
                        "model.safetensors is not listed in MANIFEST.json"),
}  # fmt: skip


@pytest.mark.parametrize("case", MANIFEST_CASES)
def test_a_malformed_manifest_is_one_sentence(checkpoint, tmp_path, case):
    edit, message = MANIFEST_CASES[case]
    root = edited(checkpoint, tmp_path, "MANIFEST.json", edit, rehash=False)
    assert message in failure("a", "--model", root, "-o", tmp_path / "o.png")


CONFIG_CASES = {
    "channels as strings": ("unet", put("block_out_channels", ["8", "16"], "config"),
                            "block_out_channels = [\"8\", \"16\"] is not a valid"),
    "negative channels": ("unet", put("block_out_channels", [-8, 16], "config"),
                          "is not a valid"),
    "640 GB of channels": ("unet",
                           put("block_out_channels", [131072, 131072], "config"),
                           "parameters, more than the 4,000,000,000"),
    "a width as a string": ("text_encoder", put("hidden_size", "16", "config"),
                            "hidden_size = \"16\" is not a valid int"),
    "a bool as a number": ("unet", put("mid_attention", 1, "config"),
                           "mid_attention = 1 is not a valid bool"),
    "a float that is not finite": ("vae", put("scaling_factor", 1e999, "config"),
                                   "scaling_factor = Infinity is not a valid float"),
    "layers the model rejects": ("unet", put("attention_levels", [True], "config"),
                                 "describes no valid UNet"),
    "config not a table": ("vae", put("config", [1, 2]),
                           "is not a valid sdscratch config file"),
}  # fmt: skip


@pytest.mark.parametrize("case", CONFIG_CASES)
def test_a_malformed_config_is_one_sentence(checkpoint, tmp_path, case):
    part, edit, message = CONFIG_CASES[case]
    root = edited(checkpoint, tmp_path, f"{part}/config.json", edit)
    assert message in failure("a", "--model", root, "-o", tmp_path / "o.png")


SCHEDULER_CASES = {
    "no beta_start": (drop("beta_start"), "beta_start must be a number between"),
    "beta_end a string": (put("beta_end", "0.012"), "beta_end must be a number"),
    "no timesteps": (drop("num_train_timesteps"), "num_train_timesteps must be"),
    "an unknown schedule": (put("beta_schedule", "sqrt"), "beta_schedule must be"),
    "betas in the wrong order": (put("beta_start", 0.5), "larger than beta_end"),
}


@pytest.mark.parametrize("case", SCHEDULER_CASES)
def test_a_malformed_scheduler_config_is_one_sentence(checkpoint, tmp_path, case):
    edit, message = SCHEDULER_CASES[case]
    root = edited(checkpoint, tmp_path, "scheduler/scheduler_config.json", edit)
    assert message in failure("a", "--model", root, "-o", tmp_path / "o.png")
