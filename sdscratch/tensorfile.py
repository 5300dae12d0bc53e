"""Reading a safetensors file one tensor at a time, into memory of its own.

The format is simple: 8 bytes (little-endian) giving the header's length N, N bytes
of JSON (each tensor's dtype, shape and byte range; optional `__metadata__`), then
the tensors' bytes. safetensors' own loader maps the file into memory; a model then
holds tensors backed by the file, and converting them to another dtype touches every
page of the mapping, so a float32 file loaded as float16 would hold both. Reading each
tensor into its own buffer and converting it at once keeps the peak at the loaded
weights plus one tensor (benchmarks/load_memory.py measures it).
"""

import json
import struct
from pathlib import Path

import torch

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
