"""A few `fit` steps of a tiny UNet, run by tests/test_scaling.py as one plain
process or under `accelerate launch`; the first process writes what it trained.

    python tests/distributed_fit.py --batch 16 --out run.safetensors
    ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 \\
        tests/distributed_fit.py --batch 8 --out run.safetensors

Every process draws the same 48 examples (x0, t, ε); the loss has no randomness of
its own, so that only the split of each batch between the processes differs.
"""

import argparse
import json

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from safetensors.torch import save_file
from torch.utils.data import DataLoader, TensorDataset

from sdscratch.schedules import NoiseSchedule
from sdscratch.train import EMA, fit, rank_generator
from sdscratch.unet import UNet, UNetConfig

EXAMPLES = 48


def tiny_unet() -> UNet:
    torch.manual_seed(0)
    return UNet(
        UNetConfig(
            sample_size=8,
            block_out_channels=(8, 16),
            layers_per_block=1,
            attention_levels=(False, True),
            cross_attention_dim=None,
            num_heads=2,
            norm_num_groups=4,
        )
    )


def examples() -> TensorDataset:
    draws = torch.Generator().manual_seed(1)
    x0 = torch.randn(EXAMPLES, 4, 8, 8, generator=draws)
    t = torch.randint(0, 1000, (EXAMPLES,), generator=draws)
    noise = torch.randn(x0.shape, generator=draws)
    return TensorDataset(x0, t, noise)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, required=True, help="per process")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--out", required=True)
    parser.add_argument("--shards", help="stream images from these shards instead")
    parser.add_argument("--workers", type=int, default=0)
    args = parser.parse_args()
    accelerator = Accelerator()
    if args.shards:
        return stream_shards(accelerator, args)
    unet, schedule = tiny_unet(), NoiseSchedule.scaled_linear()
    loader = DataLoader(
        examples(),
        batch_size=args.batch,
        shuffle=True,
        generator=torch.Generator().manual_seed(2),
        drop_last=True,
    )

    def loss_fn(model, batch):
        x0, t, noise = batch
        return F.mse_loss(model(schedule.add_noise(x0, noise, t), t), noise)

    ema = EMA(unet, decay=0.8)
    losses = fit(
        unet,
        loss_fn,
        loader,
        args.steps,
        lr=5e-4,
        ema=ema,
        warmup=2,
        progress=False,
        accelerator=accelerator,
    )
    draws = torch.randint(0, 2**31, (4,), generator=rank_generator(7)).tolist()
    every = [draws]
    if accelerator.num_processes > 1:
        every = [None] * accelerator.num_processes
        torch.distributed.all_gather_object(every, draws)
    if accelerator.is_main_process:
        weights = {f"unet.{k}": v for k, v in unet.state_dict().items()}
        weights |= {f"ema.{k}": v for k, v in ema.model.state_dict().items()}
        save_file({k: v.contiguous() for k, v in weights.items()}, args.out)
        report = {
            "processes": accelerator.num_processes,
            "losses": losses,
            "draws": every,
            "accumulation": accelerator.gradient_accumulation_steps,
            "precision": accelerator.mixed_precision,
        }
        with open(args.out + ".json", "w") as file:
            json.dump(report, file)
    accelerator.wait_for_everyone()


def stream_shards(accelerator, args):
    """`fit` a 1×1 convolution on images streamed from shards; every process
    writes how many batches it trained on, and of what size."""
    from sdscratch.shards import ShardStream

    stream = ShardStream(args.shards, args.batch, seed=3, workers=args.workers)
    model = torch.nn.Conv2d(3, 3, 1)
    sizes = []

    def loss_fn(model, batch):
        images, captions = batch
        sizes.append(len(captions))
        return (model(images) - images).pow(2).mean()

    fit(model, loss_fn, stream, args.steps, progress=False, accelerator=accelerator)
    rank = accelerator.process_index
    with open(f"{args.out}.rank{rank}.json", "w") as file:
        json.dump({"sizes": sizes, "skipped": stream.report()}, file)
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main()
