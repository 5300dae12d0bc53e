"""Reading a safetensors file one tensor at a time, into memory of its own.

The format is simple: 8 bytes (little-endian) giving the header's length N, N bytes
of JSON (each tensor's dtype, shape and byte range; optional `__metadata__`), then
the tensors' bytes. safetensors' own loader maps the file into memory; a model then
holds tensors backed by the file, and converting them to another dtype touches every
page of the mapping, so a float32 file loaded as float16 would hold both. Reading each
tensor into its own buffer and converting it at once keeps the peak at the loaded
weights plus one tensor (benchmarks/load_memory.py measures it).

`build` then puts a file's tensors into a model made on PyTorch's `meta` device
(shapes only, no memory), each checked against the model's before it is read.
"""

import json
import struct
from pathlib import Path

import torch

from sdscratch.checkpoint import CheckpointError

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
    "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32,
    "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}  # fmt: skip


class DamagedFile(ValueError):
    """The file is not a readable safetensors file (truncated, bad header)."""


def read_header(path) -> tuple[dict, dict, int]:
    """({name: {"dtype", "shape", "data_offsets"}}, metadata, where the data starts),
    every tensor's byte range checked against the file's size."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as file:
        start = file.read(8)
        if len(start) < 8:
            raise DamagedFile(path)
        (length,) = struct.unpack("<Q", start)
        if length > size - 8:
            raise DamagedFile(path)
        try:
            header = json.loads(file.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise DamagedFile(path) from None
    if not isinstance(header, dict):
        raise DamagedFile(path)
    metadata = header.pop("__metadata__", None) or {}
    for info in header.values():
        begin, end = info["data_offsets"]
        count = torch.Size(info["shape"]).numel()
        itemsize = torch.empty((), dtype=DTYPES[info["dtype"]]).element_size()
        if end - begin != count * itemsize or 8 + length + end > size:
            raise DamagedFile(path)
    return header, metadata, 8 + length


def read_tensors(path, keys, dtype=None):
    """Yield (key, tensor) for `keys`, each read into its own memory and converted
    to `dtype` (floating tensors only) before the next is read."""
    header, _, data = read_header(path)
    with open(path, "rb") as file:
        for key in keys:
            info = header[key]
            begin, end = info["data_offsets"]
            buffer = bytearray(end - begin)
            file.seek(data + begin)
            file.readinto(buffer)
            stored = DTYPES[info["dtype"]]
            if end > begin:
                tensor = torch.frombuffer(buffer, dtype=stored)
            else:
                tensor = torch.empty(0, dtype=stored)
            tensor = tensor.reshape(info["shape"])
            if dtype is not None and tensor.is_floating_point() and stored != dtype:
                tensor = tensor.to(dtype)  # the buffer is freed with the old tensor
            yield key, tensor


# ----------------------------------------------------------------------------------
# Into a model


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


def file_keys(path: Path) -> list:
    return list(_read_header(path))
