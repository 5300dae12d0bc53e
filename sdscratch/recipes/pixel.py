"""pixel-uncond, pixel-text: Stable Diffusion's UNet on 32×32 Shapes pixels (lessons
03 and 06).

Small widths and attention only at 8×8: pixel space is expensive on a CPU, the latent
model carries the quality. Both share one training loop (`_train_pixel_unet`) and
one measure of quality (`_pixel_quality`).

Both diffuse scaled pixels, as Stable Diffusion diffuses its latents × 0.18215:
Shapes pixels (mostly flat grey) have a standard deviation of about 0.19, and scaled
towards unit variance they meet the noise schedule as the data it was made for.
pixel-uncond scales by PIXEL_SCALE (5: about unit variance); pixel-text by
PIXEL_TEXT_SCALE (2.5): at 5, SD's schedule leaves a larger share of the image in
the first noise (√ᾱ_T · 5 ≈ 0.34), so the layout follows the noise more and the
prompt less. `benchmarks/pixel_scale.py` measures both. Samples are divided by the
scale, which each manifest records as "pixel_scale".
"""

import shutil

import torch
from torch.utils.data import DataLoader, TensorDataset

from sdscratch.checkpoint import load_component, resolve, save_component, verify
from sdscratch.clip import TextEncoder, TextEncoderConfig
from sdscratch.metrics import frechet_distance
from sdscratch.pipeline import classifier_free_guidance
from sdscratch.recipes.common import (
    mean_of_last,
    recipe,
    saving,
    scenes_seed,
    seeded,
    shard_batches,
)
from sdscratch.samplers import sample
from sdscratch.schedules import NoiseSchedule
from sdscratch.shapes.data import BACKGROUND, COLOURS
from sdscratch.shapes.evaluate import (
    evaluation_prompts,
    fid_floor,
    real_features,
    real_images,
)
from sdscratch.shapes.judge import image_features, prompt_accuracy
from sdscratch.tokenizer import Tokenizer
from sdscratch.train import EMA, diffusion_loss, fit, rank_generator
from sdscratch.unet import UNet, UNetConfig

PIXEL_STEPS = 800  # AdamW steps of PIXEL_BATCH scenes
PIXEL_BATCH = 32
PIXEL_LR = 3e-3
PIXEL_SCENES = 10_240  # training scenes rendered once, reshuffled every epoch
PIXEL_SAMPLES = 64  # samples (DDIM, 25 steps) that the quality figures are measured on
PIXEL_TEXT_STEPS = 2400  # 1,400: 42 % of 512 prompts right, 2,400: 68 %
PIXEL_SCALE = 5.0  # pixel-uncond's pixels × this: about unit variance (std 0.19)
PIXEL_TEXT_SCALE = 2.5  # pixel-text's
CAPTION_DROPOUT = 0.1  # share of training captions replaced by the empty prompt
GUIDANCE = 3.0  # classifier-free guidance scale of the measured samples


def pixel_unet_config(cross_attention_dim=None):
    """The bundled pixel UNets: (16, 32, 64) channels, one ResBlock per level,
    a SpatialTransformer at 8×8 (with cross-attention if `cross_attention_dim`)."""
    return UNetConfig(
        in_channels=3,
        out_channels=3,
        sample_size=32,
        block_out_channels=(16, 32, 64),
        layers_per_block=1,
        attention_levels=(False, False, cross_attention_dim is not None),
        mid_attention=True,
        cross_attention_dim=cross_attention_dim,
        num_heads=4,
        norm_num_groups=8,
    )


@recipe("pixel-uncond", default_out="shapes-pixel-uncond")
def pixel_uncond(out, seed, steps, checkpoint=None, shards=None, scale=PIXEL_SCALE):
    """An unconditional UNet on 32×32 Shapes pixels with SD v1's noise schedule.

    DDPM loss, EMA weights saved in float16 to `out/unet`. Quality: held-out loss,
    FID of samples (judge features) next to the real-vs-real floor, and the share of
    the samples' pixels that are the background or one of the six colours.
    shards: a folder of tar shards whose first images it trains on (as many as it
    would draw Shapes scenes) instead of those scenes.
    scale: it diffuses pixels × scale (the manifest's "pixel_scale"; samples are
    divided by it).
    """
    steps = steps or PIXEL_STEPS
    config, schedule = pixel_unet_config(), NoiseSchedule.scaled_linear()
    with seeded(seed):  # the initial weights
        unet = UNet(config)
    count = min(PIXEL_SCENES, PIXEL_BATCH * steps)
    images, _, skipped = _training_scenes("pixel-uncond", count, seed, shards)
    ema, losses = _train_pixel_unet(
        unet, schedule, images * scale, None, steps, seed, checkpoint=checkpoint
    )
    save_component(ema, out / "unet", config, dtype=torch.float16)
    bundled = load_component(out / "unet", UNet, UNetConfig)  # as stored
    eps_fn = bundled  # unconditional: ε̂ = unet(x, t)
    val_seed = scenes_seed("pixel-uncond", seed, "eval")
    quality, _ = _pixel_quality(bundled, schedule, seed, val_seed, eps_fn, scale=scale)
    return skipped | {
        "steps": steps,
        "batch_size": PIXEL_BATCH,
        "pixel_scale": scale,
        "parameters": sum(p.numel() for p in unet.parameters()),
        "train_loss_last_50_steps": round(mean_of_last(losses, 50), 4),
        **quality,
    }


@recipe("pixel-text", default_out="shapes-pixel-text")
def pixel_text(out, seed, steps, checkpoint=None, shards=None, scale=PIXEL_TEXT_SCALE):
    """A text-conditioned UNet on 32×32 Shapes pixels.

    Its cross-attention reads the hidden states of shapes-clip's frozen text
    encoder, copied with its tokenizer into `out`. Captions are replaced by the
    empty prompt CAPTION_DROPOUT of the time, so that one model also predicts the
    unconditional noise: classifier-free guidance (Ho & Salimans 2022). Quality
    adds the judge's prompt accuracy of guided samples of evaluation prompts.
    shards: a folder of tar shards whose first captioned images it trains on (as
    many as it would draw Shapes scenes) instead of those scenes.
    scale: it diffuses pixels × scale (the manifest's "pixel_scale"; samples are
    divided by it).
    """
    steps = steps or PIXEL_TEXT_STEPS
    encode = _copy_text_encoder(resolve("shapes-clip"), out)
    hidden = encode([""])  # (1, L, D)
    config = pixel_unet_config(cross_attention_dim=hidden.shape[-1])
    schedule = NoiseSchedule.scaled_linear()
    with seeded(seed):  # the initial weights
        unet = UNet(config)
    count = min(PIXEL_SCENES, PIXEL_BATCH * steps)
    images, captions, skipped = _training_scenes("pixel-text", count, seed, shards)
    contexts = encode(captions)  # (N, L, D), the frozen encoder's
    ema, losses = _train_pixel_unet(
        unet, schedule, images * scale, contexts, steps, seed, hidden[0], checkpoint
    )
    save_component(ema, out / "unet", config, dtype=torch.float16)
    bundled = load_component(out / "unet", UNet, UNetConfig)  # as stored
    return skipped | {
        "steps": steps,
        "batch_size": PIXEL_BATCH,
        "caption_dropout": CAPTION_DROPOUT,
        "pixel_scale": scale,
        "parameters": sum(p.numel() for p in unet.parameters()),
        "train_loss_last_50_steps": round(mean_of_last(losses, 50), 4),
        "guidance_scale": GUIDANCE,
        **_guided_quality(bundled, schedule, seed, encode, hidden, scale),
    }


def _training_scenes(name, count, seed, shards=None):
    """The first `count` training scenes of recipe `name` (images (N, 3, 32, 32)
    and captions), or about as many images and captions from `shards`; and what
    the shards skipped (a dict for the manifest, empty without shards)."""
    if shards is None:
        images, captions, _ = real_images(count, "train", scenes_seed(name, seed))
        return images, captions, {}
    batches, stream = shard_batches(shards, count, PIXEL_BATCH, seed)
    images, captions = zip(*batches)  # B-image tensors, B-caption lists
    captions = [caption for batch in captions for caption in batch]
    return torch.cat(images), captions, {"shards_skipped": stream.report()}


def _guided_quality(unet, schedule, seed, encode, hidden, scale) -> dict:
    """pixel-text's quality: the prompt accuracy of PIXEL_SAMPLES guided samples of
    evaluation prompts, then `_pixel_quality`'s figures of the same samples (the
    model diffuses pixels × scale)."""
    val_seed = scenes_seed("pixel-text", seed, "eval")
    prompts, scenes = evaluation_prompts(PIXEL_SAMPLES, seed=val_seed)
    eps_fn = guided(unet, encode(prompts), hidden, GUIDANCE)
    val_captions = real_images(512, "val", val_seed)[1]
    quality, samples = _pixel_quality(
        unet, schedule, seed, val_seed, eps_fn, encode(val_captions), scale
    )
    accuracy = round(prompt_accuracy(samples, scenes), 3)
    return {f"prompt_accuracy_{PIXEL_SAMPLES}_test_prompts": accuracy, **quality}


def _copy_text_encoder(source, out):
    """Copy tokenizer/ and text_encoder/ of a CLIP checkpoint into `out`; return
    `encode(list of str) -> (B, L, D)`, its frozen hidden states."""
    verify(source, components=("tokenizer", "text_encoder"))
    for part in ("tokenizer", "text_encoder"):
        shutil.copytree(source / part, out / part, dirs_exist_ok=True)
    tokenizer = Tokenizer.from_pretrained(out / "tokenizer")
    encoder = load_component(out / "text_encoder", TextEncoder, TextEncoderConfig)

    @torch.no_grad()
    def encode(texts):
        ids = tokenizer(texts)  # (B, L)
        return torch.cat([encoder(chunk) for chunk in ids.split(512)])

    return encode


def guided(unet, context, empty, scale):
    """Classifier-free guidance with the empty prompt as the negative one:
    `sdscratch.pipeline.classifier_free_guidance`.

    Args:
        context: (B, L, D) the prompts' hidden states; empty: (1, L, D) the empty
            prompt's. Returns `eps_fn(x, t)` for `sdscratch.samplers.sample`.
    """
    return classifier_free_guidance(unet, context, empty.expand_as(context), scale)


def _train_pixel_unet(
    unet, schedule, images, contexts, steps, seed, empty=None, checkpoint=None
):
    """`fit` the UNet on (images, contexts) batches; return its EMA and the losses.

    contexts: (N, L, D) text hidden states, one per image, or None (unconditional).
    empty: (L, D) the empty prompt's, put in place of CAPTION_DROPOUT of contexts.
    checkpoint: a folder to save the run in and resume it from, or None.
    """
    tensors = (images,) if contexts is None else (images, contexts)
    order = torch.Generator().manual_seed(seed)
    batches = DataLoader(
        TensorDataset(*tensors),
        batch_size=PIXEL_BATCH,
        shuffle=True,
        generator=order,
        drop_last=len(images) > PIXEL_BATCH,
    )
    noise = rank_generator(seed + 1)  # each process its own noise

    def loss_fn(model, batch):
        context = batch[1] if len(batch) > 1 else None
        if empty is not None:
            drop = torch.rand(len(context), generator=noise) < CAPTION_DROPOUT
            context = torch.where(drop[:, None, None], empty, context)
        return diffusion_loss(model, batch[0], schedule, noise, context)

    ema = EMA(unet, decay=0.98)
    warmup = min(30, steps // 10)
    losses = fit(unet, loss_fn, batches, steps, PIXEL_LR, ema, warmup=warmup,
                 generators=[order, noise], **saving(checkpoint))  # fmt: skip
    return ema.model, losses


def _pixel_quality(unet, schedule, seed, val_seed, eps_fn, contexts=None, scale=1.0):
    """Held-out loss; FID (judge features) and solid-colour share of samples.

    Args:
        seed: the run's seed, of the noises (seed + 2); val_seed: the Shapes seed
            of the held-out scenes.
        eps_fn: `eps_fn(x, t) -> ε̂` for the first PIXEL_SAMPLES noises (guided for
            text models); contexts: (512, L, D) for the held-out loss, or None.
        scale: the model diffuses pixels × scale.
    Returns:
        the figures (a dict) and the samples (PIXEL_SAMPLES, 3, 32, 32), pixels.
    """
    n, images = PIXEL_SAMPLES, real_images(512, "val", val_seed)[0]
    held_out = torch.Generator().manual_seed(seed + 2)
    with torch.no_grad():
        val_loss = diffusion_loss(
            unet, images * scale, schedule, held_out, contexts
        ).item()
        noise = torch.randn((n, 3, 32, 32), generator=held_out)
        samples = sample(eps_fn, noise, "ddim", 25, schedule) / scale
    real = real_features(n, "val", val_seed)
    fid = frechet_distance(image_features(samples), real)
    return {
        "val_loss_512_scenes": round(val_loss, 4),
        f"fid_{n}_samples_judge_features": round(fid, 2),
        f"fid_{n}_real_vs_real_floor": round(fid_floor(n, seed=val_seed), 2),
        "solid_colour_share_samples": round(solid_colour_share(samples), 3),
        "solid_colour_share_real": round(solid_colour_share(images[:n]), 3),
    }, samples


def solid_colour_share(images, tolerance=0.2) -> float:
    """The share of pixels within `tolerance` (RGB distance, [-1, 1] units) of the
    Shapes background or one of its six colours: ~0.95 for real scenes (the rest
    are anti-aliased edges), low for blurry, noisy or muddy samples.

    Args:
        images: (B, 3, H, W) in [-1, 1].
    """
    palette = [torch.tensor(rgb) / 127.5 - 1 for rgb in COLOURS.values()]
    palette = torch.stack([torch.full((3,), BACKGROUND), *palette])  # (7, 3)
    pixels = images.clamp(-1, 1).permute(0, 2, 3, 1).reshape(-1, 3)  # (B·H·W, 3)
    distance = torch.cdist(pixels, palette).min(dim=1).values
    return (distance < tolerance).float().mean().item()
