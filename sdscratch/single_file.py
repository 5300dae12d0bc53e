"""Single-file checkpoints: the CompVis/A1111 layout most Stable Diffusion users have.

`v1-5-pruned-emaonly.safetensors` holds the three models of CompVis's original
code in one file, under its names: the UNet under `model.diffusion_model.`
(`input_blocks.N.M`, `middle_block.N`, `output_blocks.N.M`), the autoencoder under
`first_stage_model.` (with its attention's projections stored as 1×1
convolutions), the text encoder under `cond_stage_model.transformer.` (transformers'
names). The tables below go from diffusers' names (which `sdscratch.port` maps to
ours) to CompVis's, computed from the config like diffusers' own converter
(`diffusers.loaders.single_file_utils`) reads them, so any size works.
"""

import dataclasses
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from sdscratch import port
from sdscratch.checkpoint import CheckpointError
from sdscratch.loading import (
    DEFAULT_REPO,
    PICKLES,
    download,
    read_settings,
    schedule_from_config,
)
from sdscratch.tensorfile import DamagedFile, build, read_header

UNET, VAE, TEXT = "model.diffusion_model.", "first_stage_model.", "cond_stage_model."
TEXT_PREFIXES = (
    "cond_stage_model.transformer.text_model.",
    "cond_stage_model.transformer.",
)  # older files lack "text_model."
# Buffers of CompVis's LatentDiffusion (the DDPM schedule, EMA bookkeeping) that
# full checkpoints carry next to the weights; not parameters of the three models.
IGNORED = {
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod", "posterior_variance",
    "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
    "logvar", "model_ema.decay", "model_ema.num_updates",
}  # fmt: skip
UNET_RESNET = {  # diffusers ResnetBlock2D part: CompVis ResBlock part
    "norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0",
    "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}  # fmt: skip
VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v",
                 "to_out.0": "proj_out"}  # fmt: skip
METADATA = "sdscratch"  # the metadata key holding our configs, tokenizer, schedule


# ----------------------------------------------------------------------------------
# The tables: (diffusers prefix, CompVis prefix, renames inside)


def unet_prefixes(config) -> list:
    """The UNet's prefix table for `config` (a `UNetConfig`): CompVis numbers the
    blocks in one row, input_blocks.0 being conv_in; each level has L resnets (and
    attentions) and a downsampler; each up level L + 1 resnets and an upsampler."""
    n, levels = config.layers_per_block, len(config.block_out_channels)
    table = [("time_embedding.linear_1.", "time_embed.0.", {}),
             ("time_embedding.linear_2.", "time_embed.2.", {}),
             ("conv_in.", "input_blocks.0.0.", {}), ("conv_norm_out.", "out.0.", {}),
             ("conv_out.", "out.2.", {})]  # fmt: skip
    for i in range(levels):
        for j in range(n):
            block = 1 + i * (n + 1) + j
            table += [(f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{block}.0.",
                       UNET_RESNET),
                      (f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{block}.1.",
                       {})]  # fmt: skip
        if i < levels - 1:
            table.append(
                (
                    f"down_blocks.{i}.downsamplers.0.conv.",
                    f"input_blocks.{(i + 1) * (n + 1)}.0.op.",
                    {},
                )
            )
    table += [("mid_block.resnets.0.", "middle_block.0.", UNET_RESNET),
              ("mid_block.attentions.0.", "middle_block.1.", {}),
              ("mid_block.resnets.1.", "middle_block.2.", UNET_RESNET)]  # fmt: skip
    up_attention = list(reversed(config.attention_levels))
    for i in range(levels):
        for j in range(n + 1):
            block = i * (n + 1) + j
            table += [(f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{block}.0.",
                       UNET_RESNET),
                      (f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{block}.1.",
                       {})]  # fmt: skip
        if i < levels - 1:
            slot = 2 if up_attention[i] else 1
            table.append(
                (
                    f"up_blocks.{i}.upsamplers.0.conv.",
                    f"output_blocks.{i * (n + 1) + n}.{slot}.conv.",
                    {},
                )
            )
    return table


def vae_prefixes(config) -> list:
    """The autoencoder's prefix table: CompVis numbers the decoder's levels from
    the latent's end (up.0 is the last, largest one)."""
    n, levels = config.layers_per_block, len(config.block_out_channels)
    table = [("encoder.conv_norm_out.", "encoder.norm_out.", {}),
             ("decoder.conv_norm_out.", "decoder.norm_out.", {})]  # fmt: skip
    for i in range(levels):
        table += [
            (
                f"encoder.down_blocks.{i}.resnets.{j}.",
                f"encoder.down.{i}.block.{j}.",
                VAE_RESNET,
            )
            for j in range(n)
        ]
        table += [(f"decoder.up_blocks.{i}.resnets.{j}.",
                   f"decoder.up.{levels - 1 - i}.block.{j}.", VAE_RESNET)
                  for j in range(n + 1)]  # fmt: skip
        table += [(f"encoder.down_blocks.{i}.downsamplers.0.",
                   f"encoder.down.{i}.downsample.", {}),
                  (f"decoder.up_blocks.{i}.upsamplers.0.",
                   f"decoder.up.{levels - 1 - i}.upsample.", {})]  # fmt: skip
    for part in ("encoder", "decoder"):
        table += [(f"{part}.mid_block.resnets.0.", f"{part}.mid.block_1.", VAE_RESNET),
                  (f"{part}.mid_block.resnets.1.", f"{part}.mid.block_2.", VAE_RESNET),
                  (f"{part}.mid_block.attentions.0.", f"{part}.mid.attn_1.",
                   VAE_ATTENTION)]  # fmt: skip
    return table


def _through(key: str, table: list) -> str:
    """A diffusers key in CompVis's names (unlisted keys keep their name)."""
    for diffusers, compvis, inside in table:
        if key.startswith(diffusers):
            return compvis + port.rename_parts(key[len(diffusers) :], inside)
    return key


def compvis_names(pipe_parts) -> dict:
    """{(component, our key): CompVis key} for a unet, vae and text_encoder."""
    unet, vae, text = pipe_parts["unet"], pipe_parts["vae"], pipe_parts["text_encoder"]
    if not unet.config.mid_attention:
        raise ValueError(
            "A single file holds SD v1's layout, whose UNet has "
            "attention in its mid block; this one has none."
        )
    names = {}
    unet_table, vae_table = unet_prefixes(unet.config), vae_prefixes(vae.config)
    for key in unet.state_dict():
        diffusers = port.rename_parts(key, port.UNET_RENAMES, reverse=True)
        names["unet", key] = UNET + _through(diffusers, unet_table)
    for key in vae.state_dict():  # our VAE's names are diffusers'
        names["vae", key] = VAE + _through(key, vae_table)
    for key in text.state_dict():
        if key != "text_projection.weight":  # CLIP's joint space: not SD's
            names["text_encoder", key] = TEXT_PREFIXES[0] + key
    return names


def _is_conv_attention(compvis_key: str) -> bool:
    """The VAE attention projections CompVis stores as 1×1 convolutions."""
    parts = compvis_key.split(".")
    return (
        ".mid.attn_1." in compvis_key
        and parts[-2] in ("q", "k", "v", "proj_out")
        and parts[-1] == "weight"
    )


# ----------------------------------------------------------------------------------
# Writing


def write_single_file(pipe, path, dtype=None) -> Path:
    """Write `pipe`'s three models into one CompVis-layout safetensors file, with
    our configs, tokenizer and scheduler config in its metadata."""
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise ValueError(f"Cannot write {path}: give a file name ending .safetensors.")
    parts = {"unet": pipe.unet, "vae": pipe.vae, "text_encoder": pipe.text_encoder}
    states = {name: model.state_dict() for name, model in parts.items()}
    tensors = {}
    for (component, key), compvis in compvis_names(parts).items():
        tensor = states[component][key].detach().cpu()
        tensor = tensor.to(dtype) if dtype and tensor.is_floating_point() else tensor
        if _is_conv_attention(compvis):
            tensor = tensor[:, :, None, None]  # (C, C) -> (C, C, 1, 1)
        tensors[compvis] = tensor.contiguous()
    configs = {name: dataclasses.asdict(model.config) for name, model in parts.items()}
    configs["text_encoder"]["projection_dim"] = 0
    tokenizer = pipe.tokenizer
    record = {
        "configs": configs,
        "tokenizer": {"vocab": tokenizer.vocab, "merges": tokenizer.merges,
                      "context_length": tokenizer.context_length,
                      "pad_token": tokenizer.pad_token,
                      # textual-inversion tokens, in the order of their ids
                      "added_tokens": sorted(tokenizer.added_tokens,
                                             key=tokenizer.added_tokens.get)},
        "scheduler": pipe.schedule.scheduler_config(),
    }  # fmt: skip
    metadata = {"format": "pt", METADATA: json.dumps(record)}
    save_file(tensors, str(path), metadata=metadata)
    return path


# ----------------------------------------------------------------------------------
# Reading


def read_single_file(path, dtype=torch.float32, config=None, extract_ema=False):
    """Our unet, vae, text_encoder and tokenizer, and the schedule, from one file.

    Args:
        path: a CompVis-layout `.safetensors` file.
        dtype: the models' dtype.
        config: where the configs, tokenizer and scheduler come from: a folder
            (diffusers' or ours) or a Hub repo id. Default: the file's own metadata
            (written by `write_single_file`), else SD v1's configs with the sizes
            read from the tensors' shapes and SD v1.5's tokenizer from the Hub.
        extract_ema: take the UNet from a full file's `model_ema.` weights.
    Returns:
        ({"unet", "vae", "text_encoder", "tokenizer"}, NoiseSchedule)
    """
    from sdscratch.clip import TextEncoder
    from sdscratch.unet import UNet
    from sdscratch.vae import VAE

    path = _checked_path(path)
    keys, shapes, metadata = _header(path)
    configs, tokenizer, schedule = _settings(path, shapes, metadata, config)
    classes = {"unet": UNet, "vae": VAE, "text_encoder": TextEncoder}
    with torch.device("meta"):
        models = {name: classes[name](configs[name]) for name in classes}
    sources = _sources(path, keys, compvis_names(models), extract_ema)
    tokenizer = tokenizer or _sd15_tokenizer(path)  # after the checks: no download
    parts = {
        name: build(classes[name], configs[name], path, sources[name], dtype, True)
        for name in classes
    }
    return parts | {"tokenizer": tokenizer}, schedule


def _checked_path(path) -> Path:
    path = Path(path).expanduser()
    if path.suffix.lower() in PICKLES:
        raise CheckpointError(
            f"{path} is a pickle ({path.suffix}), which can run code when loaded; "
            "sdscratch reads only .safetensors weights."
        )
    if not path.is_file():
        raise CheckpointError(f"No checkpoint {str(path)!r}: no such file.")
    if path.suffix.lower() != ".safetensors":
        raise CheckpointError(f"{path} is not a .safetensors file.")
    return path


def _header(path: Path) -> tuple:
    """The file's keys, their shapes, and its metadata, without reading tensors."""
    try:
        header, metadata, _ = read_header(path)
    except (DamagedFile, KeyError, TypeError, ValueError, OSError):
        raise CheckpointError(
            f"{path} is not a readable safetensors file (truncated or damaged?)."
        ) from None
    shapes = {key: tuple(info["shape"]) for key, info in header.items()}
    return list(header), shapes, metadata


def _sources(path, keys, names, extract_ema) -> dict:
    """{component: {file key: our key}}, every file key known or one sentence."""
    present = set(keys)
    text_prefix = next(
        (p for p in TEXT_PREFIXES if any(k.startswith(p) for k in keys)),
        TEXT_PREFIXES[0],
    )
    ema = extract_ema and sum(key.startswith("model_ema.") for key in keys) > 100
    sources, used = {"unet": {}, "vae": {}, "text_encoder": {}}, set()
    for (component, ours), compvis in names.items():
        compvis = compvis.replace(TEXT_PREFIXES[0], text_prefix, 1)
        used.add(compvis)
        if ema and component == "unet":  # diffusers' flat EMA names
            compvis = "model_ema." + "".join(compvis.split(".")[1:])
        if compvis not in present:
            raise CheckpointError(
                f"{path} lacks {compvis!r}: it is not a Stable Diffusion v1 single "
                "file of this size."
            )
        sources[component][compvis] = ours
    unknown = [
        key for key in keys
        if key not in used and key not in IGNORED and not key.startswith("model_ema.")
        and not key.endswith("position_ids")
    ]  # fmt: skip
    if unknown:
        raise CheckpointError(
            f"{path} holds {len(unknown)} tensors that are not Stable Diffusion v1's, "
            f"e.g. {unknown[0]!r}."
        )
    return sources


# ----------------------------------------------------------------------------------
# Settings a single file may not hold: configs, tokenizer, schedule


def _settings(path, shapes, metadata, config) -> tuple:
    """(configs, tokenizer, schedule): from `config`, the file's metadata, or
    inferred as SD v1's from the tensors' shapes (tokenizer None: SD v1.5's)."""
    from sdscratch.schedules import NoiseSchedule

    if config is not None:
        return read_settings(config)
    if METADATA in metadata:
        return _from_metadata(path, metadata[METADATA])
    return infer_configs(path, shapes), None, NoiseSchedule.scaled_linear()


def _from_metadata(path, text) -> tuple:
    """What `write_single_file` stored: our configs, tokenizer and scheduler."""
    from sdscratch.clip import TextEncoderConfig
    from sdscratch.tokenizer import Tokenizer
    from sdscratch.unet import UNetConfig
    from sdscratch.vae import VAEConfig

    classes = {"unet": UNetConfig, "vae": VAEConfig, "text_encoder": TextEncoderConfig}
    try:
        record = json.loads(text)
        configs = {
            name: cls(**{key: tuple(value) if isinstance(value, list) else value
                         for key, value in record["configs"][name].items()})
            for name, cls in classes.items()
        }  # fmt: skip
        words = record["tokenizer"]
        tokenizer = Tokenizer(
            words["vocab"], words["merges"], words["context_length"], words["pad_token"]
        )
        tokenizer.add_tokens(words.get("added_tokens", []))
    except (json.JSONDecodeError, KeyError, TypeError):
        raise CheckpointError(f"{path}: its sdscratch metadata is damaged.") from None
    return configs, tokenizer, schedule_from_config(record["scheduler"], path)


def _sd15_tokenizer(path):
    """SD v1.5's tokenizer (CLIP's vocabulary) from the Hub: CompVis files hold none."""
    from sdscratch.tokenizer import Tokenizer

    try:
        folder = download(DEFAULT_REPO, files=["tokenizer/*.json", "tokenizer/*.txt"])
    except CheckpointError:
        raise CheckpointError(
            f"{path} holds no tokenizer and {DEFAULT_REPO}'s could not be "
            "downloaded; pass config= a diffusers SD v1.5 folder that has one."
        ) from None
    return Tokenizer.from_pretrained(folder / "tokenizer")


def _indices(shapes, prefix, suffix) -> list:
    """The sorted N of every key `prefix` N `suffix` (e.g. input_blocks.N.0.op)."""
    found = set()
    for key in shapes:
        if key.startswith(prefix) and key.endswith(suffix):
            middle = key[len(prefix) : len(key) - len(suffix)]
            found |= {int(middle)} if middle.isdigit() else set()
    return sorted(found)


def infer_configs(path, shapes) -> dict:
    """SD v1's configs, sizes read from the tensors' shapes (heads, groups and the
    latent scale are SD v1's constants: they leave no trace in the shapes)."""
    from sdscratch.clip import TextEncoderConfig
    from sdscratch.unet import UNetConfig
    from sdscratch.vae import VAEConfig

    def shape(key):
        if key not in shapes:
            raise CheckpointError(
                f"{path} lacks {key!r}: it is not a Stable Diffusion v1 single file."
            )
        return shapes[key]

    if any(key.startswith(("conditioner.", UNET + "label_emb.")) for key in shapes):
        raise CheckpointError(f"{path} is an SDXL checkpoint; sdscratch loads SD v1.x.")
    if any(key.startswith("cond_stage_model.model.") for key in shapes):
        raise CheckpointError(
            f"{path} is a Stable Diffusion 2.x checkpoint (OpenCLIP text encoder); "
            "sdscratch loads SD v1.x only."
        )
    u = UNET
    resnets = _indices(shapes, u + "input_blocks.", ".0.in_layers.0.weight")
    ops = _indices(shapes, u + "input_blocks.", ".0.op.weight")
    per_level = ops[0] if ops else len(resnets) + 1  # layers_per_block + 1
    levels = (max(resnets, default=0) + 1) // per_level
    firsts = [1 + i * per_level for i in range(levels)]
    unet = UNetConfig(
        in_channels=shape(u + "input_blocks.0.0.weight")[1],
        out_channels=shape(u + "out.2.weight")[0],
        block_out_channels=tuple(
            shape(u + f"input_blocks.{b}.0.out_layers.3.weight")[0] for b in firsts
        ),
        layers_per_block=per_level - 1,
        attention_levels=tuple(
            u + f"input_blocks.{b}.1.proj_in.weight" in shapes for b in firsts
        ),
        mid_attention=u + "middle_block.1.proj_in.weight" in shapes,
        cross_attention_dim=shape(
            u + "middle_block.1.transformer_blocks.0.attn2.to_k.weight"
        )[1],
    )
    v = VAE + "encoder."
    vae_levels = _indices(shapes, v + "down.", ".block.0.conv1.weight")
    vae = VAEConfig(
        in_channels=shape(v + "conv_in.weight")[1],
        latent_channels=shape(VAE + "quant_conv.weight")[0] // 2,
        block_out_channels=tuple(
            shape(v + f"down.{i}.block.0.conv1.weight")[0] for i in vae_levels
        ),
        layers_per_block=len(_indices(shapes, v + "down.0.block.", ".conv1.weight")),
        norm_num_groups=32,
        scaling_factor=0.18215,
        sample_size=unet.sample_size * 2 ** (len(vae_levels) - 1),
    )
    t = next((p for p in TEXT_PREFIXES if p + "final_layer_norm.weight" in shapes),
             TEXT_PREFIXES[0])  # fmt: skip
    vocab, hidden = shape(t + "embeddings.token_embedding.weight")
    text = TextEncoderConfig(
        vocab_size=vocab,
        max_position_embeddings=shape(t + "embeddings.position_embedding.weight")[0],
        hidden_size=hidden,
        intermediate_size=shape(t + "encoder.layers.0.mlp.fc1.weight")[0],
        num_hidden_layers=len(_indices(shapes, t + "encoder.layers.", ".mlp.fc1.bias")),
        num_attention_heads=hidden // 64,
        eos_token_id=None,  # SD v1.5's config: pool at the highest id
    )
    if unet.cross_attention_dim == 1024:
        raise CheckpointError(
            f"{path} is a Stable Diffusion 2.x checkpoint "
            "(cross-attention width 1024); sdscratch loads SD v1.x."
        )
    return {"unet": unet, "vae": vae, "text_encoder": text}
