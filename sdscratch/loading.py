"""Where a Stable Diffusion comes from: a bundled name, a folder, a file or the Hub.

`locate` decides what a name means, with one rule:
- a bare name ("shapes-ldm") is always a bundled checkpoint, never a folder that
  happens to have that name in the working directory (write ./shapes-ldm for that);
- a path (with a "/", "~", or absolute) is a folder (ours, with MANIFEST.json, or a
  diffusers Stable Diffusion v1.x folder, with model_index.json) or a single
  `.safetensors` file (CompVis/A1111 layout, `sdscratch.single_file`);
- "owner/name" that is no existing path is a Hugging Face Hub repository, downloaded
  with huggingface_hub (safetensors, json and txt files only).

Our folders are read here; a diffusers folder by `sdscratch.diffusers_folder`, a
single file by `sdscratch.single_file`.
"""

import json
import os
import re
from pathlib import Path

import torch

from sdscratch import assets_dir
from sdscratch.checkpoint import (
    MANIFEST,
    CheckpointError,
    check_scheduler_config,
    load_component,
    read_manifest,
    verify,
)
from sdscratch.diffusers_folder import (
    COMPONENTS,
    OTHER_FILES,
    SCHEDULER_CONFIG,
    diffusers_settings,
    read_json,
)
from sdscratch.diffusers_folder import (  # where StableDiffusion imports it from
    read_diffusers_folder as read_diffusers_folder,
)

DEFAULT_REPO = "stable-diffusion-v1-5/stable-diffusion-v1-5"  # the real SD v1.5
PICKLES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
DTYPES = {  # the names torch_dtype may be given by, and the CLI's
    "fp32": torch.float32, "float32": torch.float32,
    "fp16": torch.float16, "float16": torch.float16,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
}  # fmt: skip


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


UNET_WEIGHTS = "unet/model.safetensors"  # in one of our model folders


def unet_digest(model) -> str | None:
    """The sha256 of a model's UNet weights, as its MANIFEST.json records them (and
    loading it checks them): our folders and bundled names; None for a diffusers
    folder, a single file or a Hub repo id, which record none. What an add-on (a
    ControlNet, a LoRA) records of the base it was trained on."""
    kind, where = locate(model)
    return read_manifest(where)["sha256"].get(UNET_WEIGHTS) if kind == "ours" else None


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


# ----------------------------------------------------------------------------------
# The scheduler's config: which noise schedule the UNet was trained with

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
