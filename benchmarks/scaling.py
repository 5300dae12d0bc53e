"""Training on 1 and 2 processes, and from shards against the in-memory generator.

    python benchmarks/scaling.py [--steps 20] [--batch 32]

The workload is the pixel-text recipe's UNet size without text (sdscratch.recipes.
pixel_unet_config) trained with `fit` on 32×32 Shapes scenes, one torch thread per
process. It prints:

- images per second trained with 1 process, and with 2 (`accelerate launch
  --multi_gpu` on the CPU, gloo), each with `--batch` images per step: the scaling
  efficiency is the 2-process rate over twice the 1-process rate (1.0: perfect);
- the same 1-process run fed from tar shards (`sdscratch.shards.ShardStream`, PNG
  decoding included) instead of scenes rendered once into memory;
- how fast each source alone yields batches, without training.

It prints the machine and its load before and after: on a shared machine the other
processes slow every figure, the 2-process one most.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from _machine import machine  # benchmarks/_machine.py, beside this script
from torch.utils.data import DataLoader, TensorDataset

from sdscratch.train import cpu_launch

SCENES = 2048  # scenes in memory, and in the shards
SHARDS = 4


def memory_batches(batch):
    from sdscratch.shapes.data import Shapes

    images = Shapes("train", length=SCENES).batch(range(SCENES))[0]
    loader = DataLoader(
        TensorDataset(images),
        batch_size=batch,
        shuffle=True,
        generator=torch.Generator().manual_seed(0),
        drop_last=True,
    )
    return loader


def shard_batches(batch, folder):
    from sdscratch.shards import ShardStream

    stream = ShardStream(folder, batch, size=32, seed=0)
    return ({0: images} for images, _ in stream)  # same shape as the loader's


def worker(args):
    """Time `fit` for args.steps steps (after 3 untimed ones); print a JSON line."""
    from accelerate import Accelerator

    from sdscratch.recipes.pixel import pixel_unet_config
    from sdscratch.schedules import NoiseSchedule
    from sdscratch.train import diffusion_loss, fit, rank_generator
    from sdscratch.unet import UNet

    accelerator = Accelerator()
    torch.manual_seed(0)
    unet, schedule = UNet(pixel_unet_config()), NoiseSchedule.scaled_linear()
    noise = rank_generator(1)
    if args.source == "memory":
        batches = memory_batches(args.batch)
    else:
        batches = shard_batches(args.batch, args.shards)

    def loss_fn(model, batch):
        return diffusion_loss(model, batch[0], schedule, noise)

    fit(unet, loss_fn, batches, 3, progress=False, accelerator=accelerator)
    accelerator.wait_for_everyone()
    start = time.perf_counter()
    fit(unet, loss_fn, batches, args.steps, progress=False, accelerator=accelerator)
    accelerator.wait_for_everyone()
    seconds = time.perf_counter() - start
    if accelerator.is_main_process:
        images = args.steps * args.batch * accelerator.num_processes
        print(json.dumps({"images_per_second": images / seconds}))


def run(args, processes, source, shards) -> float:
    """Images per second of `worker` on `processes` processes."""
    script = [
        str(Path(__file__).resolve()),
        "--worker",
        "--source",
        source,
        "--steps",
        str(args.steps),
        "--batch",
        str(args.batch),
        "--shards",
        str(shards),
    ]
    command, launch_env = cpu_launch(script, processes)
    env = os.environ | {"OMP_NUM_THREADS": "1"} | launch_env
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(result.stderr[-3000:])
    line = [x for x in result.stdout.splitlines() if x.startswith("{")][-1]
    return json.loads(line)["images_per_second"]


def source_rate(batches, count=50) -> float:
    """Images per second a source yields, without training."""
    iterator = iter(batches)
    next(iterator)
    start, images = time.perf_counter(), 0
    for _ in range(count):
        images += len(next(iterator)[0])
    return images / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=32, help="images per process")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--source", default="memory", help=argparse.SUPPRESS)
    parser.add_argument("--shards", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    from sdscratch.shapes.shards import shapes_samples
    from sdscratch.shards import write_shards

    torch.set_num_threads(1)
    print(machine())
    with tempfile.TemporaryDirectory() as folder:
        shards = Path(folder) / "shards"
        write_shards(shapes_samples(SCENES), shards, SHARDS)
        one = run(args, 1, "memory", shards)
        two = run(args, 2, "memory", shards)
        streamed = run(args, 1, "shards", shards)
        memory_alone = source_rate(memory_batches(args.batch))
        shards_alone = source_rate(shard_batches(args.batch, shards))
    print(
        f"training, images/s: 1 process {one:.1f}, 2 processes {two:.1f}: "
        f"scaling efficiency {two / (2 * one):.2f}"
    )
    print(
        f"1 process from {SHARDS} shards: {streamed:.1f} images/s, "
        f"{streamed / one:.2f} of the in-memory rate"
    )
    print(
        f"the sources alone, images/s: in memory {memory_alone:.0f}, "
        f"shards {shards_alone:.0f}"
    )
    print("load average after:", ", ".join(f"{x:.2f}" for x in os.getloadavg()))


if __name__ == "__main__":
    main()
