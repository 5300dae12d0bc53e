"""Stable Diffusion v1.5 at full size: our models equal diffusers' and transformers'.

Each reference model is built from SD v1.5's configuration with seeded random
weights (std 0.02; norms near 1), ported into ours sharing the same tensors (one
copy in memory: the UNet is 3.4 GB in float32), and run once at a small size. The
single-file tables are checked at full size on the meta device against diffusers'
own converter. One model is alive at a time.
"""

import gc

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders import single_file_utils as converter
from transformers import CLIPTextConfig, CLIPTextModel

from sdscratch import port
from sdscratch.clip import TextEncoder
from sdscratch.single_file import compvis_names
from sdscratch.unet import UNet, UNetConfig
from sdscratch.vae import VAE, VAEConfig

SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    attention_head_dim=8, norm_num_groups=32,
)  # fmt: skip
SD15_VAE = dict(
    block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
    down_block_types=("DownEncoderBlock2D",) * 4, scaling_factor=0.18215,
    sample_size=512,
    up_block_types=("UpDecoderBlock2D",) * 4,
)  # fmt: skip
SD15_TEXT = dict(
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
    num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
)  # fmt: skip


def seeded(cls, config, seed):
    """The reference model with seeded random weights. diffusers' models are built
    on the meta device (skipping their slow init); CLIPTextModel normally, as its
    non-persistent position_ids buffer must be real."""
    text = isinstance(config, CLIPTextConfig)
    with torch.device("cpu" if text else "meta"):
        model = cls(config) if text else cls(**config)
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, tensor in model.state_dict().items():
        noise = torch.randn(tensor.shape, generator=g)
        norm = "norm" in name and tensor.ndim == 1
        state[name] = 1 + 0.1 * noise if norm else noise * 0.02
    model.load_state_dict(state, assign=not text)
    return model.eval()


def ours_sharing(cls, config, state):
    """Our model on the meta device, given the reference's tensors (no copy)."""
    with torch.device("meta"):
        model = cls(config)
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


def close(ours, theirs):
    scale = theirs.abs().max()
    return scale > 0 and (ours - theirs).abs().max() <= 1e-5 * max(1.0, scale)


@torch.no_grad()
def test_unet_equals_diffusers_at_full_size():
    reference = seeded(UNet2DConditionModel, SD15_UNET, 0)
    config = port.unet_config_from_diffusers(reference.config)
    assert config == UNetConfig()
    state = port.unet_state_dict_from_diffusers(reference.state_dict())
    ours = ours_sharing(UNet, config, state)
    assert sum(p.numel() for p in ours.parameters()) == 859_520_964
    g = torch.Generator().manual_seed(1)
    x, context = (
        torch.randn(1, 4, 8, 8, generator=g),
        torch.randn(1, 77, 768, generator=g),
    )
    t = torch.tensor([981])
    assert close(ours(x, t, context), reference(x, t, context).sample)
    del reference, ours, state
    gc.collect()


@torch.no_grad()
def test_vae_equals_diffusers_at_full_size():
    reference = seeded(AutoencoderKL, SD15_VAE, 2)
    config = port.vae_config_from_diffusers(reference.config)
    assert config == VAEConfig.stable_diffusion_v1()
    ours = ours_sharing(
        VAE, config, port.vae_state_dict_from_diffusers(reference.state_dict())
    )
    g = torch.Generator().manual_seed(3)
    image, z = (
        torch.rand(1, 3, 64, 64, generator=g) * 2 - 1,
        torch.randn(1, 4, 8, 8, generator=g),
    )
    assert close(ours.encode(image).mean, reference.encode(image).latent_dist.mean)
    assert close(ours.decode(z), reference.decode(z).sample)


@torch.no_grad()
def test_text_encoder_equals_transformers_at_full_size():
    reference = seeded(CLIPTextModel, CLIPTextConfig(**SD15_TEXT), 4)
    config = port.text_encoder_config_from_transformers(reference.config)
    state = port.text_encoder_state_dict_from_transformers(reference.state_dict())
    ours = ours_sharing(TextEncoder, config, state)
    ids = torch.randint(0, 49406, (2, 77), generator=torch.Generator().manual_seed(5))
    ids[:, 0], ids[:, 20:] = 49406, 49407  # <|startoftext|> … <|endoftext|> padding
    assert close(ours(ids), reference(ids).last_hidden_state)


@pytest.mark.parametrize("ema", [False, True])
def test_single_file_names_at_full_size_are_what_diffusers_converter_reads(ema):
    """Our CompVis names for SD v1.5's UNet and VAE, through diffusers' converter
    (on the meta device: names and shapes only)."""
    with torch.device("meta"):
        parts = {
            "unet": UNet(UNetConfig()),
            "vae": VAE(VAEConfig.stable_diffusion_v1()),
            "text_encoder": TextEncoder(port.text_encoder_config_from_transformers(
                CLIPTextConfig(**SD15_TEXT))),
        }  # fmt: skip
        unet_reference = UNet2DConditionModel(**SD15_UNET)
        vae_reference = AutoencoderKL(**SD15_VAE)
    names = compvis_names(parts)
    checkpoint = {}
    for (component, key), compvis in names.items():
        tensor = parts[component].state_dict()[key]
        if ".mid.attn_1." in compvis and tensor.ndim == 2:
            tensor = tensor[:, :, None, None]
        checkpoint[compvis] = tensor
    if ema:  # a full file: EMA copies under diffusers' flat names
        for key in [k for k in checkpoint if k.startswith("model.diffusion_model.")]:
            checkpoint["model_ema." + "".join(key.split(".")[1:])] = checkpoint[key]
    unet_config = dict(unet_reference.config)
    convert = converter.convert_ldm_unet_checkpoint
    unet = convert(checkpoint, unet_config, extract_ema=ema)
    vae = converter.convert_ldm_vae_checkpoint(checkpoint, dict(vae_reference.config))
    for converted, reference in ((unet, unet_reference), (vae, vae_reference)):
        expected = reference.state_dict()
        assert converted.keys() == expected.keys()
        assert all(converted[k].shape == expected[k].shape for k in expected)
