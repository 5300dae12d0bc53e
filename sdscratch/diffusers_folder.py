"""Reading a diffusers Stable Diffusion v1.x folder into our classes.

A diffusers folder (what `StableDiffusionPipeline.save_pretrained` writes, and what a
Hub repository holds) has model_index.json, unet/, vae/, text_encoder/, tokenizer/
and scheduler/. `read_diffusers_folder` reads it through `sdscratch.port`'s tables:
the models are built on the `meta` device and take the file's tensors
(`sdscratch.tensorfile.build`), so no second copy of the weights is ever held. A
folder that is incomplete, damaged, or not SD v1 is refused with one sentence;
nothing partially loaded is returned.
"""

import json
from pathlib import Path

import torch

from sdscratch import port
from sdscratch.checkpoint import CheckpointError
from sdscratch.tensorfile import build, file_keys

# component: (weights file name without ".safetensors", its config file)
COMPONENTS = {
    "unet": ("diffusion_pytorch_model", "config.json"),
    "vae": ("diffusion_pytorch_model", "config.json"),
    "text_encoder": ("model", "config.json"),
}
SCHEDULER_CONFIG = "scheduler/scheduler_config.json"  # where diffusers keeps it
OTHER_FILES = ("tokenizer/vocab.json", "tokenizer/merges.txt", SCHEDULER_CONFIG)
# (tokenizer/tokenizer.json, which transformers 5 writes, may stand for the first two)


def read_json(path) -> dict:
    """A JSON object from a file, or one sentence saying why it is not one."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} is missing; the model folder is incomplete.")
    try:
        value = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"{path} is not valid JSON.") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path} is not a JSON object.")
    return value


def weights_file(folder: Path, stem: str, variant=None) -> Path:
    """The safetensors file of a component: the variant asked for, else the other."""
    names = [f"{stem}.{variant}.safetensors"] if variant else []
    names += [f"{stem}.safetensors", f"{stem}.fp16.safetensors"]
    for name in names:
        if (folder / name).is_file():
            return folder / name
    if any(folder.glob(f"{stem}*.bin")):
        raise CheckpointError(
            f"{folder} holds only pickled weights (.bin), which can run code when "
            "loaded; sdscratch reads only .safetensors weights."
        )
    raise CheckpointError(f"{folder / names[0]} is missing; the folder is incomplete.")


def check_complete(root: Path, variant=None) -> dict:
    """Every file a diffusers SD v1 folder needs, or one sentence naming what is
    missing. Returns {component: weights file}."""
    missing = [name for name in OTHER_FILES if not (root / name).is_file()]
    if (root / "tokenizer" / "tokenizer.json").is_file():  # transformers 5's one file
        missing = [name for name in missing if not name.startswith("tokenizer/")]
    missing += [
        f"{name}/{config}"
        for name, (_, config) in COMPONENTS.items()
        if not (root / name / config).is_file()
    ]
    if missing:
        raise CheckpointError(
            f"{root} is not a complete Stable Diffusion folder: "
            f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} missing."
        )
    return {
        name: weights_file(root / name, stem, variant)
        for name, (stem, _) in COMPONENTS.items()
    }


def check_sd_v1(root: Path, unet_config: dict, scheduler_config: dict):
    """Refuse SD 2.x, SDXL and other pipelines with one sentence naming why."""
    index = read_json(root / "model_index.json")
    kind = str(index.get("_class_name", ""))
    problems = []
    if "XL" in kind or unet_config.get("addition_embed_type") is not None:
        problems.append(
            "an SDXL model (addition_embed_type "
            f"{unet_config.get('addition_embed_type')!r}, {kind})"
        )
    elif unet_config.get("cross_attention_dim") == 1024:
        problems.append("a Stable Diffusion 2.x model (cross_attention_dim 1024)")
    elif isinstance(unet_config.get("attention_head_dim"), list):
        problems.append(
            "a Stable Diffusion 2.x model (a list of attention_head_dim "
            f"{unet_config['attention_head_dim']})"
        )
    prediction = scheduler_config.get("prediction_type", "epsilon")
    if not problems and prediction != "epsilon":
        problems.append(
            f"a model that predicts {prediction!r} (SD v1 predicts the "
            "noise, 'epsilon')"
        )
    if problems:
        raise CheckpointError(
            f"{root} holds {problems[0]}; sdscratch loads Stable Diffusion v1.x only."
        )


def read_diffusers_folder(root, dtype=torch.float32, variant=None) -> dict:
    """Our unet, vae, text_encoder and tokenizer from a diffusers SD v1.x folder.

    Args:
        root: the folder (model_index.json, unet/, vae/, text_encoder/,
            tokenizer/, scheduler/).
        dtype: the models' dtype (the files may hold another).
        variant: "fp16" to prefer the `*.fp16.safetensors` files.
    Returns:
        {"unet", "vae", "text_encoder", "tokenizer", "scheduler_config"}.
    """
    from sdscratch.clip import TextEncoder
    from sdscratch.tokenizer import Tokenizer
    from sdscratch.unet import UNet
    from sdscratch.vae import VAE

    root = Path(root)
    files = check_complete(root, variant)
    configs, scheduler = diffusers_settings(root)
    unet_config, vae_config = configs["unet"], configs["vae"]
    text_config = configs["text_encoder"]
    parts = {}
    for name, cls, config, rename in (
        ("unet", UNet, unet_config, port.unet_state_dict_from_diffusers),
        ("vae", VAE, vae_config, port.vae_state_dict_from_diffusers),
        ("text_encoder", TextEncoder, text_config,
         port.text_encoder_state_dict_from_transformers),
    ):  # fmt: skip
        mapping = {key: _renamed(rename, key) for key in file_keys(files[name])}
        parts[name] = build(cls, config, files[name], mapping, dtype)
    parts["tokenizer"] = Tokenizer.from_pretrained(root / "tokenizer")
    parts["scheduler_config"] = scheduler
    return parts


def diffusers_settings(root: Path) -> tuple[dict, dict]:
    """Our configs of a diffusers folder's three models, and its scheduler config;
    SD 2.x, SDXL and layouts we do not build are refused with one sentence."""
    configs = {name: read_json(root / name / "config.json") for name in COMPONENTS}
    scheduler = read_json(root / SCHEDULER_CONFIG)
    check_sd_v1(root, configs["unet"], scheduler)
    try:
        return {
            "unet": port.unet_config_from_diffusers(configs["unet"]),
            "vae": port.vae_config_from_diffusers(configs["vae"]),
            "text_encoder": port.text_encoder_config_from_transformers(
                configs["text_encoder"]
            ),
        }, scheduler
    except KeyError as error:
        raise CheckpointError(f"{root}: a config.json lacks {error}.") from None
    except ValueError as error:
        raise CheckpointError(f"{root}: {error}") from None


def _renamed(rename, key):
    """The name a port table gives one key (None: dropped, like position_ids)."""
    renamed = rename({key: None})
    return next(iter(renamed), None)
