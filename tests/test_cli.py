import subprocess
import sys

import pytest
import torch
from PIL import Image

from conftest import run_cli


def run(*args):
    return subprocess.run(
        [sys.executable, "-m", "sdscratch", *args], capture_output=True, text=True
    )


def test_unknown_recipe_is_one_line_and_exit_code_2():
    result = run("train", "no-such-recipe")
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1
    assert "Unknown recipe 'no-such-recipe'" in result.stderr
    assert "Traceback" not in result.stderr


def test_bad_number_is_one_line_and_exit_code_2():
    result = run("train", "vae", "--steps", "0")
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1
    assert "must be 1 or more" in result.stderr


def test_missing_command_is_one_line():
    result = run()
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1


@pytest.mark.parametrize("command", ["generate", "evaluate"])
def test_sampler_choices_are_the_registry(command):
    """Every sampler of `sdscratch.samplers.SAMPLERS`, and only those, is accepted."""
    from sdscratch.__main__ import build_parser
    from sdscratch.samplers import SAMPLERS

    parser = build_parser()
    prompt = ["a red circle"] if command == "generate" else []
    for name in SAMPLERS:
        args = parser.parse_args([command, *prompt, "--sampler", name])
        assert args.sampler == name
    with pytest.raises(SystemExit):
        parser.parse_args([command, *prompt, "--sampler", "plms"])


# ----------------------------------------------------------------------------------
# generate, with a tiny random checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny random text-to-image checkpoint: 16×16 images, 4×4 latents."""
    return tiny_checkpoint(tmp_path_factory.mktemp("tiny-ldm"))


def tiny_checkpoint(root):
    """Write a tiny random text-to-image checkpoint into `root`; return it."""
    from sdscratch.checkpoint import write_manifest
    from sdscratch.clip import TextEncoder, TextEncoderConfig
    from sdscratch.pipeline import StableDiffusion
    from sdscratch.shapes.data import Shapes
    from sdscratch.tokenizer import train_bpe
    from sdscratch.unet import UNet, UNetConfig
    from sdscratch.vae import VAE, VAEConfig

    captions = [Shapes().scene(i)[0] for i in range(200)]
    tokenizer = train_bpe(captions, vocab_size=600, context_length=16)
    torch.manual_seed(0)
    text_encoder = TextEncoder(
        TextEncoderConfig(
            len(tokenizer), 16, 16, 32, 1, 2, "quick_gelu", 1e-5, tokenizer.eos_id
        )
    )
    vae = VAE(VAEConfig(block_out_channels=(8, 8, 8), norm_num_groups=4))
    unet = UNet(
        UNetConfig(
            sample_size=4, block_out_channels=(8, 16), layers_per_block=1,
            attention_levels=(False, True), cross_attention_dim=16, num_heads=2,
            norm_num_groups=4,
        )
    )  # fmt: skip
    StableDiffusion(unet, vae, text_encoder, tokenizer).save_pretrained(root)
    write_manifest(root, "python -m sdscratch train ldm", 0, 0.0, {})
    return root


def generate(*args):
    """Run `sdscratch generate ARGS` in this process: (exit code, stdout, stderr)."""
    return run_cli("generate", *args)


def failure(*args) -> str:
    """Run generate, check that it failed cleanly, return its one line."""
    code, out, err = generate(*args)
    assert code == 2, (code, out, err)
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_generate_writes_a_png_and_prints_its_path(checkpoint, tmp_path):
    out = tmp_path / "out.png"
    code, printed, _ = generate("a small red circle on the left", "--model", checkpoint,
                                "--seed", 1024, "--steps", 3, "-o", out)  # fmt: skip
    assert code == 0 and printed.strip() == str(out)
    assert Image.open(out).size == (16, 16)


def test_generate_n_images_makes_a_grid_and_a_seed_repeats(checkpoint, tmp_path):
    out = tmp_path / "grid.png"
    args = ["a big blue star", "--model", checkpoint, "--steps", 2, "-n", 4, "-o", out]
    assert generate(*args)[0] == 0
    assert Image.open(out).size == (2 * 16 + 2, 2 * 16 + 2)  # 2×2, 2 pixels apart
    first = out.read_bytes()
    assert generate(*args, "--force")[0] == 0
    assert out.read_bytes() == first
    assert generate(*args, "--force", "--seed", 5)[0] == 0
    assert out.read_bytes() != first


def test_generate_guidance_rescale_changes_the_image(checkpoint, tmp_path):
    args = ["a big blue star", "--model", checkpoint, "--steps", 3, "--guidance", 12]
    plain, rescaled = tmp_path / "plain.png", tmp_path / "rescaled.png"
    assert generate(*args, "-o", plain)[0] == 0
    assert generate(*args, "--guidance-rescale", 0.7, "-o", rescaled)[0] == 0
    assert plain.read_bytes() != rescaled.read_bytes()


def test_generate_never_overwrites_without_force(checkpoint, tmp_path):
    out = tmp_path / "kept.png"
    out.write_bytes(b"precious")
    err = failure("x", "--model", checkpoint, "-o", out)
    assert "exists already; pass --force" in err
    assert out.read_bytes() == b"precious"


def test_generate_img2img_and_inpainting(checkpoint, tmp_path):
    init, mask = tmp_path / "init.png", tmp_path / "mask.png"
    Image.new("RGB", (16, 16), (200, 30, 30)).save(init)
    Image.new("L", (16, 16), 255).save(mask)
    common = ["a small red circle on the left", "--model", checkpoint, "--steps", 4]
    code, _, _ = generate(*common, "--init-image", init, "--strength", 0.5,
                          "-o", tmp_path / "a.png")  # fmt: skip
    assert code == 0
    code, _, _ = generate(*common, "--init-image", init, "--mask", mask,
                          "-o", tmp_path / "b.png")  # fmt: skip
    assert code == 0


BAD_ARGUMENTS = {
    "steps 0": (["--steps", 0], "must be 1 or more"),
    "steps not a number": (["--steps", "many"], "invalid positive_int value"),
    "guidance < 0": (["--guidance", -1], "must be 0 or more"),
    "guidance nan": (["--guidance", "nan"], "must be 0 or more"),
    "guidance rescale > 1": (["--guidance-rescale", 1.5], "must be between 0 and 1"),
    "guidance rescale nan": (["--guidance-rescale", "nan"], "between 0 and 1"),
    "strength > 1": (["--strength", 2], "between 0 and 1"),
    "seed < 0": (["--seed", -1], "between 0 and 2**64 - 1"),
    "n 0": (["-n", 0], "must be 1 or more"),
    "unknown sampler": (["--sampler", "plms"], "invalid choice: 'plms'"),
    "karras with ddim": (["--karras"], "Karras sigmas need"),
}


@pytest.mark.parametrize("case", BAD_ARGUMENTS)
def test_generate_bad_numbers_are_one_line(checkpoint, tmp_path, case):
    extra, message = BAD_ARGUMENTS[case]
    out = tmp_path / "never.png"
    assert message in failure("a", "--model", checkpoint, "-o", out, *extra)
    assert not out.exists()


def test_generate_missing_or_damaged_checkpoint(checkpoint, tmp_path):
    assert "No checkpoint" in failure("a", "--model", tmp_path / "nowhere")
    import shutil

    damaged = tmp_path / "damaged"
    shutil.copytree(checkpoint, damaged)
    (damaged / "vae" / "model.safetensors").write_bytes(b"not weights")
    err = failure("a", "--model", damaged, "-o", tmp_path / "x.png")
    assert "does not match its sha256" in err
    (damaged / "MANIFEST.json").unlink()
    assert "MANIFEST.json is missing" in failure("a", "--model", damaged)


def test_generate_output_that_cannot_be_written(checkpoint, tmp_path):
    missing = tmp_path / "no" / "such" / "out.png"
    assert "does not exist" in failure("a", "--model", checkpoint, "-o", missing)
    assert "it is a folder" in failure("a", "--model", checkpoint, "-o", tmp_path)
    assert "ending in .png" in failure("a", "--model", checkpoint,
                                       "-o", tmp_path / "out.txt")  # fmt: skip


def test_generate_bad_images(checkpoint, tmp_path):
    common = ["a", "--model", checkpoint, "-o", tmp_path / "out.png"]
    not_image = tmp_path / "notes.png"
    not_image.write_text("hello")
    image, small = tmp_path / "image.png", tmp_path / "small.png"
    Image.new("RGB", (16, 16)).save(image)
    Image.new("L", (8, 8)).save(small)
    assert "--mask needs --init-image" in failure(*common, "--mask", small)
    assert "--strength needs --init-image" in failure(*common, "--strength", 0.3)
    assert "No such file" in failure(*common, "--init-image", tmp_path / "gone.png")
    assert "not an image" in failure(*common, "--init-image", not_image)
    err = failure(*common, "--init-image", image, "--mask", small)
    assert "must be the same size" in err


def test_generate_as_a_process_prints_no_traceback(checkpoint, tmp_path):
    out = tmp_path / "p.png"
    result = run("generate", "a small red circle", "--model", str(checkpoint),
                 "--steps", "2", "-o", str(out))  # fmt: skip
    assert result.returncode == 0 and result.stdout.strip() == str(out)
    again = run("generate", "a small red circle", "--model", str(checkpoint),
                "-o", str(out))  # fmt: skip
    assert again.returncode == 2 and again.stderr.count("\n") == 1
    assert "Traceback" not in again.stderr
