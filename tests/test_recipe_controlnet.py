"""The controlnet recipe: its ControlNet starts as the base's UNet, zero connections
leave the base as it was, a short run writes a folder `generate --controlnet` loads,
and bad options are one sentence."""

import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import run_cli
from sdscratch.checkpoint import (
    load_component,
    read_manifest,
    resolve,
    save_component,
    verify,
    write_manifest,
)
from sdscratch.controlnet import ControlNet, ControlNetConfig, steered_unet
from sdscratch.pipeline import StableDiffusion
from sdscratch.recipes import controlnet as recipe
from sdscratch.shapes.controls import draw_controls
from sdscratch.shapes.data import Shapes
from sdscratch.unet import UNet, UNetConfig


@pytest.fixture(scope="module")
def base():
    return StableDiffusion.from_pretrained("shapes-ldm")


def noisy_inputs(pipe, batch=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((batch, *pipe.latent_shape), generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    _, captions, attrs = Shapes("test", length=batch).batch(range(batch))
    context = pipe.text_encoder(pipe.tokenizer(captions))
    side = pipe.latent_shape[-1] * pipe.vae_scale_factor
    return x, t, context, draw_controls(attrs, "outline", side)


@torch.no_grad()
def test_zero_connections_leave_the_base_as_it_was_random_ones_do_not(base):
    x, t, context, control = noisy_inputs(base)
    plain = base.unet(x, t, context)
    zero = recipe.make_controlnet(base.unet, base.vae_scale_factor, "zero")
    assert torch.equal(steered_unet(base.unet, zero, control)(x, t, context), plain)
    random = recipe.make_controlnet(base.unet, base.vae_scale_factor, "random")
    steered = steered_unet(base.unet, random, control)(x, t, context)
    assert (steered - plain).abs().mean() > 0.1 * plain.abs().mean()
    # both copy the base's encoder; only the connections differ
    for name, value in zero.state_dict().items():
        if name.startswith(("down_blocks", "mid_block", "conv_in")):
            assert torch.equal(value, random.state_dict()[name])


@pytest.mark.parametrize("factor", [4, 8])
def test_hint_encoder_halves_once_per_factor_of_two_of_the_vae(factor):
    unet = UNet(UNetConfig(block_out_channels=(16, 32), attention_levels=(False, True),
                           layers_per_block=1, cross_attention_dim=8,
                           norm_num_groups=8))  # fmt: skip
    controlnet = recipe.make_controlnet(unet, factor)
    x, context = torch.randn(2, 4, 6, 6), torch.randn(2, 5, 8)
    control = torch.rand(2, 3, 6 * factor, 6 * factor)
    down, mid = controlnet(x, 10, context, control)
    assert controlnet.downsampling_factor == factor
    assert [r.shape[-1] for r in down] == [6, 6, 3, 3] and mid.shape[-1] == 3
    with pytest.raises(ValueError, match="No hint encoder for a VAE factor of 6"):
        recipe.make_controlnet(unet, 6)


def test_short_run_writes_a_controlnet_generate_loads(base, tmp_path, monkeypatch):
    monkeypatch.setattr(recipe, "CONTROLNET_SCENES", 64)
    out = tmp_path / "mask-net"
    code, printed, err = run_cli("train", "controlnet", "--steps", "2", "--control",
                                 "mask", "--out", out)  # fmt: skip
    assert (code, err.count("error")) == (0, 0), err
    manifest = read_manifest(out)
    assert manifest["command"].endswith(f"--out {out} --control mask")
    quality = manifest["quality"]
    assert (quality["control"], quality["connections"]) == ("mask", "zero")
    assert quality["steps"] == 2 and quality["eval_images"] == 20
    base_digests = read_manifest(resolve("shapes-ldm"))["sha256"]
    assert quality["base_unet_sha256"] == base_digests["unet/model.safetensors"]
    verify(out)
    controlnet = load_component(out, ControlNet, ControlNetConfig)
    assert controlnet.downsampling_factor == base.vae_scale_factor
    trained = controlnet.state_dict()["mid_zero_conv.weight"]
    assert trained.abs().max() > 0  # two steps moved the zero convolutions
    scene = Shapes("test", length=1)[0][2]
    control = draw_controls([scene], "mask")[0].permute(1, 2, 0).numpy()
    Image.fromarray((control * 255).round().astype(np.uint8)).save(tmp_path / "c.png")
    picture, steering = tmp_path / "out.png", ("--control", tmp_path / "c.png")
    code, _, err = run_cli("generate", "a red circle", "--steps", "2", *steering,
                           "--controlnet", out, "-o", picture)  # fmt: skip
    assert (code, err) == (0, "") and Image.open(picture).size == (32, 32)


@pytest.mark.parametrize(
    "arguments, message",
    [
        (("controlnet", "--control", "canny"), "invalid choice: 'canny'"),
        (("controlnet", "--connections", "gaussian"), "invalid choice: 'gaussian'"),
        (("controlnet", "--base", "./no-such-model"), "no such file or folder"),
        (("vae", "--base", "shapes-ldm"), "The vae recipe takes no --base."),
    ],
)
def test_bad_options_are_one_sentence_exit_2(tmp_path, arguments, message):
    code, _, err = run_cli("train", *arguments, "--steps", "1", "--out", tmp_path / "x")
    assert code == 2 and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "x").exists()


# ----------------------------------------------------------------------------------
# The bundled ControlNet


@pytest.fixture(scope="module")
def bundled_controlnet():
    folder = resolve("shapes-controlnet")
    verify(folder)
    return load_component(folder, ControlNet, ControlNetConfig), read_manifest(folder)


def test_bundled_controlnet_draws_where_the_control_says(base, bundled_controlnet):
    """With the empty prompt the base draws objects anywhere; steered by outlines,
    it draws them where the outlines are."""
    controlnet, manifest = bundled_controlnet
    assert manifest["quality"]["base"] == "shapes-ldm"
    attrs = [Shapes("test").scene(i)[1] for i in range(8)]
    control = manifest["quality"]["control"]
    empty = [""] * len(attrs)
    steered = recipe.generate_steered(base, controlnet, empty, attrs, control, 0)
    free = recipe.generate_steered(base, controlnet, empty, attrs, control, 0, 0.0)
    masks = draw_controls(attrs, "mask")[:, 0]
    iou = recipe.control_iou(steered, masks).mean()
    assert iou > 0.6 and iou > 2 * recipe.control_iou(free, masks).mean()


def test_cli_bundled_controlnet_resizes_another_size_once(tmp_path):
    scene = Shapes("test", length=1)[0][2]
    control = draw_controls([scene], "outline", 48)[0].permute(1, 2, 0).numpy()
    Image.fromarray((control * 255).round().astype(np.uint8)).save(tmp_path / "c.png")
    out = tmp_path / "out.png"
    code, _, err = run_cli("generate", "a red circle", "--steps", "2", "--control",
                           tmp_path / "c.png", "--controlnet", "shapes-controlnet",
                           "-o", out)  # fmt: skip
    assert code == 0 and Image.open(out).size == (32, 32)
    assert err == (
        "sdscratch: warning: The control image is 48×48 pixels; resized to 32×32, "
        "the size of the images being made.\n"
    )


def test_cli_refuses_the_bundled_controlnet_for_another_unet(tmp_path):
    """A copy of shapes-ldm takes the bundled ControlNet; the same copy with other
    UNet weights (the same widths, so `check_fits` lets it through) is refused in
    one sentence, exit 2, by the base's UNet digest its manifest records."""
    scene = Shapes("test", length=1)[0][2]
    control = draw_controls([scene], "outline")[0].permute(1, 2, 0).numpy()
    Image.fromarray((control * 255).round().astype(np.uint8)).save(tmp_path / "c.png")
    same, other = tmp_path / "same-ldm", tmp_path / "other-ldm"
    for folder in (same, other):
        shutil.copytree(resolve("shapes-ldm"), folder)
    unet = load_component(other / "unet", UNet, UNetConfig)
    with torch.no_grad():
        unet.conv_out.bias.add_(0.01)
    save_component(unet, other / "unet", unet.config)
    write_manifest(other, "a copy of shapes-ldm, its UNet moved", 0, 0.0, {})
    steering = ("--control", tmp_path / "c.png", "--controlnet", "shapes-controlnet")
    results = {}
    for folder in (same, other):
        out = tmp_path / f"{folder.name}.png"
        results[folder] = run_cli("generate", "a red circle", "--steps", "1",
                                  "--model", folder, *steering, "-o", out)  # fmt: skip
    assert results[same][0] == 0 and (tmp_path / "same-ldm.png").is_file()
    code, _, err = results[other]
    assert code == 2 and err.count("\n") == 1, err
    assert "was trained for the UNet of shapes-ldm" in err and "other-ldm" in err
    assert not (tmp_path / "other-ldm.png").exists()
