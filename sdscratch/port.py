"""Weights of the reference implementations (diffusers, transformers) in our models.

Each model has its own section: a short table that renames the reference's
parameters into ours, and a `<model>_from_<library>` function that builds our model
from the reference's config and loads the renamed weights strictly (every tensor
used, none missing). Equal outputs then prove the architectures are the same.
"""

import re

import torch

# ---------------------------------------------------------------------------------
# The autoencoder: diffusers' AutoencoderKL -> sdscratch.vae.VAE
# ---------------------------------------------------------------------------------

# diffusers name (regex)            -> ours. Everything else is named alike.
VAE_RENAMES = [
    (r"\.downsamplers\.0\.", ".downsample."),
    (r"\.upsamplers\.0\.", ".upsample."),
    (r"\.mid_block\.resnets\.0\.", ".mid.resnet_1."),
    (r"\.mid_block\.attentions\.0\.", ".mid.attention."),
    (r"\.mid_block\.resnets\.1\.", ".mid.resnet_2."),
    (r"\.to_out\.0\.", ".to_out."),
    (r"\.conv_norm_out\.", ".norm_out."),
]


def vae_config_from_diffusers(config):
    """Our `VAEConfig` from an `AutoencoderKL.config`; refuse what we do not build."""
    from sdscratch.vae import VAEConfig

    expected = {
        "act_fn": "silu",
        "down_block_types": ("DownEncoderBlock2D",) * len(config.block_out_channels),
        "up_block_types": ("UpDecoderBlock2D",) * len(config.block_out_channels),
        "mid_block_add_attention": True,
        "use_quant_conv": True,
        "use_post_quant_conv": True,
    }
    for key, value in expected.items():
        got = config.get(key, value)
        if (tuple(got) if isinstance(got, list) else got) != value:
            raise ValueError(f"AutoencoderKL with {key}={got!r} is not SD's layout.")
    if config.in_channels != config.out_channels:
        raise ValueError("AutoencoderKL with in_channels != out_channels is not SD's.")
    return VAEConfig(
        in_channels=config.in_channels,
        latent_channels=config.latent_channels,
        block_out_channels=tuple(config.block_out_channels),
        layers_per_block=config.layers_per_block,
        norm_num_groups=config.norm_num_groups,
        scaling_factor=config.scaling_factor,
    )


def vae_state_dict_from_diffusers(state: dict) -> dict:
    """Rename an `AutoencoderKL` state dict into `VAE`'s names (tensors shared)."""
    renamed = {}
    for name, tensor in state.items():
        ours = "." + name
        for pattern, replacement in VAE_RENAMES:
            ours = re.sub(pattern, replacement, ours)
        renamed[ours[1:]] = tensor
    return renamed


def vae_from_diffusers(model):
    """Our `VAE` with the weights of a diffusers `AutoencoderKL`.

    Args:
        model: a `diffusers.AutoencoderKL` (SD v1's, or any with its layout).
    Returns:
        a `sdscratch.vae.VAE` in eval mode, float32, on the CPU, whose `encode` and
        `decode` equal the reference's.
    """
    from sdscratch.vae import VAE

    vae = VAE(vae_config_from_diffusers(model.config))
    state = vae_state_dict_from_diffusers(model.state_dict())
    state = {name: tensor.detach().float().cpu() for name, tensor in state.items()}
    vae.load_state_dict(state, strict=True)
    return vae.eval()


# ---------------------------------------------------------------------------------
# The text encoder: transformers' CLIPTextModel -> sdscratch.clip.TextEncoder
# ---------------------------------------------------------------------------------

TEXT_ENCODER_RENAMES = {  # transformers name (prefix): sdscratch name
    # CLIPTextModelWithProjection (and CLIPTextModel before transformers 5) nest the
    # transformer in `text_model`; ours is flat, like CLIPTextModel in transformers 5.
    "text_model.": "",
}
# Dropped: `embeddings.position_ids`, a buffer holding 0..L-1 (not a weight).


def text_encoder_config_from_transformers(config, projection=False):
    """Our `TextEncoderConfig` from a transformers `CLIPTextConfig`.

    Args:
        config: the reference's config.
        projection: keep `projection_dim` (for `CLIPTextModelWithProjection`).
    """
    from sdscratch.clip import ACTIVATIONS, TextEncoderConfig

    if config.hidden_act not in ACTIVATIONS:
        act = config.hidden_act
        raise ValueError(f"sdscratch cannot port a text encoder with {act}.")
    # transformers configs from before its PR #24773 (SD v1.5's among them) say
    # eos_token_id=2, which transformers reads as "pool at the highest id".
    eos = None if config.eos_token_id == 2 else config.eos_token_id
    return TextEncoderConfig(
        vocab_size=config.vocab_size,
        max_position_embeddings=config.max_position_embeddings,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        hidden_act=config.hidden_act,
        layer_norm_eps=config.layer_norm_eps,
        eos_token_id=eos,
        projection_dim=config.projection_dim if projection else 0,
    )


def text_encoder_from_transformers(model):
    """Port a transformers `CLIPTextModel` into an equal sdscratch `TextEncoder`.

    Args:
        model: a `CLIPTextModel` (e.g. SD v1.5's `text_encoder`), or a
            `CLIPTextModelWithProjection` (its `text_projection` comes along).
    Returns:
        A `TextEncoder` in eval mode with the same weights, dtype and device.
    """
    from sdscratch.clip import TextEncoder

    parameter = next(model.parameters())
    projection = hasattr(model, "text_projection")
    config = text_encoder_config_from_transformers(model.config, projection)
    with torch.device("meta"):
        text_encoder = TextEncoder(config)
    state = {}
    for key, value in model.state_dict().items():
        if key.endswith("position_ids"):
            continue
        for old, new in TEXT_ENCODER_RENAMES.items():
            key = new + key.removeprefix(old) if key.startswith(old) else key
        state[key] = value.clone()  # a copy, not a view of the reference's weights
    text_encoder.load_state_dict(state, strict=True, assign=True)
    return text_encoder.to(parameter.device, parameter.dtype).eval()
