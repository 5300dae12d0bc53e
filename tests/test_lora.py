"""LoRA: our layer against peft's, and our files against diffusers' loaders.

The bundled latent model stands in for Stable Diffusion (SD v1's architecture at a
small width). A LoRA with random, nonzero B (so that it matters) is written by us
and read by diffusers' own `load_lora_weights` on `to_diffusers()`'s pipeline, and
the other way round; both must draw the same images.
"""

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya
from peft import LoraConfig, get_peft_model_state_dict
from peft.tuners.lora import Conv2d as PeftConv2d
from peft.tuners.lora import Linear as PeftLinear
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

from conftest import diffusers_of, run_cli
from sdscratch.lora import (
    UNET_TARGETS,
    LoRALayer,
    count_parameters,
    freeze,
    inject_lora,
)
from sdscratch.lora_files import (
    load_lora,
    load_lora_weights,
    lora_argument,
    save_lora,
)
from sdscratch.pipeline import StableDiffusion

PROMPTS = ["a small red circle on the left", "a big blue star above a green cross"]
OPTIONS = dict(num_inference_steps=4, guidance_scale=7.5, output_type="pt")
TOLERANCE = 1e-4


def ours(pipe, seed=7):
    images = pipe(PROMPTS, generator=torch.Generator().manual_seed(seed), **OPTIONS)
    return (images / 2 + 0.5).clamp(0, 1)


def theirs(reference, seed=7):
    generator = torch.Generator().manual_seed(seed)
    return reference(PROMPTS, generator=generator, **OPTIONS).images


def randomise_b(lora, seed=0, std=0.05):
    """B ≠ 0, so the LoRA changes what the model does."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora.layers.values():
            layer.lora_B.weight.normal_(0, std, generator=generator)
    return lora


# ----------------------------------------------------------------------------------
# The layer


def peft_layer(base, rank, alpha, kind=PeftLinear):
    return kind(base, "default", config=LoraConfig(r=rank, lora_alpha=alpha),
                r=rank, lora_alpha=alpha)  # fmt: skip


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_layer_equals_peft_lora_layer(kind):
    torch.manual_seed(0)
    if kind == "linear":
        base, x, reference = nn.Linear(12, 10), torch.randn(3, 5, 12), PeftLinear
    else:
        base, x = nn.Conv2d(6, 8, 3, padding=1), torch.randn(2, 6, 7, 7)
        reference = PeftConv2d
    torch.manual_seed(5)
    layer = LoRALayer(base, rank=4, alpha=8).attach()
    torch.manual_seed(5)
    peft = peft_layer(copy.deepcopy(base), 4, 8, reference)
    # the same initialisation, number for number: A Kaiming-uniform, B zero
    assert torch.equal(layer.lora_A.weight, peft.lora_A["default"].weight)
    assert torch.equal(layer.lora_B.weight, peft.lora_B["default"].weight)
    assert layer.lora_B.weight.abs().max() == 0
    with torch.no_grad():
        layer.lora_B.weight.normal_()
        peft.lora_B["default"].weight.copy_(layer.lora_B.weight)
    expected = peft(x)
    assert (base(x) - expected).abs().max() <= 1e-5
    assert (expected - peft.base_layer(x)).abs().max() > 0.1  # B A x matters
    peft.merge()
    layer.merge()
    assert (base.weight - peft.base_layer.weight).abs().max() <= 1e-6
    assert (base(x) - expected).abs().max() <= 1e-5


def test_alpha_over_rank_scales_the_change():
    torch.manual_seed(0)
    base, x = nn.Linear(8, 8), torch.randn(4, 8)
    layer = LoRALayer(base, rank=2, alpha=6)
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    change = layer.lora_B.weight @ layer.lora_A.weight  # B A, (8, 8)
    assert torch.allclose(layer(x), 3 * x @ change.T, atol=1e-5)
    layer.scale = 0.5
    assert torch.allclose(layer(x), 1.5 * x @ change.T, atol=1e-5)


def test_merge_equals_unmerged_and_unmerge_gives_the_weights_back(pipe):
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    lora = randomise_b(inject_lora(pipe, rank=4, alpha=8, text_encoder=True))
    unmerged = ours(pipe)
    lora.merge()
    assert (ours(pipe) - unmerged).abs().max() <= 1e-5
    lora.scale = 0.5  # changing the scale of a merged LoRA re-merges it
    half = ours(pipe)
    lora.unmerge()
    assert (ours(pipe) - half).abs().max() <= 1e-5
    assert (half - unmerged).abs().max() > 0.01
    lora.detach()
    after = pipe.unet.state_dict()
    assert max((after[k] - before[k]).abs().max() for k in before) <= 1e-6


def test_new_lora_changes_nothing_until_trained(pipe):
    base = ours(pipe)
    lora = inject_lora(pipe, rank=4, text_encoder=True)
    assert torch.equal(ours(pipe), base)  # B = 0
    randomise_b(lora)
    assert (ours(pipe) - base).abs().max() > 0.02
    lora.detach()
    assert torch.equal(ours(pipe), base)


def test_only_the_lora_trains(pipe):
    freeze(pipe.unet, pipe.text_encoder)
    lora = inject_lora({"unet": pipe.unet}, rank=2, alpha=4)
    trainable = lora.trainable_parameters()
    layers = [m for n, m in pipe.unet.named_modules()
              if n.endswith(("to_q", "to_k", "to_v", "to_out"))]  # fmt: skip
    expected = sum(2 * (m.in_features + m.out_features) for m in layers)
    assert count_parameters(trainable.values()) == expected
    assert len(trainable) == 2 * len(layers)
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    optimizer = torch.optim.AdamW(trainable.values(), lr=1e-2)
    x, t = torch.randn(2, *pipe.latent_shape), torch.tensor([10, 500])
    context = pipe.text_encoder(pipe.tokenizer(PROMPTS))
    pipe.unet(x, t, context).square().mean().backward()
    assert all(p.grad is None for p in pipe.unet.parameters())
    grads = {k: v.grad.abs().max() for k, v in trainable.items()}
    assert all(g == 0 for k, g in grads.items() if "lora_A" in k)  # B = 0 at first
    assert all(g > 0 for k, g in grads.items() if "lora_B" in k)
    optimizer.step()
    assert all(torch.equal(v, before[k]) for k, v in pipe.unet.state_dict().items())


# ----------------------------------------------------------------------------------
# Files against diffusers


@pytest.mark.parametrize("format", ["diffusers", "kohya"])
def test_diffusers_loads_our_files_and_draws_our_images(pipe, tmp_path, format):
    reference = diffusers_of(pipe)
    # attention, the 1×1 conv projections and the feed-forward's two layers (their
    # diffusers names differ from ours: ff.net.0.proj, ff.net.2)
    targets = UNET_TARGETS + ("proj_in", "proj_out", "geglu.proj", "ff.out")
    lora = inject_lora(pipe, rank=4, alpha=8, text_encoder=True, targets=targets)
    randomise_b(lora)
    expected = ours(pipe)
    path = save_lora(lora, tmp_path / "lora.safetensors", format=format)
    lora.detach()
    assert (ours(pipe) - expected).abs().max() > 0.05  # the LoRA matters
    reference.load_lora_weights(str(path), adapter_name="ours")
    assert (theirs(reference) - expected).abs().max() <= TOLERANCE
    reference.set_adapters(["ours"], adapter_weights=[0.5])
    pipe.load_lora_weights(path, scale=0.5)
    assert (theirs(reference) - ours(pipe)).abs().max() <= TOLERANCE


def test_file_names_are_the_ecosystems(pipe, tmp_path):
    lora = inject_lora(pipe, rank=2, alpha=1, text_encoder=True)
    folder = save_lora(lora, tmp_path / "folder").parent
    keys = load_file(folder / "pytorch_lora_weights.safetensors").keys()
    block = "down_blocks.0.attentions.0.transformer_blocks.0"
    assert f"unet.{block}.attn1.to_q.lora_A.weight" in keys
    assert f"unet.{block}.attn2.to_out.0.lora_B.weight" in keys
    te = "text_encoder.text_model.encoder.layers.0.self_attn"
    assert f"{te}.q_proj.lora_A.weight" in keys
    kohya = load_file(save_lora(lora, tmp_path / "k.safetensors", format="kohya"))
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    assert kohya[f"{name}.lora_down.weight"].shape == (2, 32)
    assert kohya[f"{name}.lora_up.weight"].shape == (32, 2)
    assert kohya[f"{name}.alpha"].item() == 1
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in (
        kohya
    )
    assert len(kohya) == 3 * len(lora.layers)
    # a folder loads as diffusers loads it: its pytorch_lora_weights.safetensors
    assert len(load_lora(pipe, folder).layers) == len(lora.layers)


def diffusers_lora(reference, rank=4, alpha=8, seed=1, targets=None):
    """A LoRA made by peft on diffusers' UNet, B random: (state dict, config)."""
    targets = targets or ["to_q", "to_k", "to_v", "to_out.0"]
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets)
    reference.unet.add_adapter(config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in reference.unet.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.05, generator=generator)
    return get_peft_model_state_dict(reference.unet), config


@pytest.mark.parametrize("metadata", [True, False])
def test_we_load_files_diffusers_wrote(pipe, tmp_path, metadata):
    reference = diffusers_of(pipe)
    state, config = diffusers_lora(reference, rank=4, alpha=4 if not metadata else 8)
    expected = theirs(reference)
    type(reference).save_lora_weights(
        tmp_path, unet_lora_layers=state,
        unet_lora_adapter_metadata=config.to_dict() if metadata else None,
    )  # fmt: skip
    load_lora_weights(pipe, tmp_path)
    assert (ours(pipe) - expected).abs().max() <= TOLERANCE


def test_we_load_diffusers_kohya_conversion_with_conv_layers(pipe, tmp_path):
    """diffusers' own peft -> kohya converter, on attention and 1×1 conv layers
    (it writes α = r whatever the LoRA's α: so α = r here)."""
    reference = diffusers_of(pipe)
    targets = ["to_q", "to_v", "proj_in", "proj_out", "ff.net.2"]
    state, _ = diffusers_lora(reference, rank=3, alpha=3, targets=targets)
    expected = theirs(reference)
    kohya = convert_state_dict_to_kohya({f"unet.{k}": v for k, v in state.items()})
    kohya = {k.replace("lora_unet_unet_", "lora_unet_"): v for k, v in kohya.items()}
    assert any(k.endswith("proj_in.lora_down.weight") and v.ndim == 4
               for k, v in kohya.items())  # fmt: skip
    save_file(kohya, tmp_path / "kohya.safetensors")
    lora = load_lora_weights(pipe, tmp_path / "kohya.safetensors")
    assert {layer.alpha for layer in lora.layers.values()} == {3.0}
    blocks = [n for n, _ in pipe.unet.named_modules() if n.endswith("proj_in")]
    assert len(lora.layers) == 7 * len(blocks)  # to_q, to_v twice; 3 others once
    assert (ours(pipe) - expected).abs().max() <= TOLERANCE


def test_two_loras_at_once_as_diffusers_and_merged(pipe, tmp_path):
    reference = diffusers_of(pipe)
    paths = []
    for seed, (rank, text) in enumerate([(4, True), (2, False)]):
        lora = randomise_b(inject_lora(pipe, rank, 2 * rank, text), seed)
        paths.append(save_lora(lora, tmp_path / f"{seed}.safetensors"))
        lora.detach()
    loras = [load_lora_weights(pipe, paths[0], 0.7), load_lora_weights(pipe, paths[1])]
    both = ours(pipe)
    reference.load_lora_weights(str(paths[0]), adapter_name="first")
    reference.load_lora_weights(str(paths[1]), adapter_name="second")
    reference.set_adapters(["first", "second"], adapter_weights=[0.7, 1.0])
    assert (theirs(reference) - both).abs().max() <= TOLERANCE
    for lora in loras:
        lora.merge()
    assert (ours(pipe) - both).abs().max() <= 1e-5
    loras[1].detach()  # the first stays merged, the second goes
    load_lora_weights(pipe, paths[1]).detach()
    pipe.unload_lora_weights()
    reference.unload_lora_weights()
    assert (ours(pipe) - theirs(reference)).abs().max() <= TOLERANCE


# ----------------------------------------------------------------------------------
# Files that do not fit


def another_model_lora(tmp_path):
    """A LoRA for a UNet of another width."""
    from sdscratch.unet import UNet, UNetConfig

    unet = UNet(UNetConfig(block_out_channels=(16, 32), layers_per_block=1,
                           attention_levels=(True, True), cross_attention_dim=96,
                           num_heads=4, norm_num_groups=8, sample_size=8))  # fmt: skip
    return save_lora(inject_lora({"unet": unet}), tmp_path / "other.safetensors")


def bad_files(pipe, tmp_path):
    lora = inject_lora(pipe, 4)
    good = load_file(save_lora(lora, tmp_path / "good.safetensors"))
    good_kohya = load_file(save_lora(lora, tmp_path / "k.safetensors", "kohya"))
    alpha = next(k for k in good_kohya if k.endswith(".alpha"))
    lora.detach()
    first = next(k for k in good if k.endswith("lora_B.weight"))
    files = {
        "pickle": (tmp_path / "lora.pt", b"\x80\x04K\x01."),
        "not safetensors": (tmp_path / "junk.safetensors", b"not a safetensors file"),
        "unknown keys": {"unet.nowhere.to_q.lora_A.weight": torch.zeros(4, 32),
                         "unet.nowhere.to_q.lora_B.weight": torch.zeros(32, 4)},
        "not lora": {"model.diffusion_model.weight": torch.zeros(3)},
        "sdxl": {"text_encoder_2.x.lora_A.weight": torch.zeros(4, 32)},
        "two alphas": good_kohya | {alpha: torch.ones(2)},
        "kohya unknown": {"lora_unet_nowhere.lora_down.weight": torch.zeros(4, 32)},
        "rank mismatch": good | {first: torch.zeros(32, 2)},
        "half a layer": {k: v for k, v in good.items() if k != first},
        "another model": another_model_lora(tmp_path),
    }  # fmt: skip
    wrong_rank = tmp_path / "wrong_rank_metadata.safetensors"
    metadata = '{"unet.r": 8, "unet.lora_alpha": 8}'
    save_file(good, wrong_rank, metadata={"lora_adapter_metadata": metadata})
    files["metadata rank"] = wrong_rank
    for name, value in files.items():
        if isinstance(value, tuple):
            value[0].write_bytes(value[1])
            files[name] = value[0]
        elif isinstance(value, dict):
            files[name] = tmp_path / f"{name.replace(' ', '_')}.safetensors"
            save_file(value, files[name])
    return files


def test_a_file_that_does_not_fit_is_one_sentence_and_loads_nothing(pipe, tmp_path):
    base = ours(pipe)
    for name, path in bad_files(pipe, tmp_path).items():
        with pytest.raises(ValueError) as error:
            load_lora_weights(pipe, path)
        message = str(error.value)
        assert str(path) in message and "\n" not in message, name
        assert message.endswith("."), name
        assert message.count(". ") <= 1, (name, message)
        assert not any(m._forward_hooks for m in pipe.unet.modules()), name
    assert torch.equal(ours(pipe), base)
    assert "pickle" in str(pytest.raises(ValueError, load_lora, pipe, "x.ckpt").value)


# ----------------------------------------------------------------------------------
# The command line


def test_lora_argument_reads_file_and_scale():
    assert lora_argument("style.safetensors") == (Path("style.safetensors"), 1.0)
    assert lora_argument("a:b.safetensors:0.6") == (Path("a:b.safetensors"), 0.6)
    assert lora_argument("C:\\loras\\x.safetensors") == (
        Path("C:\\loras\\x.safetensors"),
        1.0,
    )
    with pytest.raises(ValueError, match="finite"):
        lora_argument("x.safetensors:nan")


def test_generate_with_lora_changes_the_image_and_a_bad_file_is_one_line(
    pipe, tmp_path
):
    lora = randomise_b(inject_lora(pipe, rank=4, alpha=8, text_encoder=True), std=0.2)
    path = save_lora(lora, tmp_path / "style.safetensors", format="kohya")
    common = ["generate", "a red circle", "--steps", 2, "--seed", 1]
    pictures = {}
    for name, extra in {"base": [], "lora": ["--lora", f"{path}:1.5"]}.items():
        out = tmp_path / f"{name}.png"
        code, printed, err = run_cli(*common, "-o", out, *extra)
        assert code == 0, err
        pictures[name] = np.asarray(Image.open(out), dtype=float)
    assert np.abs(pictures["base"] - pictures["lora"]).max() > 10
    (tmp_path / "style.ckpt").write_bytes(b"\x80\x04K\x01.")
    for bad in (tmp_path / "style.ckpt", tmp_path / "missing.safetensors"):
        code, _, err = run_cli(*common, "-o", tmp_path / "x.png", "--lora", bad)
        assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
        assert str(bad) in err


def test_sd_v1_layout_kohya_file_loads_in_diffusers(tmp_path):
    """SD v1's own layout (four levels, two layers each, mid block): every name."""
    from test_real_sd import tiny_reference

    from sdscratch.shapes.data import Shapes
    from sdscratch.tokenizer import train_bpe

    captions = [Shapes("train").scene(i)[0] for i in range(300)]
    tokenizer = train_bpe(captions, vocab_size=600, context_length=16)
    reference = tiny_reference(tokenizer.save_pretrained(tmp_path / "tokenizer"))
    reference.save_pretrained(tmp_path / "sd")
    pipe = StableDiffusion.from_pretrained(tmp_path / "sd")
    reference = diffusers_of(pipe)
    lora = randomise_b(inject_lora(pipe, rank=2, alpha=3, text_encoder=True), std=0.2)
    assert {path.split(".")[0] for _, path in lora.where.values()} == {
        "down_blocks", "mid_block", "up_blocks", "encoder"
    }  # fmt: skip
    expected = ours(pipe)
    path = save_lora(lora, tmp_path / "sd_v1.safetensors", format="kohya")
    lora.detach()
    assert (ours(pipe) - expected).abs().max() > 0.01
    reference.load_lora_weights(str(path))
    assert (theirs(reference) - expected).abs().max() <= TOLERANCE


def test_locon_kohya_file_of_resnet_3x3_convs_loads_as_in_diffusers(pipe, tmp_path):
    """LoCon: LoRA on the ResNet blocks' 3×3 convolutions (A a 3×3 conv, B 1×1),
    written as a kohya file; diffusers' `load_lora_weights` and ours draw the same
    images from it."""
    reference = diffusers_of(pipe)
    state, _ = diffusers_lora(reference, rank=2, alpha=2, targets=["conv1", "conv2"])
    kohya = convert_state_dict_to_kohya({f"unet.{k}": v for k, v in state.items()})
    kohya = {k.replace("lora_unet_unet_", "lora_unet_"): v for k, v in kohya.items()}
    downs = [v for k, v in kohya.items() if k.endswith("conv1.lora_down.weight")]
    assert downs and all(v.shape[-2:] == (3, 3) for v in downs)
    save_file(kohya, tmp_path / "locon.safetensors")
    fresh = diffusers_of(pipe)
    fresh.load_lora_weights(str(tmp_path), weight_name="locon.safetensors")
    expected = theirs(fresh)
    assert (expected - theirs(diffusers_of(pipe))).abs().max() > 1e-3  # it acts
    lora = load_lora_weights(pipe, tmp_path / "locon.safetensors")
    convs = [n for n, m in pipe.unet.named_modules() if n.endswith(("conv1", "conv2"))]
    assert len(lora.layers) == len(convs)
    assert (ours(pipe) - expected).abs().max() <= TOLERANCE
