"""Our pipeline in diffusers' classes: `StableDiffusion.to_diffusers()`.

The reverse of `sdscratch.port`: our parameter names go back into diffusers' and
transformers' through the same tables, into models built from the matching configs,
so a learner can move on to the ecosystem (or check us against it) with the weights
they trained or loaded here.
"""

import tempfile

from sdscratch import port


def unet_config_to_diffusers(config) -> dict:
    """The `UNet2DConditionModel` config of our `UNetConfig`."""
    down = ["CrossAttnDownBlock2D" if a else "DownBlock2D"
            for a in config.attention_levels]  # fmt: skip
    up = ["CrossAttnUpBlock2D" if a else "UpBlock2D"
          for a in reversed(config.attention_levels)]  # fmt: skip
    mid = "UNetMidBlock2DCrossAttn" if config.mid_attention else "UNetMidBlock2D"
    return dict(
        sample_size=config.sample_size,
        in_channels=config.in_channels,
        out_channels=config.out_channels,
        block_out_channels=tuple(config.block_out_channels),
        layers_per_block=config.layers_per_block,
        down_block_types=tuple(down),
        up_block_types=tuple(up),
        mid_block_type=mid,
        cross_attention_dim=config.cross_attention_dim or 1280,
        attention_head_dim=config.num_heads,  # diffusers' name for SD v1's heads
        norm_num_groups=config.norm_num_groups,
        use_linear_projection=config.projection == "linear",
    )


def vae_config_to_diffusers(config) -> dict:
    """The `AutoencoderKL` config of our `VAEConfig`."""
    levels = len(config.block_out_channels)
    return dict(
        in_channels=config.in_channels,
        out_channels=config.in_channels,
        latent_channels=config.latent_channels,
        block_out_channels=tuple(config.block_out_channels),
        layers_per_block=config.layers_per_block,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        norm_num_groups=config.norm_num_groups,
        scaling_factor=config.scaling_factor,
        sample_size=config.sample_size,
    )


def text_encoder_config_to_transformers(config, tokenizer):
    """The transformers `CLIPTextConfig` of our `TextEncoderConfig`."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=config.vocab_size,
        max_position_embeddings=config.max_position_embeddings,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        hidden_act=config.hidden_act,
        layer_norm_eps=config.layer_norm_eps,
        bos_token_id=tokenizer.bos_id,
        pad_token_id=tokenizer.pad_id,
        eos_token_id=2 if config.eos_token_id is None else config.eos_token_id,
    )


def to_diffusers(pipe):
    """A diffusers `StableDiffusionPipeline` with `pipe`'s weights, tokenizer and
    schedule (DDIMScheduler with SD's settings), on `pipe`'s device and dtype.

    Args:
        pipe: a `sdscratch.pipeline.StableDiffusion`.
    Returns:
        The diffusers pipeline (safety_checker=None, no feature extractor).
    """
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextModel, CLIPTokenizer

    unet_config = unet_config_to_diffusers(pipe.unet.config)
    unet = port.build_on_meta(
        lambda: UNet2DConditionModel(**unet_config),
        port.unet_state_dict_to_diffusers(pipe.unet.state_dict()),
    )
    vae_config = vae_config_to_diffusers(pipe.vae.config)
    vae = port.build_on_meta(
        lambda: AutoencoderKL(**vae_config),
        port.vae_state_dict_to_diffusers(pipe.vae.state_dict()),
    )
    text_config = text_encoder_config_to_transformers(
        pipe.text_encoder.config, pipe.tokenizer
    )
    text_encoder = CLIPTextModel(text_config).to(pipe.dtype)  # not meta: position_ids
    state = pipe.text_encoder.state_dict()
    state.pop("text_projection.weight", None)  # CLIP's joint space: not SD's
    prefix = "text_model." if hasattr(text_encoder, "text_model") else ""
    state = {prefix + key: value.detach().clone() for key, value in state.items()}
    result = text_encoder.load_state_dict(state, strict=False)  # position_ids: its own
    missing = [key for key in result.missing_keys if "position_ids" not in key]
    if missing or result.unexpected_keys:
        wrong = missing + result.unexpected_keys
        raise RuntimeError(f"The ported text encoder does not fit: {wrong}.")
    with tempfile.TemporaryDirectory() as folder:
        folder = pipe.tokenizer.save_pretrained(folder)
        tokenizer = CLIPTokenizer.from_pretrained(folder)
    scheduler = DDIMScheduler(**pipe.schedule.scheduler_config())
    reference = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=scheduler, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )  # fmt: skip
    return reference.to(pipe.device)  # the dtype: that of our tensors
