"""Saving and loading bundled models: safetensors weights, a json config, a manifest.

A checkpoint folder (`assets/models/<name>/`) holds one sub-folder per component
(`unet/`, `vae/`, `text_encoder/`, …), each with `config.json` and
`model.safetensors`, like the diffusers layout of the real Stable Diffusion, plus a
`MANIFEST.json` with the command that made it, its seed, wall time, the sha256 of every
file and the quality measured at the time. Weights load only from safetensors, never
from pickles, and a file that does not match its manifest or config is refused.
"""

import dataclasses
import hashlib
import json
import math
import os
import platform
import re
import time
import typing
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from sdscratch.schedules import DIFFUSERS_NAMES

CONFIG, WEIGHTS, MANIFEST = "config.json", "model.safetensors", "MANIFEST.json"


class CheckpointError(ValueError):
    """A checkpoint is missing, damaged, or does not match its config."""


def resolve(name_or_path) -> Path:
    """The folder of a checkpoint given by bundled name ("shapes-ldm") or path.

    A bare name is always a bundled checkpoint, even if the working directory has a
    folder of that name; a folder is given by a path ("./name", "~/x", "/abs").
    """
    from sdscratch.loading import bundled, is_path

    if not is_path(name_or_path):
        return bundled(name_or_path)
    path = Path(name_or_path).expanduser()
    if not path.is_dir():
        raise CheckpointError(f"No checkpoint {str(path)!r}: no such folder.")
    return path


def check_scheduler_config(config, path):
    """Refuse a scheduler config that `read_schedule` cannot turn into a schedule.

    Args:
        config: the parsed scheduler_config.json.
        path: its path, for the message.
    Raises:
        CheckpointError: one sentence naming the missing or invalid key.
    """
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} is not a scheduler config sdscratch reads.")
    names = sorted(DIFFUSERS_NAMES.values())
    if config.get("beta_schedule") not in names:
        raise CheckpointError(f"{path}: beta_schedule must be one of {names}.")
    size = config.get("num_train_timesteps")
    if type(size) is not int or not 2 <= size <= MAX_INT:
        raise CheckpointError(
            f"{path}: num_train_timesteps must be a whole number from 2 to {MAX_INT}."
        )
    if config["beta_schedule"] == DIFFUSERS_NAMES["cosine"]:
        return  # the cosine schedule has no β range
    start, end = config.get("beta_start"), config.get("beta_end")
    for key, value in (("beta_start", start), ("beta_end", end)):
        if type(value) not in (int, float) or not 0 < value < 1:
            raise CheckpointError(f"{path}: {key} must be a number between 0 and 1.")
    if start > end:
        raise CheckpointError(f"{path}: beta_start is larger than beta_end.")


def save_component(model: torch.nn.Module, directory, config, dtype=None) -> Path:
    """Write `config.json` (the config dataclass) and `model.safetensors`.

    Args:
        model: the module whose state_dict is saved.
        directory: the component folder, created if needed.
        config: a dataclass instance that rebuilds the model, `type(model)(config)`.
        dtype: store floating tensors in this dtype (e.g. torch.float16 to halve size).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    fields = dataclasses.asdict(config)
    record = {"class": type(model).__name__, "config": fields}
    (directory / CONFIG).write_text(json.dumps(record, indent=2) + "\n")
    state = {}
    for key, value in model.state_dict().items():
        value = value.detach().cpu()
        if dtype is not None and value.is_floating_point():
            value = value.to(dtype)
        state[key] = value.contiguous().clone()  # clone: tied weights saved apart
    save_file(state, str(directory / WEIGHTS))
    return directory


MAX_INT = 1 << 17  # no config count (channels, layers, vocabulary…) is larger
MAX_PARAMETERS = 4_000_000_000  # SD v1's UNet has 0.86 billion, SDXL's 2.6 billion


def read_config(directory, config_cls):
    """Rebuild a config dataclass from `directory/config.json`, every field checked
    against its type (ints from 0 to MAX_INT, finite floats), so that a damaged or
    hostile file is one clear sentence rather than an error deep in a constructor.
    """
    path = Path(directory) / CONFIG
    if not path.is_file():
        raise CheckpointError(f"{path} is missing; the checkpoint is incomplete.")
    try:
        fields = json.loads(path.read_text())["config"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
        raise CheckpointError(f"{path} is not a valid sdscratch config file.") from None
    if not isinstance(fields, dict):
        raise CheckpointError(f"{path} is not a valid sdscratch config file.")
    hints = typing.get_type_hints(config_cls)
    known = {f.name for f in dataclasses.fields(config_cls)}
    if set(fields) - known:
        unknown = sorted(set(fields) - known)
        raise CheckpointError(
            f"{path} has fields {config_cls.__name__} lacks: {unknown}."
        )
    for key, value in fields.items():
        if not _fits(value, hints.get(key, typing.Any)):
            raise CheckpointError(
                f"{path}: {key} = {_short(value)} is not a valid "
                f"{_type_name(hints.get(key))} (whole numbers from 0 to {MAX_INT})."
            )
        if isinstance(value, list):  # json turns tuples into lists
            fields[key] = tuple(value)
    return config_cls(**fields)


def _fits(value, hint) -> bool:
    """Does a json value fit a config field's type hint (int, float, str, bool,
    X | None, tuple[X, ...], bare tuple of ints)?"""
    if hint is typing.Any:
        return True
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return type(value) is int and 0 <= value <= MAX_INT
    if hint is float:
        return type(value) in (int, float) and math.isfinite(value)
    if hint is str:
        return isinstance(value, str) and len(value) <= 100
    if hint is tuple:
        hint = tuple[int, ...]
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is tuple:
        return (
            isinstance(value, list)
            and 0 < len(value) <= 64
            and all(_fits(item, args[0] if args else int) for item in value)
        )
    if type(None) in args:  # X | None
        return value is None or any(_fits(value, a) for a in args if a is not None)
    return False


def _type_name(hint) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def _short(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def check_size(model_cls, config, path):
    """Build the model on the meta device (no memory) and refuse more than
    MAX_PARAMETERS parameters, or a config its constructor rejects."""
    try:
        with torch.device("meta"):
            count = sum(p.numel() for p in model_cls(config).parameters())
    except Exception as error:  # any constructor error: one sentence
        raise CheckpointError(
            f"{path} describes no valid {model_cls.__name__} "
            f"({type(error).__name__}: {str(error).splitlines()[0][:80]})."
        ) from None
    if count > MAX_PARAMETERS:
        raise CheckpointError(
            f"{path} describes a {model_cls.__name__} of {count:,} parameters, more "
            f"than the {MAX_PARAMETERS:,} sdscratch loads."
        )


def load_component(directory, model_cls, config_cls, device=None) -> torch.nn.Module:
    """Build `model_cls(config)` from `directory/config.json` and load its weights."""
    directory = Path(directory)
    config = read_config(directory, config_cls)
    check_size(model_cls, config, directory / CONFIG)
    model = model_cls(config)
    path = directory / WEIGHTS
    if not path.is_file():
        raise CheckpointError(f"{path} is missing; the checkpoint is incomplete.")
    try:
        state = load_file(str(path))
    except Exception:
        raise CheckpointError(f"{path} is not a readable safetensors file.") from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError:
        raise CheckpointError(
            f"The weights in {path} do not match the model its config.json describes."
        ) from None
    return model.to(device or torch.device("cpu")).eval()


def sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.name != MANIFEST)


def write_manifest(root, command, seed, seconds, quality, **extra) -> dict:
    """Record how a checkpoint was made, and the sha256 of every file in it."""
    root = Path(root)
    manifest = {
        "command": command,
        "seed": seed,
        "wall_time_seconds": round(seconds, 1),
        **extra,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "torch": torch.__version__,
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        "sha256": {p.relative_to(root).as_posix(): sha256(p) for p in _files(root)},
        "quality": quality,
    }
    (root / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def read_manifest(root) -> dict:
    """MANIFEST.json of a checkpoint, checked: a "command" string and a "sha256"
    table of relative paths inside the folder to 64-digit hex digests."""
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise CheckpointError(f"{path} is missing; refusing an unrecorded checkpoint.")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"{path} is not valid JSON.") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("command"), str):
        raise CheckpointError(f'{path} has no "command" that made the checkpoint.')
    digests = manifest.get("sha256")
    if not isinstance(digests, dict) or not digests:
        raise CheckpointError(f"{path} lists no files with their sha256.")
    for name, digest in digests.items():
        if not _inside(name):
            raise CheckpointError(
                f"{path} lists {_short(name)}, which is not a file inside the folder."
            )
        if not (isinstance(digest, str) and re.fullmatch(r"[0-9a-f]{64}", digest)):
            raise CheckpointError(f"{path}: the sha256 of {name} is not 64 hex digits.")
    return manifest


def _inside(name) -> bool:
    """Is a manifest key a relative path ("unet/config.json") inside the folder?"""
    if not isinstance(name, str) or any(c in name for c in "\\:\0"):
        return False
    return all(part not in ("", ".", "..") for part in name.split("/"))


def verify(root, components=None) -> dict:
    """Check files against the manifest's sha256; return the manifest.

    Every file in the folder (or in the checked components) must be listed, so that
    a manifest cannot leave a file unchecked by leaving it out.

    Args:
        root: the checkpoint folder.
        components: check only files under these sub-folders (default: all).
    """
    root = Path(root)
    manifest = read_manifest(root)
    rebuild = f"rebuild it with `{manifest['command']}`"

    def checked(name: str) -> bool:
        return not components or name.split("/")[0] in components

    for path in _files(root):
        name = path.relative_to(root).as_posix()
        if checked(name) and name not in manifest["sha256"]:
            raise CheckpointError(
                f"{path} is not listed in {MANIFEST}; remove it or {rebuild}."
            )
    for name, digest in manifest["sha256"].items():
        if not checked(name):
            continue
        path = root / name
        if not path.is_file():
            raise CheckpointError(f"{path} is missing; {rebuild}.")
        if sha256(path) != digest:
            raise CheckpointError(
                f"{path} does not match its sha256 in {MANIFEST}; {rebuild}."
            )
    return manifest
