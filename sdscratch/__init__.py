"""sdscratch: Stable Diffusion built from scratch, on a laptop CPU.

The package holds the finished version of everything the lessons build. Its main
names are importable from the top, `from sdscratch import StableDiffusion, UNet`;
each loads its module the first time it is used, so `import sdscratch` stays light.
"""

import importlib
import os
import random
from pathlib import Path

import numpy as np
import torch

__version__ = "0.1.0"

# name: the module that defines it
EXPORTS = {
    "StableDiffusion": "sdscratch.pipeline",
    "UNet": "sdscratch.unet",
    "UNetConfig": "sdscratch.unet",
    "ControlNet": "sdscratch.controlnet",
    "ControlNetConfig": "sdscratch.controlnet",
    "VAE": "sdscratch.vae",
    "VAEConfig": "sdscratch.vae",
    "TextEncoder": "sdscratch.clip",
    "TextEncoderConfig": "sdscratch.clip",
    "Tokenizer": "sdscratch.tokenizer",
    "NoiseSchedule": "sdscratch.schedules",
    "sample": "sdscratch.samplers",
}


def __getattr__(name):
    """`sdscratch.StableDiffusion` and the other EXPORTS, imported on first use."""
    if name in EXPORTS:
        return getattr(importlib.import_module(EXPORTS[name]), name)
    raise AttributeError(f"module 'sdscratch' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(EXPORTS))


def device() -> torch.device:
    """The best available device: CUDA, then Apple's MPS, then the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch, and return a CPU `torch.Generator` with `seed`.

    Library code never relies on the global seeds: it takes a generator or a seed
    argument. This helper is for lessons and scripts, so that plots repeat.
    """
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def assets_dir() -> Path:
    """The folder of bundled checkpoints and figures.

    Inside an installed wheel it is `sdscratch/assets`; in a clone it is `assets/`
    at the top of the repository. `SDSCRATCH_ASSETS` overrides both.
    """
    if "SDSCRATCH_ASSETS" in os.environ:
        return Path(os.environ["SDSCRATCH_ASSETS"])
    here = Path(__file__).resolve().parent
    packaged = here / "assets"
    return packaged if packaged.is_dir() else here.parent / "assets"
