"""Peak memory while loading a full-size Stable Diffusion v1.5 (target: ≤ 1.3× weights).

    python benchmarks/load_memory.py [--folder /tmp/sd15-random] [--keep]

Writes SD v1.5's configurations (UNet 859.5 M, VAE 83.7 M, text encoder 123.1 M
parameters) with seeded random weights into a diffusers-layout folder (float32
files, and float16 `variant` files), then loads it with
`StableDiffusion.from_pretrained` in a fresh subprocess per case and prints the
process's peak resident memory (VmHWM) above what it held just before loading,
as a multiple of the loaded weights' size. Our loader builds the models on the
`meta` device and hands them the file's tensors (`load_state_dict(assign=True)`),
so no second copy of the weights should appear.
"""

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from _machine import machine  # benchmarks/_machine.py, beside this script
from safetensors.torch import save_file

from sdscratch import assets_dir

SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    attention_head_dim=8, norm_num_groups=32,
)  # fmt: skip
SD15_VAE = dict(
    block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
    down_block_types=("DownEncoderBlock2D",) * 4, sample_size=512,
    up_block_types=("UpDecoderBlock2D",) * 4, scaling_factor=0.18215,
)  # fmt: skip
SD15_SCHEDULER = {
    "_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "num_train_timesteps": 1000,
    "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
    "trained_betas": None, "clip_sample": False,
}  # fmt: skip

MEASURE = """
import sys, time, torch
from sdscratch.pipeline import StableDiffusion
def status_mb(field):  # VmRSS: resident now; VmHWM: its peak since exec
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(field + ":"))
    return int(line.split()[1]) / 1024
before = status_mb("VmRSS")
start = time.perf_counter()
dtype = getattr(torch, sys.argv[2])
pipe = StableDiffusion.from_pretrained(sys.argv[1], dtype, variant=sys.argv[3] or None)
seconds = time.perf_counter() - start
total = sum(float(p.float().sum()) for m in (pipe.unet, pipe.vae, pipe.text_encoder)
            for p in m.parameters())  # every weight really is in memory
peak = status_mb("VmHWM")
weights = sum(p.numel() * p.element_size() for m in (pipe.unet, pipe.vae,
              pipe.text_encoder) for p in m.parameters()) / 2**20
print(before, peak, status_mb("VmRSS"), weights, seconds)
"""


def random_state(model, seed, dtype) -> dict:
    """Seeded random tensors under a (meta) model's names and shapes."""
    g = torch.Generator().manual_seed(seed)
    return {
        name: (torch.randn(tensor.shape, generator=g) * 0.02).to(dtype)
        for name, tensor in model.state_dict().items()
    }


def write_folder(root: Path):
    """SD v1.5's layout, random weights, float32 and fp16-variant files."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    text_config = CLIPTextConfig(  # openai/clip-vit-large-patch14, SD v1's
        hidden_size=768,
        intermediate_size=3072,
        num_attention_heads=12,
        num_hidden_layers=12,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        projection_dim=768,
    )
    parts = {
        "unet": (UNet2DConditionModel, SD15_UNET, "diffusion_pytorch_model"),
        "vae": (AutoencoderKL, SD15_VAE, "diffusion_pytorch_model"),
        "text_encoder": (CLIPTextModel, text_config, "model"),
    }
    for seed, (name, (cls, config, stem)) in enumerate(parts.items()):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        with torch.device("meta"):
            model = cls(config) if name == "text_encoder" else cls(**config)
        if name == "text_encoder":
            config.save_pretrained(folder)
        else:
            model.save_config(folder)
        for dtype, suffix in ((torch.float32, ""), (torch.float16, ".fp16")):
            state = random_state(model, seed, dtype)
            save_file(state, str(folder / f"{stem}{suffix}.safetensors"))
            del state
    shutil.copytree(assets_dir() / "models" / "shapes-ldm" / "tokenizer",
                    root / "tokenizer", dirs_exist_ok=True)  # fmt: skip
    (root / "scheduler").mkdir(exist_ok=True)
    config = json.dumps(SD15_SCHEDULER, indent=2)
    (root / "scheduler" / "scheduler_config.json").write_text(config)
    index = {"_class_name": "StableDiffusionPipeline"}
    (root / "model_index.json").write_text(json.dumps(index))


def measure(root, dtype, variant) -> dict:
    """Load in a fresh process; its memory before, at peak, after (MB)."""
    run = [sys.executable, "-c", MEASURE, str(root), dtype, variant]
    out = subprocess.run(run, capture_output=True, text=True, check=True).stdout
    before, peak, after, weights, seconds = map(float, out.split()[-5:])
    return dict(before=before, peak=peak, after=after, weights=weights,
                seconds=seconds)  # fmt: skip


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", default="/tmp/sd15-random", type=Path)
    parser.add_argument("--keep", action="store_true", help="keep the folder")
    args = parser.parse_args()
    print(machine())
    if not (args.folder / "model_index.json").is_file():
        start = time.perf_counter()
        write_folder(args.folder)
        print(f"wrote {args.folder} in {time.perf_counter() - start:.0f} s")
    print("files -> dtype     weights   before    peak   after  (peak-before)/weights")
    for files, dtype, variant in (("fp32", "float32", ""), ("fp32", "float16", ""),
                                  ("fp16", "float16", "fp16")):  # fmt: skip
        m = measure(args.folder, dtype, variant)
        ratio = (m["peak"] - m["before"]) / m["weights"]
        print(f"{files:>5} -> {dtype:<8} {m['weights']:7.0f} MB {m['before']:6.0f} "
              f"{m['peak']:7.0f} {m['after']:7.0f}  {ratio:.2f}x "
              f"(loaded in {m['seconds']:.1f} s)")  # fmt: skip
    if not args.keep:
        shutil.rmtree(args.folder)


if __name__ == "__main__":
    main()
