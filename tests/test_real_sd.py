"""The real Stable Diffusion's formats: diffusers folders, single files, export.

A tiny random Stable Diffusion v1 (SD v1's layout: four levels, two layers, 32
groups, eight heads; small widths) is written by diffusers' own
`StableDiffusionPipeline.save_pretrained`; our loaders read it and must give
diffusers' images. Single files are checked against diffusers' own converter
(`diffusers.loaders.single_file_utils`), in both directions.
"""

import dataclasses
import json
import re
import shutil

import pytest
import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from diffusers.loaders import single_file_utils as converter
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from conftest import randomise, run_cli
from sdscratch.pipeline import StableDiffusion
from sdscratch.shapes.data import Shapes
from sdscratch.single_file import infer_configs
from sdscratch.tokenizer import train_bpe

PROMPTS = ["a small red circle on the left", "a big blue star above a green cross"]
OPTIONS = dict(num_inference_steps=4, guidance_scale=7.5, output_type="pt")
TOLERANCE = 1e-4


def tiny_reference(tokenizer_folder):
    """diffusers' SD v1 pipeline at a tiny width, random, with SD v1.5's PNDM config."""
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_folder)
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), max_position_embeddings=16, hidden_size=128,
        intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
        hidden_act="quick_gelu", eos_token_id=2,
    ))  # fmt: skip
    vae = AutoencoderKL(
        block_out_channels=(32, 32, 32, 32), layers_per_block=2, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 4, scaling_factor=0.18215,
        up_block_types=("UpDecoderBlock2D",) * 4, sample_size=64,
    )  # fmt: skip
    unet = UNet2DConditionModel(
        sample_size=8, block_out_channels=(32, 32, 64, 64), layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=128, attention_head_dim=8,
    )  # fmt: skip
    for seed, model in enumerate((text_encoder, vae, unet)):
        randomise(model, seed + 1)
    scheduler = PNDMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1,
    )  # fmt: skip
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=scheduler, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )  # fmt: skip


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A diffusers SD v1 folder, written by diffusers (fp32 and fp16 variant)."""
    tokenizer = tmp_path_factory.mktemp("tokenizer")
    captions = [Shapes("train").scene(i)[0] for i in range(300)]
    train_bpe(captions, vocab_size=600, context_length=16).save_pretrained(tokenizer)
    root = tmp_path_factory.mktemp("sd") / "tiny-sd"
    reference = tiny_reference(tokenizer)
    reference.save_pretrained(root)
    reference.save_pretrained(root.parent / "tiny-sd-fp16", variant="fp16")
    return root


def diffusers_images(root, dtype=torch.float32, **kwargs):
    reference = StableDiffusionPipeline.from_pretrained(root, torch_dtype=dtype,
                                                        **kwargs)  # fmt: skip
    # as SD v1.5's scheduler_config.json says (PNDMScheduler does not keep it)
    config = reference.scheduler.config
    reference.scheduler = DDIMScheduler.from_config(config, clip_sample=False)
    reference.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(1024)
    return reference(PROMPTS, generator=generator, **OPTIONS).images.float()


def our_images(pipe):
    generator = torch.Generator().manual_seed(1024)
    return (pipe(PROMPTS, generator=generator, **OPTIONS) / 2 + 0.5).clamp(0, 1)


def test_diffusers_folder_gives_diffusers_images(folder):
    pipe = StableDiffusion.from_pretrained(folder)
    expected = diffusers_images(folder)
    assert pipe.schedule.steps_offset == 1 and not pipe.schedule.set_alpha_to_one
    ours = our_images(pipe)
    assert ours.shape == expected.shape == (2, 3, 64, 64)
    assert (ours - expected).abs().max() <= TOLERANCE
    assert (ours[0] - ours[1]).abs().max() > 0.01


def test_bfloat16_matches_diffusers_bfloat16(folder):
    pipe = StableDiffusion.from_pretrained(folder, torch_dtype=torch.bfloat16)
    assert {p.dtype for p in pipe.unet.parameters()} == {torch.bfloat16}
    expected = diffusers_images(folder, torch.bfloat16)
    full = diffusers_images(folder)
    ours = our_images(pipe)
    # bfloat16 keeps 8 bits of mantissa: pixels within a few 1/256 of diffusers'
    assert (ours - expected).abs().max() <= 2e-2
    # and far closer to diffusers' bfloat16 image than to its float32 one
    assert (ours - expected).abs().max() < (expected - full).abs().max() / 2


def test_fp16_variant_files(folder):
    root = folder.parent / "tiny-sd-fp16"
    assert not (root / "unet" / "diffusion_pytorch_model.safetensors").exists()
    pipe = StableDiffusion.from_pretrained(root, variant="fp16")
    assert pipe.dtype == torch.float32  # float16 files, float32 models by default
    expected = diffusers_images(root, variant="fp16")
    assert (our_images(pipe) - expected).abs().max() <= TOLERANCE


def test_to_diffusers_gives_our_images_for_the_bundled_model():
    pipe = StableDiffusion.from_pretrained("shapes-ldm")
    reference = pipe.to_diffusers()
    reference.set_progress_bar_config(disable=True)
    assert reference.safety_checker is None
    prompts = ["a small red circle on the left", "a blue square above a green star"]
    run = dict(num_inference_steps=6, output_type="pt")
    theirs = reference(prompts, generator=torch.Generator().manual_seed(3), **run)
    ours = pipe(prompts, generator=torch.Generator().manual_seed(3), **run)
    assert ((ours / 2 + 0.5).clamp(0, 1) - theirs.images).abs().max() <= TOLERANCE
    ids = pipe.tokenizer.encode(prompts[0])
    expected = [pipe.tokenizer.bos_id, *ids, pipe.tokenizer.eos_id]
    assert reference.tokenizer(prompts[0]).input_ids == expected


def test_to_diffusers_holds_the_same_weights(folder):
    original = StableDiffusionPipeline.from_pretrained(folder)
    exported = StableDiffusion.from_pretrained(folder).to_diffusers()
    for name in ("unet", "vae", "text_encoder"):
        theirs = getattr(original, name).state_dict()
        ours = getattr(exported, name).state_dict()
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[key], theirs[key]) for key in theirs), name


# ----------------------------------------------------------------------------------
# Single files


def diffusers_weights(root) -> dict:
    """The three models' diffusers state dicts, as the folder holds them."""
    reference = StableDiffusionPipeline.from_pretrained(root)
    return {name: getattr(reference, name).state_dict()
            for name in ("unet", "vae", "text_encoder")}  # fmt: skip


def through_converter(path, unet_config, vae_config) -> dict:
    """diffusers' own converter, reading a single file."""
    state = load_file(str(path))
    text = converter.convert_ldm_clip_checkpoint(state)
    return {
        "unet": converter.convert_ldm_unet_checkpoint(state, dict(unet_config)),
        "vae": converter.convert_ldm_vae_checkpoint(state, dict(vae_config)),
        "text_encoder": {
            key.removeprefix("text_model."): value for key, value in text.items()
        },  # fmt: skip
    }


@pytest.mark.parametrize("source", ["tiny SD v1", "shapes-ldm"])
def test_our_single_file_reads_through_diffusers_converter(folder, tmp_path, source):
    pipe = StableDiffusion.from_pretrained(folder if source != "shapes-ldm" else source)
    path = pipe.save_single_file(tmp_path / "model.safetensors")
    exported = pipe.to_diffusers()
    converted = through_converter(path, exported.unet.config, exported.vae.config)
    for name in ("unet", "vae", "text_encoder"):
        theirs = getattr(exported, name).state_dict()
        theirs = {k: v for k, v in theirs.items() if not k.endswith("position_ids")}
        assert converted[name].keys() == theirs.keys(), name
        assert all(torch.equal(converted[name][k], theirs[k]) for k in theirs), name
    again = StableDiffusion.from_single_file(path)  # our metadata: no config needed
    for name in ("unet", "vae", "text_encoder"):
        before, after = getattr(pipe, name), getattr(again, name)
        if name == "text_encoder":  # CLIP's projection (shapes-ldm's) is not SD's
            assert after.config == dataclasses.replace(before.config, projection_dim=0)
        else:
            assert after.config == before.config
        state = before.state_dict()
        assert all(torch.equal(state[k], v) for k, v in after.state_dict().items())
    assert again.tokenizer.vocab == pipe.tokenizer.vocab


# CompVis's names, from diffusers' scripts/convert_diffusers_to_original_stable_
# diffusion.py (SD v1's four levels and two layers), with today's attention names.
def compvis_unet_names() -> list:
    pairs = [("time_embed.0.", "time_embedding.linear_1."),
             ("time_embed.2.", "time_embedding.linear_2."),
             ("input_blocks.0.0.", "conv_in."), ("out.0.", "conv_norm_out."),
             ("out.2.", "conv_out.")]  # fmt: skip
    for i in range(4):
        for j in range(2):
            pairs.append(
                (f"input_blocks.{3 * i + j + 1}.0.", f"down_blocks.{i}.resnets.{j}.")
            )
            if i < 3:
                pairs.append(
                    (
                        f"input_blocks.{3 * i + j + 1}.1.",
                        f"down_blocks.{i}.attentions.{j}.",
                    )
                )
        for j in range(3):
            pairs.append(
                (f"output_blocks.{3 * i + j}.0.", f"up_blocks.{i}.resnets.{j}.")
            )
            if i > 0:
                pairs.append(
                    (f"output_blocks.{3 * i + j}.1.", f"up_blocks.{i}.attentions.{j}.")
                )
        if i < 3:
            pairs.append(
                (
                    f"input_blocks.{3 * (i + 1)}.0.op.",
                    f"down_blocks.{i}.downsamplers.0.conv.",
                )
            )
            pairs.append(
                (
                    f"output_blocks.{3 * i + 2}.{1 if i == 0 else 2}.",
                    f"up_blocks.{i}.upsamplers.0.",
                )
            )
    pairs.append(("middle_block.1.", "mid_block.attentions.0."))
    pairs += [(f"middle_block.{2 * j}.", f"mid_block.resnets.{j}.") for j in range(2)]
    return pairs  # noqa: E501


def to_compvis(weights: dict) -> dict:
    """A CompVis single file's tensors from diffusers' state dicts (independent of
    sdscratch.single_file: the tables of diffusers' own reverse script)."""
    resnet = [
        ("in_layers.0", "norm1"),
        ("in_layers.2", "conv1"),
        ("out_layers.0", "norm2"),
        ("out_layers.3", "conv2"),
        ("emb_layers.1", "time_emb_proj"),
        ("skip_connection", "conv_shortcut"),
    ]
    out = {}
    for key, value in weights["unet"].items():
        name = key
        if "resnets" in name:
            for sd, hf in resnet:
                name = name.replace(hf, sd)
        for sd, hf in compvis_unet_names():
            name = name.replace(hf, sd)
        out["model.diffusion_model." + name] = value
    vae = [
        ("nin_shortcut", "conv_shortcut"),
        ("norm_out", "conv_norm_out"),
        ("mid.attn_1.", "mid_block.attentions.0."),
    ]
    for i in range(4):
        vae += [
            (f"encoder.down.{i}.block.{j}.", f"encoder.down_blocks.{i}.resnets.{j}.")
            for j in range(2)
        ]
        vae += [
            (f"decoder.up.{3 - i}.block.{j}.", f"decoder.up_blocks.{i}.resnets.{j}.")
            for j in range(3)
        ]
        if i < 3:
            vae += [
                (f"down.{i}.downsample.", f"down_blocks.{i}.downsamplers.0."),
                (f"up.{3 - i}.upsample.", f"up_blocks.{i}.upsamplers.0."),
            ]
    vae += [(f"mid.block_{i + 1}.", f"mid_block.resnets.{i}.") for i in range(2)]
    attention = [
        ("norm.", "group_norm."),
        ("q.", "to_q."),
        ("k.", "to_k."),
        ("v.", "to_v."),
        ("proj_out.", "to_out.0."),
    ]
    for key, value in weights["vae"].items():
        name = key
        for sd, hf in vae:
            name = name.replace(hf, sd)
        if "attentions" in key:
            for sd, hf in attention:
                name = name.replace(hf, sd)
            if re.search(r"\.(q|k|v|proj_out)\.weight$", name):
                value = value[:, :, None, None]  # linear -> 1×1 convolution
        out["first_stage_model." + name] = value
    for key, value in weights["text_encoder"].items():
        out["cond_stage_model.transformer.text_model." + key] = value
    return {key: value.contiguous() for key, value in out.items()}


@pytest.fixture(scope="module")
def compvis_file(folder, tmp_path_factory):
    path = tmp_path_factory.mktemp("single") / "tiny-compvis.safetensors"
    save_file(to_compvis(diffusers_weights(folder)), str(path))
    return path


def test_compvis_file_reads_as_diffusers_converter_reads_it(folder, compvis_file):
    """The independently built file is what diffusers' converter expects."""
    reference = StableDiffusionPipeline.from_pretrained(folder)
    converted = through_converter(compvis_file, reference.unet.config,
                                  reference.vae.config)  # fmt: skip
    weights = diffusers_weights(folder)
    for name, theirs in weights.items():
        assert converted[name].keys() == theirs.keys(), name


def test_compvis_file_gives_diffusers_images(folder, compvis_file):
    pipe = StableDiffusion.from_single_file(compvis_file, config=folder)
    assert (our_images(pipe) - diffusers_images(folder)).abs().max() <= TOLERANCE


def test_compvis_file_configs_are_inferred_from_shapes(folder, compvis_file):
    from sdscratch.diffusers_folder import diffusers_settings
    from sdscratch.single_file import _header

    _, shapes, _ = _header(compvis_file)
    configs, _ = diffusers_settings(folder)
    inferred = infer_configs(compvis_file, shapes)
    # the one size the shapes do not tell: SD v1's 64 latent pixels per side (512
    # image pixels, as diffusers' single-file loader assumes)
    assert inferred["unet"] == dataclasses.replace(configs["unet"], sample_size=64)
    assert inferred["vae"] == dataclasses.replace(configs["vae"], sample_size=512)
    expected = configs["text_encoder"]
    assert inferred["text_encoder"] == expected


def test_full_checkpoint_with_ema_weights(folder, compvis_file, tmp_path):
    """A full file holds training weights (model.) and EMA ones (model_ema.): the
    first by default, the EMA ones with extract_ema, as diffusers' converter."""
    state = load_file(str(compvis_file))
    for key in [k for k in state if k.startswith("model.diffusion_model.")]:
        flat = "model_ema." + "".join(key.split(".")[1:])
        state[flat] = state[key] + 0.01
    state["model_ema.decay"], state["betas"] = torch.tensor(0.9999), torch.rand(1000)
    path = tmp_path / "full.safetensors"
    save_file(state, str(path))
    unet_config = json.loads((folder / "unet" / "config.json").read_text())
    for extract_ema in (False, True):
        pipe = StableDiffusion.from_single_file(
            path, config=folder, extract_ema=extract_ema
        )
        expected = converter.convert_ldm_unet_checkpoint(
            state, unet_config, extract_ema=extract_ema
        )
        ours = pipe.to_diffusers().unet.state_dict()
        assert all(torch.equal(ours[key], expected[key]) for key in expected)


# ----------------------------------------------------------------------------------
# Bad input: one sentence on the command line, exit code 2


def edit_json(path, **changes):
    config = json.loads(path.read_text())
    path.write_text(json.dumps(config | changes))


def broken(folder, tmp_path, how):
    """A copy of the tiny SD folder (or a file), broken in one way."""
    root = tmp_path / "model"
    shutil.copytree(folder, root)
    unet = root / "unet" / "config.json"
    if how == "SD 2.x config":
        edit_json(unet, cross_attention_dim=1024, attention_head_dim=[5, 10, 20, 20],
                  use_linear_projection=True)  # fmt: skip
    elif how == "SDXL config":
        edit_json(unet, addition_embed_type="text_time")
    elif how == "v-prediction scheduler":
        edit_json(root / "scheduler" / "scheduler_config.json",
                  prediction_type="v_prediction")  # fmt: skip
    elif how == "missing component":
        shutil.rmtree(root / "vae")
    elif how == "truncated weights":
        weights = root / "unet" / "diffusion_pytorch_model.safetensors"
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif how == "wrong shapes":
        edit_json(unet, block_out_channels=[32, 32, 64, 128])
    elif how == "pickle":
        root = tmp_path / "v1-5-pruned-emaonly.ckpt"
        root.write_bytes(b"not read")
    elif how == "unknown keys in a single file":
        pipe = StableDiffusion.from_pretrained(folder)
        root = pipe.save_single_file(tmp_path / "model.safetensors")
        state = load_file(str(root))
        state["model.diffusion_model.extra_head.weight"] = torch.zeros(2)
        with safe_open(str(root), "pt") as file:
            save_file(state, str(root), metadata=file.metadata())
    return root


BROKEN = {  # how: what the sentence must say
    "SD 2.x config": "Stable Diffusion 2.x model",
    "SDXL config": "SDXL model",
    "v-prediction scheduler": "'v_prediction'",
    "missing component": "vae/config.json is missing",
    "truncated weights": "not a readable safetensors file",
    "wrong shapes": "has shape",
    "pickle": "sdscratch reads only .safetensors",
    "unknown keys in a single file": "model.diffusion_model.extra_head.weight",
}


@pytest.mark.parametrize("how", BROKEN)
def test_bad_model_is_one_sentence_exit_2(folder, tmp_path, how):
    model = broken(folder, tmp_path, how)
    out_png = tmp_path / "out.png"
    code, out, err = run_cli("generate", "a", "--model", model, "-o", out_png)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert BROKEN[how] in err
    assert not (tmp_path / "out.png").exists()


def test_bundled_name_wins_over_a_folder_of_that_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "shapes-ldm").mkdir()
    (tmp_path / "shapes-ldm" / "MANIFEST.json").write_text("{ not a manifest")
    code, out, err = run_cli("generate", "a red circle", "--model", "shapes-ldm",
                             "--steps", 2, "-o", "out.png")  # fmt: skip
    assert code == 0, err
    assert (tmp_path / "out.png").is_file()
    assert (tmp_path / "shapes-ldm" / "MANIFEST.json").read_text() == "{ not a manifest"
    code, _, err = run_cli("generate", "a", "--model", "./shapes-ldm", "-o", "x.png")
    assert code == 2 and "MANIFEST.json is not valid JSON" in err


def test_repo_id_offline_is_one_sentence(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, out, err = run_cli("generate", "a cat", "--model",
                             "stable-diffusion-v1-5/stable-diffusion-v1-5",
                             "-o", tmp_path / "out.png")  # fmt: skip
    assert code == 2 and err.count("\n") == 1
    assert "Cannot download stable-diffusion-v1-5/stable-diffusion-v1-5" in err


@pytest.mark.parametrize("option", [["--dtype", "fp8"], ["--device", "tpu"]])
def test_bad_dtype_or_device_is_one_line(tmp_path, option):
    code, out, err = run_cli("generate", "a", *option, "-o", tmp_path / "x.png")
    assert code == 2 and err.count("\n") == 1 and "invalid choice" in err


def test_generate_with_a_diffusers_folder_and_bf16(folder, tmp_path):
    options = ["--dtype", "bf16", "--steps", 2, "-o", tmp_path / "x.png"]
    code, out, err = run_cli("generate", "a red circle", "--model", folder, *options)
    assert code == 0, err
    assert Image.open(tmp_path / "x.png").size == (64, 64)


# ----------------------------------------------------------------------------------
# Scheduler configs


@pytest.mark.parametrize("setting, value", [
    ("prediction_type", "v_prediction"), ("clip_sample", True),
    ("timestep_spacing", "trailing"), ("steps_offset", -1), ("steps_offset", True),
    ("set_alpha_to_one", "false"),
])  # fmt: skip
def test_unsupported_scheduler_settings_are_refused(setting, value):
    from sdscratch.checkpoint import CheckpointError
    from sdscratch.loading import schedule_from_config

    config = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                  beta_schedule="scaled_linear", **{setting: value})  # fmt: skip
    with pytest.raises(CheckpointError, match=setting):
        schedule_from_config(config)


def test_a_vae_config_without_scaling_factor_gets_diffusers_default(folder, tmp_path):
    """SD v1.5's vae/config.json (diffusers 0.6) has no scaling_factor."""
    root = tmp_path / "model"
    shutil.copytree(folder, root)
    config = json.loads((root / "vae" / "config.json").read_text())
    del config["scaling_factor"], config["latent_channels"]
    (root / "vae" / "config.json").write_text(json.dumps(config))
    assert AutoencoderKL.from_config(config).config.scaling_factor == 0.18215
    pipe = StableDiffusion.from_pretrained(root)
    assert pipe.vae.config.scaling_factor == 0.18215
    assert pipe.vae.config.latent_channels == 4


@pytest.mark.parametrize("task", ["ddpm", "euler_ancestral", "dpmpp_2m", "img2img",
                                  "inpaint"])  # fmt: skip
def test_every_task_runs_in_bfloat16(task):
    pipe = StableDiffusion.from_pretrained("shapes-ldm", torch_dtype=torch.bfloat16)
    run = dict(num_inference_steps=2, output_type="latent",
               generator=torch.Generator().manual_seed(0))  # fmt: skip
    image = torch.zeros(1, 3, 32, 32)
    if task == "img2img":
        latents = pipe.img2img("a red circle", image, **run)
    elif task == "inpaint":
        latents = pipe.inpaint("a red circle", image, torch.ones(1, 1, 32, 32), **run)
    else:
        latents = pipe("a red circle", sampler=task, karras=task == "dpmpp_2m", **run)
    assert latents.dtype == torch.bfloat16 and latents.isfinite().all()


@pytest.mark.parametrize("variant", [None, "fp16"])
def test_repo_id_downloads_only_what_sd_needs(folder, monkeypatch, variant):
    """A repo id goes through huggingface_hub's snapshot_download (replaced here by
    the tiny folder): safetensors weights of the asked variant, configs, tokenizer."""
    import huggingface_hub

    asked = {}

    def snapshot_download(repo_id, allow_patterns):
        asked.update(repo_id=repo_id, patterns=allow_patterns)
        return str(folder if variant is None else folder.parent / "tiny-sd-fp16")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    pipe = StableDiffusion.from_pretrained("someone/tiny-sd", variant=variant)
    assert asked["repo_id"] == "someone/tiny-sd"
    weights = [p for p in asked["patterns"] if p.endswith(".safetensors")]
    suffix = ".fp16.safetensors" if variant else ".safetensors"
    assert sorted(weights) == sorted([
        f"unet/diffusion_pytorch_model{suffix}", f"vae/diffusion_pytorch_model{suffix}",
        f"text_encoder/model{suffix}",
    ])  # fmt: skip
    assert all(p.endswith((".json", ".txt", ".safetensors")) for p in asked["patterns"])
    assert pipe.unet.config.block_out_channels == (32, 32, 64, 64)


@pytest.mark.parametrize("spacing", [None, "leading"])
def test_scheduler_settings_travel_to_diffusers_and_through_a_single_file(
    tmp_path, spacing
):
    pipe = StableDiffusion.from_pretrained("shapes-ldm")
    pipe.schedule.steps_offset, pipe.schedule.set_alpha_to_one = 1, True
    pipe.schedule.timestep_spacing = spacing
    config = pipe.to_diffusers().scheduler.config
    assert (config.steps_offset, config.set_alpha_to_one) == (1, True)
    assert config.timestep_spacing == (spacing or "leading")  # diffusers' default
    path = pipe.save_single_file(tmp_path / "model.safetensors")
    again = StableDiffusion.from_single_file(path).schedule
    assert (again.steps_offset, again.set_alpha_to_one) == (1, True)
    assert again.timestep_spacing == spacing
