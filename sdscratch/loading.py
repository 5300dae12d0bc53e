"""Where a Stable Diffusion comes from: a bundled name, a folder, a file or the Hub.

`locate` decides what a name means, with one rule:
- a bare name ("shapes-ldm") is always a bundled checkpoint, never a folder that
  happens to have that name in the working directory (write ./shapes-ldm for that);
- a path (with a "/", "~", or absolute) is a folder (ours, with MANIFEST.json, or a
  diffusers Stable Diffusion v1.x folder, with model_index.json) or a single
  `.safetensors` file (CompVis/A1111 layout, `sdscratch.single_file`);
- "owner/name" that is no existing path is a Hugging Face Hub repository, downloaded
  with huggingface_hub (safetensors, json and txt files only).

`read_diffusers_folder` reads a diffusers folder into our classes through
`sdscratch.port`'s tables: the models are built on the `meta` device and take the
file's tensors (`load_state_dict(assign=True)`), so no second copy of the weights is
ever held. A folder that is incomplete, damaged, or not SD v1 is refused with one
sentence; nothing partially loaded is returned.
"""

import json
import os
import re
from pathlib import Path

import torch

from sdscratch import assets_dir, port
from sdscratch.checkpoint import (
    MANIFEST,
    CheckpointError,
    check_scheduler_config,
    load_component,
    verify,
)
from sdscratch.tensorfile import DamagedFile, read_header, read_tensors

DEFAULT_REPO = "stable-diffusion-v1-5/stable-diffusion-v1-5"  # the real SD v1.5
PICKLES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# component: (weights file name without ".safetensors", its config file)
COMPONENTS = {
    "unet": ("diffusion_pytorch_model", "config.json"),
    "vae": ("diffusion_pytorch_model", "config.json"),
    "text_encoder": ("model", "config.json"),
}
DTYPES = {  # the names torch_dtype may be given by, and the CLI's
    "fp32": torch.float32, "float32": torch.float32,
    "fp16": torch.float16, "float16": torch.float16,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
}  # fmt: skip
OTHER_FILES = ("tokenizer/vocab.json", "tokenizer/merges.txt",
               "scheduler/scheduler_config.json")  # fmt: skip
# (tokenizer/tokenizer.json, which transformers 5 writes, may stand for the first two)


def is_path(name_or_path) -> bool:
    """Does the user mean a path (not a bundled name)? Path objects, and strings
    with a separator, a leading "~", or ".", "..", are paths."""
    if isinstance(name_or_path, Path):
        return True
    text = str(name_or_path)
    separators = {"/", os.sep} | ({os.altsep} if os.altsep else set())
    return (
        any(sep in text for sep in separators)
        or text.startswith("~")
        or text in (".", "..")
        or Path(text).is_absolute()
    )


def bundled(name) -> Path:
    """The folder of a bundled checkpoint, or one sentence naming the choices."""
    folder = assets_dir() / "models" / str(name)
    if str(name) and folder.is_dir():
        return folder
    names = sorted(p.name for p in (assets_dir() / "models").glob("*") if p.is_dir())
    raise CheckpointError(
        f"No checkpoint {str(name)!r} is bundled (bundled: {', '.join(names)}); "
        f"for a folder or file give its path, e.g. ./{name}."
    )


def locate(name_or_path) -> tuple[str, object]:
    """What a model name means: ("ours" | "diffusers" | "single_file", Path) or
    ("hub", repo_id). Refuses pickles and missing paths with one sentence."""
    if not is_path(name_or_path):
        return "ours", bundled(name_or_path)
    path = Path(name_or_path).expanduser()
    if path.suffix.lower() in PICKLES:
        raise CheckpointError(
            f"{path} is a pickle ({path.suffix}), which can run code when loaded; "
            "sdscratch reads only .safetensors weights."
        )
    if path.is_dir():
        if (path / MANIFEST).is_file():
            return "ours", path
        if (path / "model_index.json").is_file():
            return "diffusers", path
        raise CheckpointError(
            f"{path / MANIFEST} is missing, and so is the model_index.json of a "
            "diffusers Stable Diffusion folder; refusing an unrecorded checkpoint."
        )
    if path.is_file():
        if path.suffix.lower() == ".safetensors":
            return "single_file", path
        raise CheckpointError(f"{path} is not a .safetensors file or a model folder.")
    text = str(name_or_path)
    if REPO_ID.match(text) and not text.startswith("."):
        return "hub", text
    raise CheckpointError(f"No checkpoint {str(path)!r}: no such file or folder.")


def download(repo_id, variant=None, files=None) -> Path:
    """A Hub repository's Stable Diffusion files in the local cache (downloaded once).

    Args:
        repo_id: "owner/name", e.g. DEFAULT_REPO.
        variant: "fp16" for the half-precision weight files.
        files: glob patterns to fetch (default: model_index.json, the configs, the
            tokenizer and the three models' safetensors weights).
    Returns:
        The snapshot folder. Offline, or on any Hub error: one sentence.
    """
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        raise CheckpointError(
            f"Cannot download {repo_id}: HF_HUB_OFFLINE is set; give a local folder "
            "or .safetensors file instead."
        )
    suffix = f".{variant}.safetensors" if variant else ".safetensors"
    weights = [f"{name}/{stem}{suffix}" for name, (stem, _) in COMPONENTS.items()]
    files = files or ["model_index.json", "*/config.json", *OTHER_FILES, *weights]
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, allow_patterns=files))
    except Exception as error:  # network, unknown repo, gated repo, disk full...
        reason = str(error).strip().splitlines()[0][:160] if str(error) else ""
        raise CheckpointError(
            f"Cannot download {repo_id} from the Hugging Face Hub "
            f"({type(error).__name__}{': ' + reason if reason else ''})."
        ) from None


# ----------------------------------------------------------------------------------
# Our folders, dtypes, the parts fitting together


def as_dtype(torch_dtype) -> torch.dtype:
    """torch_dtype as a torch.dtype: None (float32), a dtype, or a name ("bf16")."""
    if torch_dtype is None:
        return torch.float32
    dtype = DTYPES.get(torch_dtype) if isinstance(torch_dtype, str) else torch_dtype
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(
            f"torch_dtype must be torch.float32, torch.float16 or torch.bfloat16, "
            f"got {torch_dtype!r}."
        )
    return dtype


def read_our_folder(root) -> dict:
    """The parts of one of our checkpoints (MANIFEST.json checked first)."""
    from sdscratch.clip import TextEncoder, TextEncoderConfig
    from sdscratch.tokenizer import Tokenizer
    from sdscratch.unet import UNet, UNetConfig
    from sdscratch.vae import VAE, VAEConfig

    verify(root)
    return dict(
        unet=load_component(root / "unet", UNet, UNetConfig),
        vae=load_component(root / "vae", VAE, VAEConfig),
        text_encoder=load_component(
            root / "text_encoder", TextEncoder, TextEncoderConfig
        ),
        tokenizer=Tokenizer.from_pretrained(root / "tokenizer"),
    )


def check_fit(where, unet, vae, text_encoder, tokenizer):
    """The four parts work together, or one sentence says which do not."""
    if unet.config.in_channels != vae.config.latent_channels:
        raise CheckpointError(f"{where}: the UNet does not fit the VAE's latents.")
    if unet.config.cross_attention_dim != text_encoder.config.hidden_size:
        raise CheckpointError(f"{where}: the UNet does not fit the text encoder.")
    if tokenizer.context_length > text_encoder.config.max_position_embeddings:
        raise CheckpointError(f"{where}: the tokenizer does not fit the encoder.")
    if len(tokenizer) > text_encoder.config.vocab_size:
        raise CheckpointError(f"{where}: the tokenizer does not fit the encoder.")


# ----------------------------------------------------------------------------------
# Diffusers folders


def read_json(path) -> dict:
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


def read_state(
    path: Path, names: dict, model: torch.nn.Module, dtype, others=False
) -> dict:
    """A safetensors file's tensors under our names, checked against the model's
    (meta) parameters: every one present, none extra, shapes equal; cast to dtype.
    A (C, C, 1, 1) convolution where the model has a (C, C) linear layer is read
    as that layer (CompVis's VAE attention).

    Args:
        names: file key -> our key (keys mapped to None are skipped).
        others: the file holds other models' tensors too: skip unlisted keys.
    """
    expected = model.state_dict()
    state = {}
    header = _read_header(path)
    keys = [key for key in header if not others or key in names]
    unknown = [key for key in keys if key not in names]
    if unknown:
        raise CheckpointError(
            f"{path} holds {len(unknown)} tensors that are not in the model, "
            f"e.g. {unknown[0]!r}."
        )
    for key in keys:
        ours = names[key]
        if ours is None:
            continue
        shape = tuple(header[key]["shape"])
        _check_shape(shape, key, ours, expected, path)
    wanted = [key for key in keys if names[key] is not None]
    try:
        for key, tensor in read_tensors(path, wanted, dtype):
            shape = expected[names[key]].shape
            state[names[key]] = tensor.reshape(shape)  # (C, C, 1, 1) -> (C, C)
    except OSError:
        raise CheckpointError(f"{path} could not be read.") from None
    missing = sorted(set(expected) - set(state))
    if missing:
        raise CheckpointError(
            f"{path} lacks {len(missing)} of the model's tensors, e.g. {missing[0]!r}."
        )
    return state


def _check_shape(shape, key, ours, expected, path):
    """A file's tensor fits the model's, or one sentence says how it does not. A
    (C, C, 1, 1) convolution fits a (C, C) linear layer (CompVis's VAE attention)."""
    if ours not in expected:
        raise CheckpointError(f"{path}: {key} is not a tensor of the model.")
    needed = tuple(expected[ours].shape)
    if shape != needed and not (len(needed) == 2 and shape == (*needed, 1, 1)):
        raise CheckpointError(
            f"{path}: {key} has shape {shape}, but the model's config needs {needed}."
        )


def _read_header(path) -> dict:
    try:
        return read_header(path)[0]
    except (DamagedFile, KeyError, TypeError, ValueError, OSError):
        raise CheckpointError(
            f"{path} is not a readable safetensors file (truncated or damaged?)."
        ) from None


def build(model_cls, config, path, names, dtype, others=False):
    """`model_cls(config)` on the meta device, then given the file's tensors."""
    with torch.device("meta"):
        model = model_cls(config)
    state = read_state(path, names, model, dtype, others)
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


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


def read_settings(name_or_path) -> tuple:
    """(configs, tokenizer, schedule) of a folder (diffusers' or ours) or a Hub repo
    (its configs only are downloaded): what a single file does not hold."""
    from sdscratch.checkpoint import read_config
    from sdscratch.clip import TextEncoderConfig
    from sdscratch.tokenizer import Tokenizer
    from sdscratch.unet import UNetConfig
    from sdscratch.vae import VAEConfig

    kind, where = locate(name_or_path)
    if kind == "hub":
        files = ["model_index.json", "*/config.json", *OTHER_FILES]
        kind, where = "diffusers", download(where, files=files)
    if kind == "single_file":
        raise CheckpointError(f"config must be a folder or a Hub repo id: {where}.")
    tokenizer = Tokenizer.from_pretrained(where / "tokenizer")
    if kind == "diffusers":
        configs, scheduler = diffusers_settings(where)
        return (
            configs,
            tokenizer,
            schedule_from_config(scheduler, where / SCHEDULER_CONFIG),
        )
    classes = {"unet": UNetConfig, "vae": VAEConfig, "text_encoder": TextEncoderConfig}
    configs = {name: read_config(where / name, cls) for name, cls in classes.items()}
    return configs, tokenizer, read_schedule(where)


def file_keys(path: Path) -> list:
    return list(_read_header(path))


def _renamed(rename, key):
    """The name a port table gives one key (None: dropped, like position_ids)."""
    renamed = rename({key: None})
    return next(iter(renamed), None)


# ----------------------------------------------------------------------------------
# The scheduler's config: which noise schedule the UNet was trained with

SCHEDULER_CONFIG = "scheduler/scheduler_config.json"  # where diffusers keeps it
# Settings of diffusers' scheduler configs that our samplers do not follow:
# (key, the value we follow, what a different value would mean).
UNSUPPORTED = (
    ("prediction_type", "epsilon", "a UNet that does not predict the noise"),
    ("trained_betas", None, "a β table instead of a named schedule"),
    ("clip_sample", False, "clipping the predicted image to [-1, 1]"),
    ("thresholding", False, "dynamic thresholding"),
    ("rescale_betas_zero_snr", False, "zero-terminal-SNR betas"),
    ("timestep_spacing", "leading", "another spacing of ddim's timesteps"),
)


def write_schedule(root, schedule):
    """Write scheduler/scheduler_config.json, as diffusers' DDIMScheduler reads it."""
    path = Path(root) / SCHEDULER_CONFIG
    path.parent.mkdir(parents=True, exist_ok=True)
    config = {"_class_name": "DDIMScheduler", **schedule.scheduler_config()}
    path.write_text(json.dumps(config, indent=2) + "\n")


def read_schedule(root):
    """The noise schedule of a checkpoint (SD v1's scaled_linear if none is saved)."""
    from sdscratch.schedules import NoiseSchedule

    path = Path(root) / SCHEDULER_CONFIG
    if not path.is_file():
        return NoiseSchedule.scaled_linear()
    return schedule_from_config(read_json(path), path)


def schedule_from_config(config: dict, path="scheduler_config.json"):
    """A `NoiseSchedule` from a diffusers scheduler config (any of its SD v1
    classes: PNDMScheduler, DDIMScheduler, …), with its steps_offset and
    set_alpha_to_one; settings our samplers do not follow are refused."""
    from sdscratch.schedules import DIFFUSERS_NAMES, NoiseSchedule

    check_scheduler_config(config, path)  # the keys a schedule needs, well typed
    for key, value, meaning in UNSUPPORTED:
        if config.get(key, value) not in (value, None if value is False else value):
            raise CheckpointError(
                f"{path} sets {key}={config[key]!r} ({meaning}), which sdscratch's "
                f"samplers do not do; they follow {key}={value!r}."
            )
    names = {diffusers: ours for ours, diffusers in DIFFUSERS_NAMES.items()}
    try:
        name, size = names[config["beta_schedule"]], int(config["num_train_timesteps"])
        offset, to_one = config.get("steps_offset", 0), config.get("set_alpha_to_one")
        if name == "cosine":
            schedule = NoiseSchedule.cosine(size)
        else:
            start, end = float(config["beta_start"]), float(config["beta_end"])
            schedule = NoiseSchedule.from_name(
                name, size, beta_start=start, beta_end=end
            )
    except (KeyError, TypeError, ValueError):
        raise CheckpointError(f"{path} is not a scheduler config sdscratch reads.")
    if not (type(offset) is int and 0 <= offset < size):
        raise CheckpointError(f"{path} sets steps_offset={offset!r}, not in [0, T).")
    if to_one is not None and not isinstance(to_one, bool):
        raise CheckpointError(f"{path} sets set_alpha_to_one={to_one!r}, not a bool.")
    schedule.steps_offset = offset
    schedule.set_alpha_to_one = bool(True if to_one is None else to_one)
    schedule.timestep_spacing = config.get("timestep_spacing")  # None or "leading"
    return schedule
