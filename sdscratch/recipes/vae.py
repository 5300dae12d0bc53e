"""vae: the autoencoder of the latent diffusion model (vae/), VAE_IMAGE_SIZE² Shapes
images <-> 4-channel latents, 2^(levels − 1) times smaller per side.

Its config carries the scaling factor measured on its training latents; its manifest,
the reconstruction PSNR on held-out scenes.
"""

import torch

from sdscratch.checkpoint import load_component, save_component
from sdscratch.recipes.common import (
    mean_of_last,
    recipe,
    saving,
    scenes_seed,
    seeded,
)
from sdscratch.shapes.data import Shapes, collate
from sdscratch.shapes.evaluate import real_images
from sdscratch.shards import ShardStream
from sdscratch.train import fit, processes, rank_generator
from sdscratch.vae import VAE, VAEConfig, measure_scaling_factor, psnr, vae_loss

VAE_IMAGE_SIZE = 32  # the images it encodes: VAE_IMAGE_SIZE / 4 latents per side
VAE_WIDTHS = (32, 32, 64)  # block_out_channels: each level after the first halves
VAE_STEPS = 500  # AdamW steps of VAE_BATCH images (300 already give ~30.7 dB)
VAE_BATCH = 32
VAE_LR = 4e-3  # peak learning rate, after VAE_WARMUP steps
VAE_WARMUP = 50
VAE_KL_WEIGHT = 1e-6  # β of the KL per latent number (see sdscratch.vae.vae_loss)
VAE_SCALE_SCENES = 1024  # training scenes whose latents set the scaling factor
VAE_VAL_SCENES = 500  # held-out scenes (val split) for the PSNR in the manifest


@recipe("vae", default_out="shapes-vae")
def train_vae(out, seed, steps, shards=None, checkpoint=None):
    """The course's small AutoencoderKL, trained on Shapes: squared error + tiny KL.

    shards: a folder of tar shards (`sdscratch data shards`, Shapes or one's own
    images) to stream the training images from, instead of drawing Shapes.
    checkpoint: a folder to save the run in and resume it from (`run_recipe`).
    """
    steps = steps or VAE_STEPS
    generator = torch.Generator().manual_seed(seed)  # the order, on every process
    # process 0 draws its latent samples from it too, as a single process does
    noise = generator if processes().is_main_process else rank_generator(seed)
    with seeded(seed):  # the initial weights
        vae = VAE(VAEConfig(block_out_channels=VAE_WIDTHS, sample_size=VAE_IMAGE_SIZE))
    train = Shapes("train", size=VAE_IMAGE_SIZE, seed=scenes_seed("vae", seed))
    loader = torch.utils.data.DataLoader(
        train, VAE_BATCH, shuffle=True, generator=generator, collate_fn=collate
    )
    if shards is not None:  # batches of (images, captions), endless, per process
        loader = ShardStream(shards, VAE_BATCH, size=VAE_IMAGE_SIZE, seed=seed)
    losses = fit(
        vae,
        lambda model, batch: vae_loss(model, batch[0], VAE_KL_WEIGHT, noise),
        loader,
        steps,
        lr=VAE_LR,
        warmup=min(VAE_WARMUP, steps // 10),
        desc="vae",
        generators=[generator, noise],
        **saving(checkpoint),
    )
    if shards is None:
        images = real_images(VAE_SCALE_SCENES, "train", train.seed, size=train.size)[0]
    else:  # the latents of the images it trained on set the scaling factor
        count = VAE_SCALE_SCENES // VAE_BATCH
        images = torch.cat([batch[0] for _, batch in zip(range(count), loader)])
    vae.config.scaling_factor = round(measure_scaling_factor(vae, images, generator), 5)
    save_component(vae, out / "vae", vae.config, dtype=torch.float16)
    stored = load_component(out / "vae", VAE, VAEConfig)
    val_seed = scenes_seed("vae", seed, "eval")
    held_out = real_images(VAE_VAL_SCENES, "val", val_seed, size=train.size)[0]
    with torch.no_grad():  # the PSNR of what was stored, and before float16
        psnrs = [
            psnr(held_out, m.decode(m.encode(held_out).mode())) for m in (stored, vae)
        ]
    skipped = {} if shards is None else {"shards_skipped": loader.report()}
    return skipped | {
        "psnr_db_val": round(psnrs[0], 2),
        "psnr_db_val_float32": round(psnrs[1], 2),
        "scaling_factor": stored.config.scaling_factor,
        "final_loss": round(mean_of_last(losses, 50), 5),
        "steps": steps,
        "parameters": sum(p.numel() for p in stored.parameters()),
    }
