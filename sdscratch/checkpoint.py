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
import os
import platform
import time
import typing
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

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


def read_config(directory, config_cls):
    """Rebuild a config dataclass from `directory/config.json`."""
    path = Path(directory) / CONFIG
    if not path.is_file():
        raise CheckpointError(f"{path} is missing; the checkpoint is incomplete.")
    try:
        fields = json.loads(path.read_text())["config"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise CheckpointError(f"{path} is not a valid sdscratch config file.") from None
    hints = typing.get_type_hints(config_cls)
    known = {f.name for f in dataclasses.fields(config_cls)}
    if set(fields) - known:
        unknown = sorted(set(fields) - known)
        raise CheckpointError(
            f"{path} has fields {config_cls.__name__} lacks: {unknown}."
        )
    for key, value in fields.items():  # json turns tuples into lists
        if isinstance(value, list) and "tuple" in str(hints.get(key, "")).lower():
            fields[key] = tuple(value)
    return config_cls(**fields)


def load_component(directory, model_cls, config_cls, device=None) -> torch.nn.Module:
    """Build `model_cls(config)` from `directory/config.json` and load its weights."""
    directory = Path(directory)
    config = read_config(directory, config_cls)
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
        "quality": quality,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "torch": torch.__version__,
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        **extra,
        "sha256": {p.relative_to(root).as_posix(): sha256(p) for p in _files(root)},
    }
    (root / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def read_manifest(root) -> dict:
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise CheckpointError(f"{path} is missing; refusing an unrecorded checkpoint.")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        raise CheckpointError(f"{path} is not valid JSON.") from None


def verify(root, components=None) -> dict:
    """Check files against the manifest's sha256; return the manifest.

    Args:
        root: the checkpoint folder.
        components: check only files under these sub-folders (default: all).
    """
    root = Path(root)
    manifest = read_manifest(root)
    for name, digest in manifest["sha256"].items():
        if components and name.split("/")[0] not in components:
            continue
        path = root / name
        if not path.is_file():
            raise CheckpointError(
                f"{path} is missing; rebuild it with `{manifest['command']}`."
            )
        if sha256(path) != digest:
            raise CheckpointError(
                f"{path} does not match its sha256 in {MANIFEST}; "
                f"rebuild it with `{manifest['command']}`."
            )
    return manifest
