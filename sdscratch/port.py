"""Weights of the reference implementations (diffusers, transformers) in our models.

Each model has its own section: a short table that renames the reference's
parameters into ours (none for the autoencoder, which has diffusers' names), and a
`<model>_from_<library>` function that builds our model from the reference's config
and loads the renamed weights strictly (every tensor used, none missing).
Equal outputs then prove the architectures are the same.
"""

import torch

# ---------------------------------------------------------------------------------
# The autoencoder: diffusers' AutoencoderKL -> sdscratch.vae.VAE
# ---------------------------------------------------------------------------------

# No table: `VAE` uses AutoencoderKL's own parameter names, so the autoencoder's
# weights load as they are ("decoder.mid_block.attentions.0.to_q.weight" in both).

# AutoencoderKL's defaults for what older config.json files leave out (SD v1.5's,
# written by diffusers 0.6, has no scaling_factor).
VAE_DEFAULTS = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 1,
    "norm_num_groups": 32,
    "scaling_factor": 0.18215,
}


def rename_parts(name: str, table: dict, reverse=False) -> str:
    """Rename whole dotted parts of a parameter name by `table` (old: new).

    "attn1.to_out.0.weight" -> "attn1.to_out.weight" (`UNET_RENAMES`);
    `reverse=True` goes back (new: old). "to_out.0" never matches "to_out.01".
    """
    pairs = [(new, old) if reverse else (old, new) for old, new in table.items()]
    name = f".{name}."
    for old, new in pairs:
        name = name.replace(f".{old}.", f".{new}.")
    return name[1:-1]


def build_on_meta(make, state: dict, like=None):
    """`make()` on the meta device (no memory, no random initialisation), then
    given copies of `state`'s tensors (strictly: every one used, none missing).

    Args:
        make: builds the empty model, e.g. `lambda: UNet(config)`.
        like: a tensor whose device and dtype the model takes (None: state's own).
    Returns:
        The model in eval mode.
    """
    with torch.device("meta"):
        model = make()
    state = {key: value.detach().clone() for key, value in state.items()}  # copies
    model.load_state_dict(state, strict=True, assign=True)
    if like is not None:
        model = model.to(like.device, like.dtype)
    return model.eval()


def vae_config_from_diffusers(config):
    """Our `VAEConfig` from an `AutoencoderKL.config` (or its config.json as a dict);
    refuse what we do not build."""
    from sdscratch.vae import VAEConfig

    config = VAE_DEFAULTS | dict(config)
    levels = len(config["block_out_channels"])
    expected = {
        "act_fn": "silu",
        "down_block_types": ("DownEncoderBlock2D",) * levels,
        "up_block_types": ("UpDecoderBlock2D",) * levels,
        "mid_block_add_attention": True,
        "use_quant_conv": True,
        "use_post_quant_conv": True,
    }
    for key, value in expected.items():
        got = config.get(key, value)
        if (tuple(got) if isinstance(got, list) else got) != value:
            raise ValueError(f"AutoencoderKL with {key}={got!r} is not SD's layout.")
    if config["in_channels"] != config["out_channels"]:
        raise ValueError("AutoencoderKL with in_channels != out_channels is not SD's.")
    return VAEConfig(
        in_channels=config["in_channels"],
        latent_channels=config["latent_channels"],
        block_out_channels=tuple(config["block_out_channels"]),
        layers_per_block=config["layers_per_block"],
        norm_num_groups=config["norm_num_groups"],
        scaling_factor=config["scaling_factor"],
        sample_size=_side(config.get("sample_size", 32)),
    )


def _side(sample_size) -> int:
    """diffusers' sample_size: an int, or (height, width) of a square."""
    if isinstance(sample_size, (list, tuple)):
        return int(sample_size[0])
    return int(sample_size)


def vae_state_dict_from_diffusers(state: dict) -> dict:
    """An `AutoencoderKL` state dict as `VAE`'s: the same names (tensors shared)."""
    return dict(state)


def vae_state_dict_to_diffusers(state: dict) -> dict:
    """`VAE`'s state dict as `AutoencoderKL`'s: the same names (tensors shared)."""
    return dict(state)


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
    """Our `TextEncoderConfig` from a transformers `CLIPTextConfig` (or its
    config.json as a dict).

    Args:
        config: the reference's config.
        projection: keep `projection_dim` (for `CLIPTextModelWithProjection`).
    """
    from sdscratch.clip import ACTIVATIONS, TextEncoderConfig

    config = config if isinstance(config, dict) else config.to_dict()
    if config["hidden_act"] not in ACTIVATIONS:
        act = config["hidden_act"]
        raise ValueError(f"sdscratch cannot port a text encoder with {act}.")
    # transformers configs from before its PR #24773 (SD v1.5's among them) say
    # eos_token_id=2, which transformers reads as "pool at the highest id".
    eos = config.get("eos_token_id", 2)
    fields = ("vocab_size", "max_position_embeddings", "hidden_size",
              "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "hidden_act", "layer_norm_eps")  # fmt: skip
    return TextEncoderConfig(
        **{field: config[field] for field in fields},
        eos_token_id=None if eos == 2 else eos,
        projection_dim=config["projection_dim"] if projection else 0,
    )


def text_encoder_state_dict_from_transformers(state: dict) -> dict:
    """Rename a `CLIPTextModel` state dict (nested in `text_model.` or flat) into
    `TextEncoder`'s names; the `position_ids` buffer is dropped (tensors shared)."""
    renamed = {}
    for key, value in state.items():
        if key.endswith("position_ids"):
            continue
        for old, new in TEXT_ENCODER_RENAMES.items():
            key = new + key.removeprefix(old) if key.startswith(old) else key
        renamed[key] = value
    return renamed


def text_encoder_from_transformers(model):
    """Port a transformers `CLIPTextModel` into an equal sdscratch `TextEncoder`.

    Args:
        model: a `CLIPTextModel` (e.g. SD v1.5's `text_encoder`), or a
            `CLIPTextModelWithProjection` (its `text_projection` comes along).
    Returns:
        A `TextEncoder` in eval mode with the same weights, dtype and device.
    """
    from sdscratch.clip import TextEncoder

    projection = hasattr(model, "text_projection")
    config = text_encoder_config_from_transformers(model.config, projection)
    state = text_encoder_state_dict_from_transformers(model.state_dict())
    return build_on_meta(
        lambda: TextEncoder(config), state, like=next(model.parameters())
    )


# ---------------------------------------------------------------------------------
# The UNet: diffusers' UNet2DConditionModel -> sdscratch.unet.UNet
# ---------------------------------------------------------------------------------

UNET_RENAMES = {  # diffusers name: sdscratch name
    "to_out.0": "to_out",  # diffusers: a list [Linear, Dropout]
    "ff.net.0.proj": "ff.geglu.proj",  # diffusers: ff.net = [GEGLU, Dropout, Linear]
    "ff.net.2": "ff.out",
    "downsamplers.0": "downsample",  # diffusers: a list holding one module
    "upsamplers.0": "upsample",
}

UNET_FIXED = {  # diffusers options that SD v1 (and sdscratch) keep at these values
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "center_input_sample": False,
    "act_fn": "silu",
    "norm_eps": 1e-5,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "transformer_layers_per_block": 1,
    "only_cross_attention": False,
    "dual_cross_attention": False,
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "timestep_post_act": None,
    "time_cond_proj_dim": None,
    "class_embed_type": None,
    "num_class_embeds": None,
    "addition_embed_type": None,
    "encoder_hid_dim": None,
    "resnet_time_scale_shift": "default",
    "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "attention_type": "default",
    "cross_attention_norm": None,
}


def unet_config_from_diffusers(config):
    """The `UNetConfig` of a diffusers `UNet2DConditionModel` config (a dict)."""
    from sdscratch.unet import UNetConfig

    config = dict(config)
    _require(config, UNET_FIXED, "UNet")
    down, up = list(config["down_block_types"]), list(config["up_block_types"])
    attention = [kind == "CrossAttnDownBlock2D" for kind in down]
    mirrored = ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)]
    known = {"CrossAttnDownBlock2D", "DownBlock2D"}
    if set(down) - known or up != mirrored:
        raise ValueError(f"sdscratch cannot port blocks {down} / {up}.")
    mid = config.get("mid_block_type", "UNetMidBlock2DCrossAttn")
    if mid not in ("UNetMidBlock2DCrossAttn", "UNetMidBlock2D"):
        raise ValueError(f"sdscratch cannot port a mid block {mid!r}.")
    mid_attention = mid == "UNetMidBlock2DCrossAttn"
    # diffusers' attention_head_dim is, for SD v1, really the number of heads.
    heads = config.get("num_attention_heads") or config["attention_head_dim"]
    cross = config["cross_attention_dim"]
    return UNetConfig(
        in_channels=config["in_channels"],
        out_channels=config["out_channels"],
        sample_size=config["sample_size"],
        block_out_channels=tuple(config["block_out_channels"]),
        layers_per_block=_same(config["layers_per_block"], "layers_per_block"),
        attention_levels=tuple(attention),
        mid_attention=mid_attention,
        cross_attention_dim=_same(cross, "cross_attention_dim")
        if any(attention) or mid_attention
        else None,
        num_heads=_same(heads, "heads"),
        norm_num_groups=config["norm_num_groups"],
        projection="linear" if config.get("use_linear_projection") else "conv",
    )


def unet_state_dict_from_diffusers(state: dict) -> dict:
    """Rename a `UNet2DConditionModel` state dict into `UNet`'s names (tensors shared).

    Renames whole dotted parts: "attn1.to_out.0.weight" -> "attn1.to_out.weight".
    """
    return {rename_parts(name, UNET_RENAMES): tensor for name, tensor in state.items()}


def unet_state_dict_to_diffusers(state: dict) -> dict:
    """`UNet`'s state dict in `UNet2DConditionModel`'s names (tensors shared)."""
    return {rename_parts(k, UNET_RENAMES, reverse=True): v for k, v in state.items()}


def unet_from_diffusers(model):
    """Port a diffusers `UNet2DConditionModel` into an equal sdscratch `UNet`.

    Args:
        model: the diffusers model (e.g. `UNet2DConditionModel.from_pretrained(
            "stable-diffusion-v1-5/stable-diffusion-v1-5", subfolder="unet")`).
    Returns:
        A `UNet` in eval mode with the same weights, dtype and device.
    """
    from sdscratch.unet import UNet

    config = unet_config_from_diffusers(model.config)
    state = unet_state_dict_from_diffusers(model.state_dict())
    return build_on_meta(lambda: UNet(config), state, like=next(model.parameters()))


def _require(config, expected, what):
    """Refuse a reference config with options sdscratch does not build."""
    wrong = {
        key: config.get(key)
        for key, value in expected.items()
        if config.get(key, value) != value
    }
    if wrong:
        raise ValueError(f"sdscratch cannot port a {what} with {wrong}.")


def _same(value, name):
    """One value for all levels: an int, or a list/tuple of equal ints."""
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise ValueError(f"sdscratch uses one {name} for all levels, got {value}.")
        value = value[0]
    return value


# ---------------------------------------------------------------------------------
# The ControlNet: diffusers' ControlNetModel <-> sdscratch.controlnet.ControlNet
# ---------------------------------------------------------------------------------

CONTROLNET_RENAMES = UNET_RENAMES | {  # the UNet's renames, and three plainer names
    "controlnet_cond_embedding": "hint_encoder",
    "controlnet_down_blocks": "zero_convs",
    "controlnet_mid_block": "mid_zero_conv",
}

CONTROLNET_FIXED = {  # ControlNetModel options that sdscratch keeps at these values
    "controlnet_conditioning_channel_order": "rgb",
    "global_pool_conditions": False,
}


def controlnet_config_from_diffusers(config):
    """Our `ControlNetConfig` from a diffusers `ControlNetModel` config (a dict):
    the UNet's fields as `unet_config_from_diffusers` reads them (the up blocks
    mirror the down blocks), plus the hint encoder's."""
    import dataclasses

    from sdscratch.controlnet import ControlNetConfig
    from sdscratch.unet import UNetConfig

    config = dict(config)
    _require(config, CONTROLNET_FIXED, "ControlNet")
    down = list(config["down_block_types"])
    up = ["CrossAttnUpBlock2D" if kind == "CrossAttnDownBlock2D" else "UpBlock2D"
          for kind in reversed(down)]  # fmt: skip
    config.setdefault("sample_size", UNetConfig.sample_size)  # (unused)
    unet = unet_config_from_diffusers(
        config | {"up_block_types": up, "out_channels": config["in_channels"]}
    )
    hint = config.get("conditioning_embedding_out_channels") or (16, 32, 96, 256)
    return ControlNetConfig(
        **dataclasses.asdict(unet),
        conditioning_channels=config.get("conditioning_channels", 3),
        conditioning_embedding_out_channels=tuple(hint),
    )


def controlnet_state_dict_from_diffusers(state: dict) -> dict:
    """Rename a `ControlNetModel` state dict into `ControlNet`'s names (tensors
    shared): "controlnet_down_blocks.3.weight" -> "zero_convs.3.weight"."""
    return {rename_parts(k, CONTROLNET_RENAMES): v for k, v in state.items()}


def controlnet_state_dict_to_diffusers(state: dict) -> dict:
    """`ControlNet`'s state dict in `ControlNetModel`'s names (tensors shared)."""
    return {rename_parts(k, CONTROLNET_RENAMES, reverse=True): v
            for k, v in state.items()}  # fmt: skip


def controlnet_from_diffusers(model):
    """Port a diffusers `ControlNetModel` into an equal sdscratch `ControlNet`.

    Args:
        model: the diffusers model (e.g. `ControlNetModel.from_pretrained(
            "lllyasviel/sd-controlnet-canny")`).
    Returns:
        A `ControlNet` in eval mode with the same weights, dtype and device.
    """
    from sdscratch.controlnet import ControlNet

    config = controlnet_config_from_diffusers(model.config)
    state = controlnet_state_dict_from_diffusers(model.state_dict())
    return build_on_meta(
        lambda: ControlNet(config), state, like=next(model.parameters())
    )


def controlnet_to_diffusers(controlnet):
    """A diffusers `ControlNetModel` holding copies of a `ControlNet`'s weights."""
    from diffusers import ControlNetModel

    from sdscratch.export import unet_config_to_diffusers

    c = controlnet.config
    config = unet_config_to_diffusers(c)
    for unused in ("sample_size", "out_channels", "up_block_types"):
        del config[unused]
    config |= dict(
        conditioning_channels=c.conditioning_channels,
        conditioning_embedding_out_channels=tuple(
            c.conditioning_embedding_out_channels
        ),
    )
    state = controlnet_state_dict_to_diffusers(controlnet.state_dict())
    return build_on_meta(lambda: ControlNetModel(**config), state)
