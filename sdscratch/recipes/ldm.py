"""ldm: the latent text-to-image model, the course's Stable Diffusion.

It holds unet/, with copies of the bundled vae/, text_encoder/ and tokenizer/. The
frozen VAE encodes the training scenes once (the posterior's mean and std, so that
every step still draws a fresh latent sample); the frozen text encoder's hidden states
are cheap and computed per batch. Its manifest holds the prompt accuracy and FID that
the bundled judge measures on samples of the saved pipeline, at LDM_EVAL_SETTINGS.
"""

import shutil
import time

import torch

from sdscratch.checkpoint import load_component, resolve, save_component, verify
from sdscratch.clip import TextEncoder, TextEncoderConfig
from sdscratch.pipeline import StableDiffusion, write_schedule
from sdscratch.recipes.common import (
    mean_of_last,
    recipe,
    saving,
    scenes_seed,
    seeded,
    shard_batches,
)
from sdscratch.schedules import NoiseSchedule
from sdscratch.shapes.data import Shapes
from sdscratch.shapes.evaluate import evaluate_model
from sdscratch.tokenizer import Tokenizer
from sdscratch.train import EMA, diffusion_loss, fit, rank_generator
from sdscratch.unet import UNet, UNetConfig
from sdscratch.vae import VAE, VAEConfig

LDM_STEPS = 2500  # AdamW steps of LDM_BATCH latents (about 21 minutes on one thread)
LDM_BATCH = 64
LDM_LR = 2e-3  # peak learning rate, after LDM_WARMUP steps
LDM_WARMUP = 100
LDM_EMA = 0.998  # decay of the EMA weights that are saved
LDM_DROPOUT = 0.1  # share of captions replaced by "" (classifier-free guidance)
LDM_SNR_GAMMA = 5.0  # Min-SNR loss weighting (sdscratch.train.diffusion_loss)
LDM_SCENES = 32_000  # training scenes encoded once (fewer for short runs)
LDM_PARTS = {"vae": "shapes-vae", "clip": "shapes-clip"}  # the frozen parts
LDM_EVAL = 500  # generated images (test-split prompts) judged for the manifest
LDM_EVAL_SETTINGS = dict(num_inference_steps=20, guidance_scale=7.5, sampler="ddim")


def ldm_unet_config(latent_channels=4, latent_size=8, context_dim=96):
    """The latent UNet: SD v1's layout, two levels (8×8 and 4×4 for 8×8 latents),
    cross-attention to the text at both and in the middle."""
    return UNetConfig(
        in_channels=latent_channels,
        out_channels=latent_channels,
        sample_size=latent_size,
        block_out_channels=(32, 64),
        layers_per_block=1,
        attention_levels=(True, True),
        mid_attention=True,
        cross_attention_dim=context_dim,
        num_heads=4,
        norm_num_groups=16,
    )


def encode_scenes(vae, tokenizer, count, batch_size=500, seed=0):
    """The first `count` training scenes as VAE posteriors and token ids.

    Args:
        seed: Shapes' seed of the scenes (the course's dataset: 0), drawn at the
            size the VAE was trained on.
    Returns:
        means, stds (count, C, h, w) of the posterior q(z|x) (unscaled), ids (count, L).
    """
    train = Shapes("train", size=vae.config.sample_size, seed=seed)
    batches = (
        train.batch(range(start, min(start + batch_size, count)))[:2]
        for start in range(0, count, batch_size)
    )
    return encode_batches(vae, tokenizer, batches)


def encode_batches(vae, tokenizer, batches):
    """(images (B, 3, H, W), captions) batches as VAE posteriors and token ids:
    means, stds (N, C, h, w) of q(z|x) (unscaled) and ids (N, L), N in all."""
    means, stds, ids = [], [], []
    for images, captions in batches:
        with torch.no_grad():
            posterior = vae.encode(images)
        means.append(posterior.mean)
        stds.append(posterior.std)
        ids.append(tokenizer(captions))
    return torch.cat(means), torch.cat(stds), torch.cat(ids)


def load_ldm_parts():
    """The frozen VAE, text encoder and tokenizer (checked against their manifests)
    and the folders each came from."""
    vae_root, clip_root = resolve(LDM_PARTS["vae"]), resolve(LDM_PARTS["clip"])
    verify(vae_root, components=("vae",))
    verify(clip_root, components=("text_encoder", "tokenizer"))
    vae = load_component(vae_root / "vae", VAE, VAEConfig)
    text_encoder = load_component(
        clip_root / "text_encoder", TextEncoder, TextEncoderConfig
    )
    tokenizer = Tokenizer.from_pretrained(clip_root / "tokenizer")
    roots = {"vae": vae_root, "text_encoder": clip_root, "tokenizer": clip_root}
    frozen = [model.eval().requires_grad_(False) for model in (vae, text_encoder)]
    return *frozen, tokenizer, roots


@recipe("ldm", default_out="shapes-ldm")
def train_ldm(out, seed, steps, checkpoint=None, shards=None):
    """Stable Diffusion on Shapes: a text-conditioned UNet on the bundled VAE's
    latents, conditioned on the bundled text encoder, with caption dropout.

    shards: a folder of tar shards (`sdscratch data shards`, e.g. one's own
    captioned images) whose first images and captions it encodes and trains on,
    as many as it would draw Shapes scenes, instead of those scenes.
    """
    steps, cpu_start = steps or LDM_STEPS, time.process_time()
    vae, text_encoder, tokenizer, roots = load_ldm_parts()
    count = min(LDM_SCENES, steps * LDM_BATCH)
    (means, stds, ids), skipped = _training_latents(  # (N, C, h, w), (N, L)
        vae, tokenizer, count, seed, shards
    )
    schedule = NoiseSchedule.scaled_linear()
    width = text_encoder.config.hidden_size
    config = ldm_unet_config(means.shape[1], means.shape[-1], width)
    with seeded(seed):  # the initial weights
        unet = UNet(config)
    posteriors = (means, stds, vae.config.scaling_factor)
    text = (ids, tokenizer([""]), text_encoder)  # the empty caption: (1, L)
    ema, losses = _fit_latent_unet(
        unet, schedule, posteriors, text, steps, seed, checkpoint
    )
    save_component(ema, out / "unet", config, dtype=torch.float16)
    for name, root in roots.items():
        shutil.copytree(root / name, out / name, dirs_exist_ok=True)  # the same bytes
    write_schedule(out, schedule)
    training_cpu = time.process_time() - cpu_start
    stored = load_component(out / "unet", UNet, UNetConfig)  # as saved: float16
    pipe = StableDiffusion(stored, vae, text_encoder, tokenizer, schedule)
    eval_seed = scenes_seed("ldm", seed, "eval")
    quality = measure_ldm(pipe, seed, n=min(LDM_EVAL, 10 * steps), scenes=eval_seed)
    quality |= skipped
    return quality | {
        "steps": steps,
        "batch_size": LDM_BATCH,
        "training_scenes": len(means),
        "final_loss": round(mean_of_last(losses, 100), 4),
        "parameters": sum(p.numel() for p in unet.parameters()),
        "cpu_seconds_training": round(training_cpu),  # summed over threads
    }


def _training_latents(vae, tokenizer, count, seed, shards=None):
    """The posteriors and token ids of the first `count` training scenes, or of
    about as many images from `shards`; and what the shards skipped (a dict for
    the manifest, empty without shards)."""
    if shards is None:
        scenes = scenes_seed("ldm", seed)
        return encode_scenes(vae, tokenizer, count, seed=scenes), {}
    size = vae.config.sample_size
    batches, stream = shard_batches(shards, count, LDM_BATCH, seed, size)
    encoded = encode_batches(vae, tokenizer, batches)
    return encoded, {"shards_skipped": stream.report()}


def _fit_latent_unet(unet, schedule, posteriors, text, steps, seed, checkpoint=None):
    """`fit` the UNet on fresh posterior samples of the encoded scenes, with
    LDM_DROPOUT of the captions replaced by the empty one; return its EMA model
    and the losses.

    Args:
        posteriors: means, stds (N, C, h, w) of q(z|x), and the VAE's scaling factor.
        text: token ids (N, L) of the captions, of the empty caption (1, L), and
            the frozen text encoder.
        seed: of the one generator of batches, latent samples, dropout and noise.
        checkpoint: a folder to save the run in and resume it from, or None.
    """
    (means, stds, scale), (ids, empty, text_encoder) = posteriors, text
    generator = rank_generator(seed)  # each process its own batches and noise

    def batches():
        for _ in range(steps):
            yield torch.randint(0, len(means), (LDM_BATCH,), generator=generator)

    def loss_fn(model, i):
        noise = torch.randn(means[i].shape, generator=generator)
        latents = (means[i] + stds[i] * noise) * scale  # a posterior sample, scaled
        drop = torch.rand(len(i), generator=generator) < LDM_DROPOUT
        batch_ids = torch.where(drop[:, None], empty, ids[i])  # (B, L)
        with torch.no_grad():
            context = text_encoder(batch_ids)  # (B, L, D)
        return diffusion_loss(
            model, latents, schedule, generator, context, LDM_SNR_GAMMA
        )

    ema = EMA(unet, decay=LDM_EMA)
    losses = fit(unet, loss_fn, batches(), steps, lr=LDM_LR,
                 warmup=min(LDM_WARMUP, steps // 10), ema=ema, desc="ldm",
                 generators=[generator], **saving(checkpoint))  # fmt: skip
    return ema.model, losses


def measure_ldm(pipe, seed, n=LDM_EVAL, settings=LDM_EVAL_SETTINGS, scenes=None):
    """Prompt accuracy (one- and two-object prompts) and FID of a pipeline, as the
    manifest records them: `sdscratch.shapes.evaluate.evaluate_model`'s figures.

    The prompts are the canonical captions of the test split's first n scenes; FID
    compares with the val split's first n images, next to the real-vs-real floor at
    the same n.

    Args:
        seed: the seed of the sampling noise.
        scenes: Shapes' seed of the prompts' and the real images' scenes (default:
            `seed`).
    """
    scenes = seed if scenes is None else scenes
    result = evaluate_model(pipe, n, seed=seed, batch_size=250, scenes=scenes,
                            progress=False, **settings)  # fmt: skip
    return {
        "prompt_accuracy_one_object": round(result["prompt_accuracy_one_object"], 4),
        "prompt_accuracy_two_objects": round(result["prompt_accuracy_two_objects"], 4),
        "fid": round(result["fid"], 2),
        "fid_real_vs_real": round(result["fid_floor"], 2),
        "eval_images": n,
        **{f"eval_{key}": value for key, value in settings.items()},
    }
