"""LoRA files in the two formats people exchange, read and written.

diffusers (`pytorch_lora_weights.safetensors`, what `pipe.load_lora_weights` reads
and its training scripts write): one key per matrix, in peft's naming,

    unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight
    text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight

with r and α in the file's metadata (`lora_adapter_metadata`: peft's `LoraConfig`
per component); a file without it means α = r. Older diffusers files say
`.lora.down.weight` / `.lora.up.weight` for A and B; they load too.

kohya / A1111 (sd-scripts, the files of most model-sharing sites): the layer's name
flattened with "_", A and B called down and up, α stored beside them,

    lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight
    lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight
    lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.alpha
    lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight

Both hold the same numbers; only the names differ. Files load only from safetensors:
a pickle (.pt, .ckpt, .bin) can run code when it is read.
"""

import collections
import json
import math
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from sdscratch.lora import LoRA, LoRAError, LoRALayer, components
from sdscratch.port import UNET_RENAMES, rename_parts

DIFFUSERS_FILE = "pytorch_lora_weights.safetensors"
METADATA_KEY = "lora_adapter_metadata"  # diffusers' name for the LoraConfig json
PICKLES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")
FORMATS = ("diffusers", "kohya")
# the last part of a key -> which tensor it is
DIFFUSERS_PARTS = {
    "lora_A.weight": "A", "lora_B.weight": "B",  # peft's names (diffusers ≥ 0.22)
    "lora.down.weight": "A", "lora.up.weight": "B",  # older diffusers files
    "lora_linear_layer.down.weight": "A", "lora_linear_layer.up.weight": "B",
}  # fmt: skip
KOHYA_PARTS = {"lora_down.weight": "A", "lora_up.weight": "B", "alpha": "alpha"}
KOHYA_PREFIXES = {"unet": "lora_unet_", "text_encoder": "lora_te_"}


# ----------------------------------------------------------------------------------
# Names


def file_path(component: str, path: str) -> str:
    """Our layer name -> the diffusers/transformers one that files use.

    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out" ->
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0";
    the text encoder's "encoder.layers.0.self_attn.q_proj" ->
    "text_model.encoder.layers.0.self_attn.q_proj".
    """
    if component == "unet":
        return rename_parts(path, UNET_RENAMES, reverse=True)
    return "text_model." + path


def our_path(component: str, name: str) -> str:
    """The reverse of `file_path` (a text encoder name may lack "text_model.")."""
    if component == "unet":
        return rename_parts(name, UNET_RENAMES)
    return name.removeprefix("text_model.")


def kohya_name(component: str, path: str) -> str:
    """The layer's name in kohya's files, e.g.
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"."""
    return KOHYA_PREFIXES[component] + file_path(component, path).replace(".", "_")


# ----------------------------------------------------------------------------------
# Reading


def read_safetensors(path, what="weights") -> tuple[dict, dict]:
    """({key: tensor}, metadata) of a .safetensors file; pickles refused.

    Args:
        path: the file.
        what: what the file should hold, for the error sentences ("a LoRA").
    """
    path = Path(path).expanduser()
    if path.suffix.lower() in PICKLES:
        raise LoRAError(
            f"{path} is a pickle ({path.suffix}), which can run code when loaded; "
            f"sdscratch reads {what} only from .safetensors files."
        )
    if not path.is_file():
        raise LoRAError(f"No {what} file {str(path)!r}: no such file.")
    try:
        with safe_open(path, framework="pt") as file:
            tensors = {key: file.get_tensor(key) for key in file.keys()}
            metadata = file.metadata() or {}
    except (SafetensorError, OSError, ValueError):
        raise LoRAError(f"{path} is not a readable .safetensors file.") from None
    return tensors, metadata


def lora_file(path) -> Path:
    """A LoRA file, or a folder holding one (`pytorch_lora_weights.safetensors`,
    else its only .safetensors file)."""
    path = Path(path).expanduser()
    if not path.is_dir():
        return path
    if (path / DIFFUSERS_FILE).is_file():
        return path / DIFFUSERS_FILE
    found = sorted(path.glob("*.safetensors"))
    if len(found) != 1:
        raise LoRAError(f"{path} holds no {DIFFUSERS_FILE} and not one .safetensors.")
    return found[0]


def load_lora(pipe_or_models, path, scale=1.0) -> LoRA:
    """Read a LoRA file (either format), check it fits, and attach it.

    Args:
        pipe_or_models: a `StableDiffusion`, or {"unet": ..., "text_encoder": ...}.
        path: the .safetensors file, or a folder holding `pytorch_lora_weights
            .safetensors` (diffusers' `save_lora_weights` writes one).
        scale: the strength to use it at (1: as trained).
    Returns:
        The attached `LoRA`. A file that does not fit (a layer the models lack,
        another shape or rank) is refused with one sentence, nothing attached.
    """
    path = lora_file(path)
    tensors, metadata = read_safetensors(path, "a LoRA")
    models = components(pipe_or_models)
    try:
        if tensors and all(key.startswith(("lora_unet_", "lora_te_", "lora_te1_"))
                           for key in tensors):  # fmt: skip
            pieces = kohya_pieces(tensors, models)
        else:
            pieces = diffusers_pieces(tensors, metadata, models)
        lora = build_lora(models, pieces)
    except LoRAError as error:
        raise LoRAError(f"{path}: {error}") from None
    lora.scale = scale
    return lora.attach()


def kohya_pieces(tensors: dict, models: dict) -> dict:
    """{(component, our layer name): {"A", "B", "alpha"}} from kohya's keys."""
    table = {
        kohya_name(component, path): (component, path)
        for component, model in models.items()
        for path, module in model.named_modules()
        if isinstance(module, (nn.Linear, nn.Conv2d))
    }
    pieces = collections.defaultdict(dict)
    for key, tensor in tensors.items():
        name, _, part = key.partition(".")
        name = name.replace("lora_te1_", "lora_te_", 1)  # SDXL's first encoder
        if part not in KOHYA_PARTS:
            raise LoRAError(f"the key {key!r} is not a LoRA weight.")
        if name not in table:
            raise LoRAError(
                f"{name} matches no layer of this model (another model's?)."
            )
        pieces[table[name]][KOHYA_PARTS[part]] = tensor
    for (component, path), piece in pieces.items():
        if "alpha" in piece:
            if piece["alpha"].numel() != 1:
                name = kohya_name(component, path)
                raise LoRAError(f"{name}.alpha is not one number.")
            piece["alpha"] = float(piece["alpha"])
    return pieces


def diffusers_pieces(tensors: dict, metadata: dict, models: dict) -> dict:
    """{(component, our layer name): {"A", "B", "alpha"}} from diffusers' keys, α
    from the metadata's LoraConfig (none: α = r)."""
    configs = _configs(metadata)
    pieces = collections.defaultdict(dict)
    for key, tensor in tensors.items():
        component, _, rest = key.partition(".")
        part = next((p for p in DIFFUSERS_PARTS if rest.endswith("." + p)), None)
        if part is None or not rest:
            raise LoRAError(
                f"the key {key!r} is in neither diffusers' (unet.…, text_encoder.…) "
                "nor kohya's (lora_unet_…, lora_te_…) LoRA naming."
            )
        if component not in models:
            raise LoRAError(f"{key} is for a {component!r}, which this model lacks.")
        name = rest.removesuffix("." + part)
        pieces[component, our_path(component, name)][DIFFUSERS_PARTS[part]] = tensor
    for (component, path), piece in pieces.items():
        if component in configs:
            _apply_config(configs[component], file_path(component, path), piece)
    return pieces


def _apply_config(config: dict, name: str, piece: dict):
    """Check a layer's rank against a LoraConfig dict and take its α from it."""
    name = name.removeprefix("text_model.")
    rank = _pattern(config.get("rank_pattern"), name, config.get("r"))
    if rank is not None and "A" in piece and rank != piece["A"].shape[0]:
        raise LoRAError(
            f"{name} has rank {piece['A'].shape[0]} but the file's metadata says "
            f"{rank}."
        )
    alpha = _pattern(config.get("alpha_pattern"), name, config.get("lora_alpha"))
    if alpha is not None:
        piece["alpha"] = float(alpha)


def _configs(metadata: dict) -> dict:
    """{component: LoraConfig dict} from diffusers' metadata ("unet.r": 4, ...)."""
    if METADATA_KEY not in metadata:
        return {}
    try:
        flat = json.loads(metadata[METADATA_KEY])
    except json.JSONDecodeError:
        raise LoRAError(f"its {METADATA_KEY} metadata is not JSON.") from None
    configs = collections.defaultdict(dict)
    for key, value in flat.items():
        component, _, field = key.partition(".")
        configs[component][field] = value
    return configs


def _pattern(patterns, name, default):
    """peft's rank_pattern/alpha_pattern: the value of the first pattern that
    matches the end of the layer's name, else `default`."""
    for pattern, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", name):
            return value
    return default


def build_lora(models: dict, pieces: dict) -> LoRA:
    """A `LoRA` (not attached) from {(component, layer): {"A", "B", "alpha"}},
    every layer checked: it exists, is linear or conv, and A and B fit it."""
    modules = {name: dict(model.named_modules()) for name, model in models.items()}
    changes = {}
    for (component, path), piece in pieces.items():
        name = file_path(component, path)
        module = modules[component].get(path)
        if not isinstance(module, (nn.Linear, nn.Conv2d)):
            raise LoRAError(
                f"{component}.{name} matches no layer of this model (another model's?)."
            )
        if "A" not in piece or "B" not in piece:
            raise LoRAError(f"{component}.{name} lacks its A (down) or B (up) matrix.")
        a, b = piece["A"], piece["B"]
        if a.ndim < 2 or b.ndim < 2 or a.shape[0] != b.shape[1]:
            raise LoRAError(
                f"{component}.{name} has a rank mismatch: A is {tuple(a.shape)}, "
                f"B is {tuple(b.shape)}."
            )
        layer = LoRALayer(module, a.shape[0], piece.get("alpha"))
        for tensor, target in ((a, layer.lora_A.weight), (b, layer.lora_B.weight)):
            if tensor.flatten(1).shape != target.flatten(1).shape:
                raise LoRAError(
                    f"{component}.{name} is {tuple(tensor.shape)} in the file but "
                    f"{tuple(target.shape)} in this model: a LoRA for another model."
                )
            with torch.no_grad():
                target.copy_(tensor.reshape(target.shape))
        changes[component, path] = layer
    if not changes:
        raise LoRAError("it holds no LoRA weights.")
    return LoRA(models, changes)


# ----------------------------------------------------------------------------------
# Writing


def save_lora(lora: LoRA, path, format="diffusers", dtype=None) -> Path:
    """Write a LoRA in diffusers' or kohya's format.

    Args:
        lora: the `LoRA`.
        path: a .safetensors file, or a folder (diffusers' layout: the file is
            `folder/pytorch_lora_weights.safetensors`).
        format: "diffusers" (peft key names, r and α in the metadata) or "kohya"
            (A1111's names, α as a tensor beside each layer).
        dtype: store the tensors in this dtype (default: as they are).
    Returns:
        The file written.
    """
    if format not in FORMATS:
        raise LoRAError(f"Unknown LoRA format {format!r}; choose one of {FORMATS}.")
    path = Path(path)
    if path.suffix != ".safetensors":
        path = path / DIFFUSERS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    write = diffusers_state if format == "diffusers" else kohya_state
    state, metadata = write(lora)
    dtype = dtype or next(lora.parameters()).dtype
    state = {key: t.detach().to("cpu", dtype).contiguous() for key, t in state.items()}
    save_file(state, path, metadata=metadata)
    return path


def diffusers_state(lora: LoRA) -> tuple[dict, dict]:
    """(tensors, metadata) in diffusers' format."""
    state, layers = {}, collections.defaultdict(dict)
    for key, layer in lora.layers.items():
        component, path = lora.where[key]
        name = file_path(component, path)
        state[f"{component}.{name}.lora_A.weight"] = layer.lora_A.weight
        state[f"{component}.{name}.lora_B.weight"] = layer.lora_B.weight
        layers[component][name.removeprefix("text_model.")] = layer
    config = {}
    for component, named in layers.items():
        for field, value in _lora_config(named).items():
            config[f"{component}.{field}"] = value
    metadata = {"format": "pt", METADATA_KEY: json.dumps(config, sort_keys=True)}
    return state, metadata


def _lora_config(layers: dict) -> dict:
    """peft's LoraConfig of {name: LoRALayer}: the most common r and α, and
    patterns for the layers that differ."""
    ranks = {name: layer.rank for name, layer in layers.items()}
    alphas = {name: layer.alpha for name, layer in layers.items()}
    r = collections.Counter(ranks.values()).most_common(1)[0][0]
    alpha = collections.Counter(alphas.values()).most_common(1)[0][0]
    return {
        "r": r,
        "lora_alpha": alpha,
        "target_modules": sorted(layers),
        "rank_pattern": {re.escape(n): v for n, v in ranks.items() if v != r},
        "alpha_pattern": {re.escape(n): v for n, v in alphas.items() if v != alpha},
    }


def kohya_state(lora: LoRA) -> tuple[dict, dict]:
    """(tensors, metadata) in kohya's / A1111's format."""
    state = {}
    for key, layer in lora.layers.items():
        name = kohya_name(*lora.where[key])
        state[f"{name}.lora_down.weight"] = layer.lora_A.weight
        state[f"{name}.lora_up.weight"] = layer.lora_B.weight
        state[f"{name}.alpha"] = torch.tensor(layer.alpha)
    return state, {"ss_network_module": "networks.lora"}


# ----------------------------------------------------------------------------------
# On a pipeline


def lora_argument(text: str) -> tuple[Path, float]:
    """The command line's "FILE[:SCALE]" -> (FILE, SCALE), SCALE 1 if not given."""
    path, colon, scale = text.rpartition(":")
    try:
        value = float(scale) if colon and path else None
    except ValueError:  # a colon in the file's name
        value = None
    if value is None:
        return Path(text), 1.0
    if not math.isfinite(value):
        raise LoRAError(f"--lora {text}: the scale must be a finite number.")
    return Path(path), value


def load_lora_weights(pipe, path, scale=1.0) -> LoRA:
    """`pipe.load_lora_weights`: attach a LoRA file to a `StableDiffusion` (several
    can act at once; `unload_lora_weights` takes them all off)."""
    lora = load_lora(pipe, path, scale)
    pipe.__dict__.setdefault("loras", []).append(lora)
    return lora


def unload_lora_weights(pipe):
    """Take every LoRA `load_lora_weights` attached off the pipeline."""
    for lora in pipe.__dict__.pop("loras", []):
        lora.detach()
