"""ControlNet: equal to diffusers' ControlNetModel (ported weights, from_unet), the
UNet it steers equal to diffusers' UNet given the same residuals, and the pipeline
equal to diffusers' StableDiffusionControlNetPipeline."""

import copy
import dataclasses
import math
import random
import warnings

import numpy as np
import pytest
import torch
from diffusers import ControlNetModel, UNet2DConditionModel
from PIL import Image, ImageDraw

from sdscratch.controlnet import ControlNet, steered_unet
from sdscratch.pipeline import StableDiffusion
from sdscratch.port import (
    controlnet_config_from_diffusers,
    controlnet_from_diffusers,
    controlnet_state_dict_from_diffusers,
    controlnet_to_diffusers,
    unet_from_diffusers,
)

TOLERANCE = 1e-5


def random_config(seed) -> dict:
    """A diffusers UNet2DConditionModel config our UNet supports, drawn at random:
    1-3 levels, widths, layers, attention levels, heads, groups, projection, and a
    hint encoder (widths, halvings, channels) for the ControlNet."""
    rng = random.Random(seed)
    levels, groups, heads = rng.randint(1, 3), rng.choice([2, 4]), rng.choice([1, 2])
    base = math.lcm(groups, heads)
    widths = [base * rng.randint(1, 4) for _ in range(levels)]
    attention = [rng.random() < 0.6 for _ in range(levels)]
    mid_attention = rng.random() < 0.7
    down = ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention]
    up = ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)]
    unet = dict(
        sample_size=8, in_channels=rng.choice([3, 4]), out_channels=4,
        block_out_channels=tuple(widths), layers_per_block=rng.randint(1, 2),
        down_block_types=tuple(down), up_block_types=tuple(up),
        mid_block_type="UNetMidBlock2DCrossAttn" if mid_attention
        else "UNetMidBlock2D",
        cross_attention_dim=rng.choice([6, 10]), attention_head_dim=heads,
        norm_num_groups=groups, use_linear_projection=rng.random() < 0.5,
    )  # fmt: skip
    halvings = rng.randint(1, 3)
    hint = dict(
        conditioning_embedding_out_channels=tuple(
            rng.randint(2, 6) for _ in range(halvings + 1)
        ),
        conditioning_channels=rng.choice([1, 3]),
    )
    return unet, hint


def perturb(model, seed, scale=0.1):
    """Add noise to every parameter (the zero convolutions too), so every weight
    matters and no residual is zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return model.eval()


def reference_pair(seed):
    """(diffusers UNet, diffusers ControlNet made from it, hint settings)."""
    unet_config, hint = random_config(seed)
    torch.manual_seed(seed)
    unet = perturb(UNet2DConditionModel(**unet_config), seed + 1)
    controlnet = ControlNetModel.from_unet(unet, **hint)
    return unet, perturb(controlnet, seed + 2), hint


def inputs(controlnet, batch=2, side=None, seed=0):
    """x (B, C, h, w), t (B,), context (B, 5, D), control (B, c, f·h, f·w)."""
    c = controlnet.config
    f = 2 ** (len(c.conditioning_embedding_out_channels) - 1)
    side = side or 5 + seed % 3  # odd sides too: 5 -> 3 -> 2
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, c.in_channels, side, side, generator=g)
    t = torch.tensor([17, 803, 401][:batch])
    context = torch.randn(batch, 5, c.cross_attention_dim, generator=g)
    control = torch.rand(batch, c.conditioning_channels, f * side, f * side,
                         generator=g)  # fmt: skip
    return x, t, context, control


def max_error(ours, theirs) -> float:
    down, mid = ours
    assert len(down) == len(theirs[0])
    errors = [(a - b).abs().max() for a, b in zip(down, theirs[0])]
    assert all(a.shape == b.shape for a, b in zip(down, theirs[0]))
    return max([*errors, (mid - theirs[1]).abs().max()]).item()


def our_context(ours, context):
    """Our ControlNet takes no context when its UNet has no attention at all."""
    return None if ours.config.cross_attention_dim is None else context


SEEDS = range(8)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("guess_mode", [False, True])
def test_port_equals_diffusers_on_random_configs(seed, guess_mode):
    _, reference, _ = reference_pair(seed)
    ours = controlnet_from_diffusers(reference)
    x, t, context, control = inputs(reference, seed=seed)
    with torch.no_grad():
        theirs = reference(x, t, context, control, conditioning_scale=0.7,
                           guess_mode=guess_mode, return_dict=False)  # fmt: skip
        mine = ours(x, t, our_context(ours, context), control, 0.7, guess_mode)
    assert max_error(mine, theirs) <= TOLERANCE
    assert max(r.abs().max() for r in mine[0]) > 1e-2  # not trivially zero


@pytest.mark.parametrize("seed", SEEDS)
def test_steered_unet_equals_diffusers_unet_with_the_residuals(seed):
    reference_unet, reference, _ = reference_pair(seed)
    unet = unet_from_diffusers(reference_unet)
    controlnet = controlnet_from_diffusers(reference)
    x, t, context, control = inputs(reference, seed=seed)
    with torch.no_grad():
        down, mid = reference(x, t, context, control, return_dict=False)
        theirs = reference_unet(x, t, context, down_block_additional_residuals=down,
                                mid_block_additional_residual=mid).sample  # fmt: skip
        plain = reference_unet(x, t, context).sample
        mine = steered_unet(unet, controlnet, control)(x, t, our_context(unet, context))
    assert (mine - theirs).abs().max() <= TOLERANCE
    assert (theirs - plain).abs().max() > 1e-2  # the residuals change the output


@pytest.mark.parametrize("seed", SEEDS)
def test_from_unet_equals_diffusers_from_unet(seed):
    reference_unet, _, hint = reference_pair(seed)
    unet = unet_from_diffusers(reference_unet)
    torch.manual_seed(100 + seed)
    theirs = ControlNetModel.from_unet(reference_unet, **hint)
    torch.manual_seed(100 + seed)
    ours = ControlNet.from_unet(unet, **hint)
    expected = controlnet_state_dict_from_diffusers(theirs.state_dict())
    state = ours.state_dict()
    assert state.keys() == expected.keys()
    assert all(torch.equal(state[key], expected[key]) for key in expected)
    ported = controlnet_config_from_diffusers(theirs.config)
    unused = dict(sample_size=ours.config.sample_size, out_channels=4)  # unknown there
    assert ours.config == dataclasses.replace(ported, **unused)
    # the zero convolutions are zero: the steered UNet is the UNet itself ...
    x, t, context, control = inputs(theirs, seed=seed)
    context = our_context(unet, context)
    with torch.no_grad():
        plain = unet(x, t, context)
        assert torch.equal(steered_unet(unet, ours, control)(x, t, context), plain)
        # ... and the copy is a copy
        ours.conv_in.weight.add_(1)
    assert not torch.equal(ours.conv_in.weight, unet.conv_in.weight)


def test_port_can_fail():
    """One wrong weight gives a large error: the comparison would catch a bad port."""
    _, reference, _ = reference_pair(0)
    ours = controlnet_from_diffusers(reference)
    x, t, context, control = inputs(reference)
    with torch.no_grad():
        ours.zero_convs[-1].weight.mul_(2)
        theirs = reference(x, t, context, control, return_dict=False)
        error = max_error(ours(x, t, our_context(ours, context), control), theirs)
    assert error > 1e-3


def test_sd15_controlnet_config_and_back_to_diffusers():
    """SD v1.5's ControlNets (lllyasviel/sd-controlnet-*): the default config."""
    with torch.device("meta"):
        reference = ControlNetModel(cross_attention_dim=768)
    config = controlnet_config_from_diffusers(reference.config)
    with torch.device("meta"):
        ours = ControlNet(config)
    count = sum(p.numel() for p in ours.parameters())
    assert count == sum(p.numel() for p in reference.parameters()) == 361_279_120
    assert config.conditioning_embedding_out_channels == (16, 32, 96, 256)


@pytest.mark.parametrize("seed", [1, 2])
def test_to_diffusers_round_trip(seed):
    _, reference, _ = reference_pair(seed)
    ours = controlnet_from_diffusers(reference)
    back = controlnet_to_diffusers(ours)
    assert back.state_dict().keys() == reference.state_dict().keys()
    x, t, context, control = inputs(reference, seed=seed)
    with torch.no_grad():
        expected = reference(x, t, context, control, return_dict=False)
        assert max_error(back(x, t, context, control, return_dict=False),
                         expected) == 0  # fmt: skip


def test_port_refuses_what_it_does_not_build():
    with torch.device("meta"):
        bgr = ControlNetModel(controlnet_conditioning_channel_order="bgr")
    with pytest.raises(ValueError, match="controlnet_conditioning_channel_order"):
        controlnet_config_from_diffusers(bgr.config)


# ----------------------------------------------------------------------------------
# The pipeline, against diffusers' StableDiffusionControlNetPipeline

PROMPTS = ["a small red circle on the left", "a big blue star above a green cross"]
HINT = (8, 16, 32)  # two halvings: the bundled VAE's ×4


def outline(side=32, box=(6, 4, 24, 20)) -> Image.Image:
    """A white rectangle outline on black: an edge map."""
    picture = Image.new("RGB", (side, side))
    ImageDraw.Draw(picture).rectangle(box, outline="white", width=2)
    return picture


@pytest.fixture(scope="module")
def pipes():
    """(ours, diffusers' ControlNet pipeline, our ControlNet): the bundled model and
    a ControlNet made from its UNet with random weights, in both libraries."""
    from diffusers import StableDiffusionControlNetPipeline

    pipe = StableDiffusion.from_pretrained("shapes-ldm")
    exported = pipe.to_diffusers()
    torch.manual_seed(0)
    controlnet = ControlNetModel.from_unet(
        exported.unet, conditioning_embedding_out_channels=HINT
    )
    controlnet = perturb(controlnet, 4, scale=0.03)
    reference = StableDiffusionControlNetPipeline(
        **exported.components, controlnet=controlnet, requires_safety_checker=False
    )
    reference.set_progress_bar_config(disable=True)
    return pipe, reference, controlnet_from_diffusers(controlnet)


def generate(pipe, reference, controlnet, image, **options):
    """The same images from both pipelines: ours, theirs, in [0, 1]."""
    options = dict(num_inference_steps=4, output_type="pt") | options
    prompts = options.pop("prompts", PROMPTS)
    ours = pipe(prompts, image=image, controlnet=controlnet,
                generator=torch.Generator().manual_seed(5), **options)  # fmt: skip
    theirs = reference(prompts, image=image, generator=torch.Generator().manual_seed(5),
                       **options).images  # fmt: skip
    return (ours / 2 + 0.5).clamp(0, 1), theirs


CASES = {
    "guidance": dict(),
    "guess mode": dict(guess_mode=True, controlnet_conditioning_scale=0.8),
    "no guidance, half scale": dict(guidance_scale=1.0,
                                    controlnet_conditioning_scale=0.5),
    "two per prompt": dict(num_images_per_prompt=2, guidance_scale=5.0),
    "guidance window": dict(control_guidance_start=0.25, control_guidance_end=0.75),
    "late start, guess mode": dict(control_guidance_start=0.5, guess_mode=True),
    "early end, no guidance": dict(control_guidance_end=0.5, guidance_scale=1.0),
}  # fmt: skip


@pytest.mark.parametrize("case", CASES)
def test_pipeline_equals_diffusers_controlnet_pipeline(pipes, case):
    pipe, reference, controlnet = pipes
    ours, theirs = generate(*pipes, outline(), **CASES[case])
    assert ours.shape == theirs.shape == (len(theirs), 3, 32, 32)
    assert (ours - theirs).abs().max() <= 1e-4
    plain = pipe(PROMPTS, generator=torch.Generator().manual_seed(5),
                 num_inference_steps=4, output_type="pt")  # fmt: skip
    assert ((plain / 2 + 0.5).clamp(0, 1) - ours[:: len(ours) // 2]).abs().max() > 0.01


def test_pipeline_one_control_image_per_prompt(pipes):
    images = [outline(), outline(box=(2, 10, 30, 28))]
    ours, theirs = generate(*pipes, images, num_images_per_prompt=2)
    assert (ours - theirs).abs().max() <= 1e-4
    tensor = torch.stack([torch.from_numpy(np.asarray(p) / 255.0) for p in images])
    again, _ = generate(*pipes, tensor.permute(0, 3, 1, 2), num_images_per_prompt=2)
    assert (again - ours).abs().max() <= 1e-5  # a tensor in [0, 1] is the same


def test_scale_zero_is_the_pipeline_without_control(pipes):
    pipe, _, controlnet = pipes
    run = dict(num_inference_steps=3, output_type="latent")
    plain = pipe(PROMPTS, generator=torch.Generator().manual_seed(1), **run)
    zero = pipe(PROMPTS, image=outline(), controlnet=controlnet,
                controlnet_conditioning_scale=0.0,
                generator=torch.Generator().manual_seed(1), **run)  # fmt: skip
    assert torch.equal(plain, zero)


def test_a_window_without_steps_is_the_pipeline_without_control(pipes):
    pipe, _, controlnet = pipes
    run = dict(num_inference_steps=4, output_type="latent")
    plain = pipe(PROMPTS, generator=torch.Generator().manual_seed(1), **run)
    window = dict(control_guidance_start=0.1, control_guidance_end=0.2)  # 4 steps
    steered = pipe(PROMPTS, image=outline(), controlnet=controlnet, **window,
                   generator=torch.Generator().manual_seed(1), **run)  # fmt: skip
    assert torch.equal(plain, steered)
    window["control_guidance_end"] = 0.5  # step 1 of 0-3 steered
    steered = pipe(PROMPTS, image=outline(), controlnet=controlnet, **window,
                   generator=torch.Generator().manual_seed(1), **run)  # fmt: skip
    assert (plain - steered).abs().max() > 1e-3


def test_bfloat16_matches_diffusers_bfloat16(pipes):
    pipe, reference, controlnet = (copy.deepcopy(part) for part in pipes)
    full, _ = generate(pipe, reference, controlnet, outline())
    for part in (pipe, reference, controlnet):
        part.to(dtype=torch.bfloat16)
    ours, theirs = generate(pipe, reference, controlnet, outline())
    # bfloat16 keeps 8 bits of mantissa: pixels within a few 1/256 of diffusers'
    assert (ours - theirs.float()).abs().max() <= 2e-2
    # and far closer to diffusers' bfloat16 images than to the float32 ones
    assert (ours - theirs.float()).abs().max() < (theirs.float() - full).abs().max() / 2


def test_control_image_of_another_size_is_resized_with_one_warning(pipes):
    pipe, _, controlnet = pipes
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        images = pipe(PROMPTS, image=[outline(48), outline(48)], controlnet=controlnet,
                      num_inference_steps=2, output_type="pt")  # fmt: skip
    assert [str(w.message) for w in caught] == [
        "The control image is 48×48 pixels; resized to 32×32, the size of the "
        "images being made."
    ]
    assert images.shape == (2, 3, 32, 32)


def other_unet_controlnet():
    from sdscratch.unet import UNet, UNetConfig

    unet = UNet(UNetConfig(block_out_channels=(16, 32), attention_levels=(True, True),
                           layers_per_block=1, cross_attention_dim=96, num_heads=4,
                           norm_num_groups=8))  # fmt: skip
    return ControlNet.from_unet(unet, conditioning_embedding_out_channels=HINT)


BAD = {
    "no controlnet": (dict(image="OUTLINE"), "pass controlnet= too"),
    "no image": (dict(controlnet="OURS"), "needs a control image"),
    "not an image": (dict(image="edges.png", controlnet="OURS"), "PIL images or a"),
    "not a ControlNet": (dict(image="OUTLINE", controlnet="x"), "sdscratch ControlNet"),
    "another UNet": (dict(image="OUTLINE", controlnet="OTHER"),
                     r"UNet with block_out_channels=\(16, 32\)"),
    "another VAE": (dict(image="OUTLINE", controlnet="SD"), "shrinks images 8×"),
    "[-1, 1] tensor": (dict(image="SIGNED", controlnet="OURS"), r"in \[0, 1\]"),
    "three images": (dict(image="THREE", controlnet="OURS"), "3 control images"),
    "scale": (dict(image="OUTLINE", controlnet="OURS",
                   controlnet_conditioning_scale="1"), "must be a number"),
    "window": (dict(image="OUTLINE", controlnet="OURS", control_guidance_start=0.6,
                    control_guidance_end=0.4), "0 <= start < end <= 1"),
}  # fmt: skip


@pytest.mark.parametrize("case", BAD)
def test_bad_control_input_is_one_sentence(pipes, case):
    pipe, _, controlnet = pipes
    arguments, message = BAD[case]
    values = {
        "OUTLINE": outline(),
        "OURS": controlnet,
        "OTHER": other_unet_controlnet(),
        "SD": ControlNet.from_unet(pipe.unet),
        "SIGNED": torch.rand(1, 3, 32, 32) * 2 - 1,
        "THREE": [outline()] * 3,
    }
    arguments = {k: values.get(v, v) if isinstance(v, str) else v
                 for k, v in arguments.items()}  # fmt: skip
    with pytest.raises(ValueError, match=message) as error:
        pipe(PROMPTS, num_inference_steps=1, **arguments)
    assert str(error.value).count(". ") == 0 and "\n" not in str(error.value)


def test_controlnet_in_another_dtype_is_refused(pipes):
    pipe, _, controlnet = pipes
    other = ControlNet.from_unet(pipe.unet, HINT).to(torch.bfloat16)
    with pytest.raises(ValueError, match="controlnet.to"):
        pipe("a red circle", image=outline(), controlnet=other, num_inference_steps=1)


def test_unet_refuses_residuals_for_another_unet():
    from sdscratch.unet import UNet, UNetConfig

    unet = UNet(UNetConfig(block_out_channels=(8,), attention_levels=(False,),
                           cross_attention_dim=None, norm_num_groups=4))  # fmt: skip
    x = torch.randn(1, 4, 4, 4)
    skip = torch.randn(1, 8, 4, 4)
    with pytest.raises(ValueError, match="2 down-block residuals for the UNet's 3"):
        unet(x, 1, down_block_additional_residuals=[skip, skip])
    with pytest.raises(ValueError, match=r"of shape \(1, 4, 4, 4\) cannot be added"):
        unet(x, 1, down_block_additional_residuals=[skip, skip, x])
    steered = unet(x, 1, down_block_additional_residuals=[skip, skip, skip])
    assert (steered - unet(x, 1)).abs().max() > 1e-3


def test_saved_and_loaded_like_every_component(tmp_path):
    from sdscratch.checkpoint import load_component, save_component
    from sdscratch.controlnet import ControlNetConfig

    _, reference, _ = reference_pair(5)
    controlnet = controlnet_from_diffusers(reference)
    save_component(controlnet, tmp_path / "controlnet", controlnet.config)
    loaded = load_component(tmp_path / "controlnet", ControlNet, ControlNetConfig)
    assert loaded.config == controlnet.config
    state = loaded.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in controlnet.state_dict().items())


# ----------------------------------------------------------------------------------
# The command line


@pytest.fixture(scope="module")
def controlnet_folder(pipes, tmp_path_factory):
    from sdscratch.checkpoint import save_component

    _, _, controlnet = pipes
    folder = tmp_path_factory.mktemp("controlnet") / "edges"
    save_component(controlnet, folder, controlnet.config)
    outline().save(folder.parent / "edges.png")
    return folder


def test_cli_generate_with_a_control_image(pipes, controlnet_folder, tmp_path):
    from conftest import run_cli

    pipe, _, controlnet = pipes
    edges, run = controlnet_folder.parent / "edges.png", ("--steps", "3", "--seed", "7")
    pictures = {}
    for name, control in {
        "none": (),
        "zero": ("--control", edges, "--controlnet", controlnet_folder,
                 "--control-scale", "0"),
        "half": ("--control", edges, "--controlnet", controlnet_folder,
                 "--control-scale", "0.5"),
    }.items():  # fmt: skip
        out = tmp_path / f"{name}.png"
        code, _, err = run_cli("generate", PROMPTS[0], *run, *control, "-o", out)
        assert (code, err) == (0, "")
        pictures[name] = np.asarray(Image.open(out))
    assert np.array_equal(pictures["zero"], pictures["none"])
    expected = pipe(PROMPTS[0], image=outline(), controlnet=controlnet,
                    controlnet_conditioning_scale=0.5, num_inference_steps=3,
                    generator=torch.Generator().manual_seed(7))[0]  # fmt: skip
    assert np.abs(pictures["half"] - np.asarray(expected, np.int16)).max() <= 1
    assert not np.array_equal(pictures["half"], pictures["none"])


def test_cli_bad_control_is_one_sentence_exit_2(controlnet_folder, tmp_path):
    from conftest import run_cli
    from sdscratch.checkpoint import save_component

    other = tmp_path / "other"
    save_component(other_unet_controlnet(), other, other_unet_controlnet().config)
    (tmp_path / "notes.png").write_text("not a picture")
    edges = controlnet_folder.parent / "edges.png"
    cases = {
        "Cannot read": ("--control", tmp_path / "notes.png",
                        "--controlnet", controlnet_folder),
        "made for a UNet with": ("--control", edges, "--controlnet", other),
        "go together": ("--control", edges),
        "no such folder": ("--control", edges, "--controlnet", tmp_path / "nope"),
        "needs --control": ("--control-scale", "2"),
    }  # fmt: skip
    for message, arguments in cases.items():
        out = tmp_path / "out.png"
        code, _, err = run_cli("generate", "a red circle", "--steps", "1",
                               *arguments, "-o", out)  # fmt: skip
        assert code == 2 and message in err and err.count("\n") == 1, (message, err)
        assert not out.exists()
