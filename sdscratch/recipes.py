"""The recipes that made every checkpoint in assets/models/.

A recipe is a function registered with `@recipe("name")`; `python -m sdscratch train
NAME` runs it, times it and writes the checkpoint's MANIFEST.json (command, seed, wall
time, sha256 of every file, measured quality). A recipe takes `(out, seed, steps)`:
the folder to write, the seed for every random draw, and an optional override of its
number of training steps (for short runs and tests); it returns the quality it
measured, as a dict. Together the recipes run in 60 minutes or less on a 2-core CPU.
"""

import contextlib
import os
import random
import shlex
import shutil
import tempfile
import time
from pathlib import Path

import torch

from sdscratch.checkpoint import resolve, write_manifest

RECIPES = {}


def recipe(name, default_out=None):
    """Register `fn(out: Path, seed: int, steps: int | None) -> dict` as a recipe."""

    def register(fn):
        RECIPES[name] = (fn, default_out or name)
        return fn

    return register


TRAINED = Path("trained")  # where `train` writes by default: trained/<folder>


def run_recipe(name, out=None, seed=0, steps=None, force=False) -> dict:
    """Run a registered recipe, then write MANIFEST.json; return the manifest.

    The recipe writes into a new hidden folder beside `out`, which takes its place
    only when the run has finished: an interrupted or failed run leaves `out` as it
    was. A bundled checkpoint is replaced only if `out` names it and `force` is set.

    Args:
        name: the recipe's name, as in `python -m sdscratch train NAME`.
        out: output folder (default: trained/<the recipe's folder>, in the current
            folder); it must not exist, or be empty, unless `force`.
        seed: seeds every random draw of the recipe.
        steps: override the recipe's number of steps (short runs, tests).
        force: replace `out` if it holds anything.
    """
    if name not in RECIPES:
        raise ValueError(f"Unknown recipe {name!r}; choose one of {sorted(RECIPES)}.")
    fn, default_out = RECIPES[name]
    command = ["python", "-m", "sdscratch", "train", name, "--seed", str(seed)]
    command += ["--steps", str(steps)] if steps is not None else []
    command += ["--out", str(out)] if out else []
    out = Path(out) if out else TRAINED / default_out
    _check_out(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        start = time.perf_counter()
        quality = fn(staging, seed, steps)
        seconds = time.perf_counter() - start
        manifest = write_manifest(staging, shlex.join(command), seed, seconds, quality)
    except BaseException:  # also Ctrl-C: no half-made checkpoint stays behind
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _move_into_place(staging, out, force)
    return manifest


def _check_out(out: Path, force: bool):
    """Refuse an output that is a file, or a folder with something in it (unless
    `force`): `train` never mixes a new checkpoint into an old one."""
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise ValueError(f"Cannot train into {out}: it is not a folder.")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ValueError(
            f"{out} holds files already; pass --force to replace it, or choose "
            "another --out."
        )


def _move_into_place(staging: Path, out: Path, force: bool):
    """Rename the finished `staging` folder to `out`; with `force`, the old `out`
    is removed only once the new one is in place."""
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()  # an empty folder holds nothing to lose
    if not out.exists():
        with contextlib.suppress(OSError):  # a folder that appeared meanwhile
            staging.rename(out)
            return
    if not force:
        raise ValueError(
            f"{out} appeared while training, so the new checkpoint stays in {staging}."
        )
    old = out.parent / f".{out.name}.old"
    shutil.rmtree(old, ignore_errors=True)
    out.rename(old)
    staging.rename(out)
    shutil.rmtree(old)


# ----------------------------------------------------------------------------------
# judge: the attribute classifier that scores generated images (sdscratch.metrics).
# Trained on real Shapes images, each mildly degraded (blur, colour shift, noise) so
# that it stays fair to generated ones; checked on test scenes, which it never saw.

JUDGE_STEPS, JUDGE_BATCH, JUDGE_LR = 600, 128, 3e-3
JUDGE_HELDOUT = 10_000  # test scenes the accuracy is measured on


@recipe("judge", default_out="shapes-judge")
def train_judge(out, seed, steps):
    """The attribute judge, on one thread like the other recipes: the bundled judge
    was made on one thread, and a two-thread run gave different weights (threads
    split the sums differently), so only one thread reproduces it bit for bit."""
    with _one_thread():
        return _train_judge(out, seed, steps)


def _train_judge(out, seed, steps):
    import os
    import time

    import torch

    from sdscratch.checkpoint import save_component
    from sdscratch.data import Shapes, collate
    from sdscratch.metrics import (
        Judge,
        JudgeConfig,
        attribute_accuracy,
        degrade,
        judge_loss,
        real_images,
    )
    from sdscratch.train import fit

    cpu_start, config = time.process_time(), JudgeConfig()
    with torch.random.fork_rng():  # the initial weights, from the seed
        torch.manual_seed(seed)
        judge = Judge(config)
    loader = torch.utils.data.DataLoader(
        Shapes("train", seed=seed),
        batch_size=JUDGE_BATCH,
        shuffle=True,
        collate_fn=collate,
        generator=torch.Generator().manual_seed(seed),
    )
    noise = torch.Generator().manual_seed(seed + 1)

    def loss_fn(model, batch):
        images, _, scenes = batch
        return judge_loss(model, degrade(images, noise), scenes)

    steps = steps or JUDGE_STEPS
    losses = fit(judge, loss_fn, loader, steps, lr=JUDGE_LR, warmup=50, desc="judge")
    save_component(judge, out / "judge", config)
    images, _, scenes = real_images(JUDGE_HELDOUT, "test", seed=seed)
    degraded = degrade(images, torch.Generator().manual_seed(seed + 2))
    accuracy = _rounded(attribute_accuracy(images, scenes, judge))
    accuracy_degraded = _rounded(attribute_accuracy(degraded, scenes, judge))
    return {
        "steps": steps,
        "cpu_seconds": round(time.process_time() - cpu_start),  # one thread
        "threads": 1,
        "load_average_end": round(os.getloadavg()[0], 1),
        "final_loss": round(sum(losses[-20:]) / len(losses[-20:]), 5),
        "parameters": sum(p.numel() for p in judge.parameters()),
        "heldout": f"the first {JUDGE_HELDOUT:,} scenes of the test split",
        "heldout_accuracy": accuracy,
        "heldout_accuracy_degraded": accuracy_degraded,
    }


def _rounded(values: dict, digits=4) -> dict:
    return {key: round(value, digits) for key, value in values.items()}


# ----------------------------------------------------------------------------------
# vae: the autoencoder of the latent diffusion model (vae/), 32×32×3 Shapes <-> 8×8×4
# latents. Its config carries the scaling factor measured on its training latents;
# its manifest, the reconstruction PSNR on held-out scenes.

VAE_STEPS = 500  # AdamW steps of VAE_BATCH images (300 already give ~30.7 dB)
VAE_BATCH = 32
VAE_LR = 4e-3  # peak learning rate, after VAE_WARMUP steps
VAE_WARMUP = 50
VAE_KL_WEIGHT = 1e-6  # β of the KL per latent number (see sdscratch.vae.vae_loss)
VAE_SCALE_SCENES = 1024  # training scenes whose latents set the scaling factor
VAE_VAL_SCENES = 500  # held-out scenes (val split) for the PSNR in the manifest
VAE_THREADS = 1  # torch threads while training: see train_vae


@recipe("vae", default_out="shapes-vae")
def train_vae(out, seed, steps):
    """The course's small AutoencoderKL, trained on Shapes: squared error + tiny KL.

    Runs on one thread: on the shared 2-core machine (load ~12) a step of batch 32
    took 0.6 CPU s and 1.6 s wall on one thread, but 5.7 CPU s and 17 s wall on two,
    whose threads spin waiting for each other.
    """
    steps, threads = steps or VAE_STEPS, torch.get_num_threads()
    cpu_start, load_start = time.process_time(), os.getloadavg()[0]
    torch.set_num_threads(VAE_THREADS)
    try:
        return _train_vae(out, seed, steps, cpu_start, load_start)
    finally:
        torch.set_num_threads(threads)


def _train_vae(out, seed, steps, cpu_start, load_start):
    from sdscratch.checkpoint import load_component, save_component
    from sdscratch.data import Shapes, collate
    from sdscratch.train import fit
    from sdscratch.vae import VAE, VAEConfig, measure_scaling_factor, psnr, vae_loss

    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        vae = VAE(VAEConfig())
    train = Shapes("train")  # the course's dataset; `seed` drives the model
    loader = torch.utils.data.DataLoader(
        train, VAE_BATCH, shuffle=True, generator=generator, collate_fn=collate
    )
    losses = fit(
        vae,
        lambda model, batch: vae_loss(model, batch[0], VAE_KL_WEIGHT, generator),
        loader,
        steps,
        lr=VAE_LR,
        warmup=min(VAE_WARMUP, steps // 10),
        desc="vae",
    )
    images = train.batch(range(VAE_SCALE_SCENES))[0]
    vae.config.scaling_factor = round(measure_scaling_factor(vae, images, generator), 5)
    save_component(vae, out / "vae", vae.config, dtype=torch.float16)
    stored = load_component(out / "vae", VAE, VAEConfig)
    held_out = Shapes("val").batch(range(VAE_VAL_SCENES))[0]
    with torch.no_grad():  # the PSNR of what was stored, and before float16
        psnrs = [
            psnr(held_out, m.decode(m.encode(held_out).mode())) for m in (stored, vae)
        ]
    return {
        "psnr_db_val": round(psnrs[0], 2),
        "psnr_db_val_float32": round(psnrs[1], 2),
        "scaling_factor": stored.config.scaling_factor,
        "final_loss": round(sum(losses[-50:]) / len(losses[-50:]), 5),
        "steps": steps,
        "threads": VAE_THREADS,
        "cpu_seconds": round(time.process_time() - cpu_start),
        "load_average": [round(load_start, 2), round(os.getloadavg()[0], 2)],
        "parameters": sum(p.numel() for p in stored.parameters()),
    }


# ----------------------------------------------------------------------------------
# clip: the tiny CLIP on Shapes (tokenizer/, text_encoder/, image_encoder/). Its text
# encoder is the conditioning of every text-to-image model of the course, and the
# whole CLIP is the CLIP-score judge.

CLIP_STEPS = 1200  # AdamW steps of CLIP_BATCH image-caption pairs (8 CPU minutes)
CLIP_BATCH = 128
CLIP_POOL = 20_000  # training scenes drawn once, then sampled from
CLIP_CONTEXT = 32  # tokens per prompt; Shapes captions need at most 16
CLIP_TEST_SCENES = 1000  # held-out scenes (test split) for the zero-shot accuracy
CLIP_THREADS = 1  # its layers are small: one thread wastes no CPU time waiting


def clip_configs(vocab_size, eos_token_id):
    """The tiny CLIP's text and image encoder configs."""
    from sdscratch.clip import ImageEncoderConfig, TextEncoderConfig

    text = TextEncoderConfig(
        vocab_size=vocab_size,
        max_position_embeddings=CLIP_CONTEXT,
        hidden_size=96,
        intermediate_size=384,
        num_hidden_layers=3,
        num_attention_heads=3,
        eos_token_id=eos_token_id,
        projection_dim=64,
    )
    return text, ImageEncoderConfig(image_size=32, channels=(32, 64, 128))


def _scene_key(attrs) -> tuple:
    """What a caption says, so that "A above B" and "B below A" get one key."""
    objects = [(o["shape"], o["colour"], o["size"]) for o in attrs["objects"]]
    relation = attrs["relation"]
    if relation is None:
        return (*objects, attrs["objects"][0]["position"])
    mirrored = {"below": "above", "right of": "left of"}
    if relation in mirrored:
        objects, relation = objects[::-1], mirrored[relation]
    return (*objects, relation)


def _hard_negative(attrs, rng) -> dict:
    """A scene one change away from `attrs`: a new attribute, or for two objects
    also another relation, the objects swapped, or their colours swapped."""
    from sdscratch.clip import scene_edits

    edits = scene_edits(attrs)
    while True:
        edit = rng.choice(edits[rng.choice(sorted(edits))])
        if _scene_key(edit) != _scene_key(attrs):
            return edit


@recipe("clip", default_out="shapes-clip")
def train_clip(out, seed, steps):
    """A byte-level BPE vocabulary and a tiny CLIP, trained on Shapes captions.

    Every caption in a batch comes with a hard negative, the caption of a scene one
    change away ("a blue circle above a red square" for "a red circle above a blue
    square"): random batches seldom hold such pairs, and without them CLIP learns
    a bag of words that ignores order (Yuksekgonul et al. 2023, NegCLIP).
    """
    threads, load = torch.get_num_threads(), os.getloadavg()[0]
    torch.set_num_threads(CLIP_THREADS)
    try:
        quality = _train_clip(out, seed, steps or CLIP_STEPS)
    finally:
        torch.set_num_threads(threads)
    load = [round(load, 2), round(os.getloadavg()[0], 2)]
    return {**quality, "threads": CLIP_THREADS, "load_average_start_end": load}


def _train_clip(out, seed, steps):
    """The clip recipe's work, in `CLIP_THREADS` threads (see `train_clip`)."""
    from sdscratch.clip import (
        CLIP,
        ImageEncoder,
        TextEncoder,
        contrastive_loss,
        zero_shot_accuracy,
    )
    from sdscratch.data import Shapes, caption, vocabulary
    from sdscratch.tokenizer import train_bpe
    from sdscratch.train import fit

    cpu_start = time.process_time()
    train = Shapes("train")  # the course's dataset; `seed` drives the rest
    sample = [train.scene(i)[0] for i in range(5000)]
    tokenizer = train_bpe(sample, vocab_size=1000, context_length=CLIP_CONTEXT)
    split = [word for word in vocabulary() if len(tokenizer.tokenize(word)) > 1]
    if split:
        raise ValueError(f"The trained vocabulary splits caption words {split}.")
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        text_config, image_config = clip_configs(len(tokenizer), tokenizer.eos_id)
        clip = CLIP(TextEncoder(text_config), ImageEncoder(image_config), tokenizer)

    pool = min(CLIP_POOL, steps * CLIP_BATCH)
    images, captions, scenes = train.batch(range(pool))
    rng = random.Random(seed)
    negatives = [_hard_negative(scene, rng) for scene in scenes]
    ids = tokenizer(captions)  # (N, L)
    negative_ids = tokenizer([caption(scene, rng) for scene in negatives])  # (N, L)
    keys = [_scene_key(scene) for scene in scenes + negatives]
    index = {key: i for i, key in enumerate(dict.fromkeys(keys))}  # key -> group
    groups = torch.tensor([index[key] for key in keys]).reshape(2, pool)  # (2, N)
    generator = torch.Generator().manual_seed(seed)

    def batches():
        for _ in range(steps):
            i = torch.randint(0, pool, (CLIP_BATCH,), generator=generator)
            texts = torch.cat([ids[i], negative_ids[i]])  # (2B, L)
            yield images[i], texts, groups[0, i], groups[:, i].flatten()

    def loss_fn(model, batch):
        x, texts, image_groups, text_groups = batch
        same = image_groups[:, None] == text_groups[None, :]  # (B, 2B)
        return contrastive_loss(model(x, texts), same)

    losses = fit(clip, loss_fn, batches(), steps, lr=2e-3, warmup=100, desc="clip")
    temperature = 1 / clip.logit_scale.exp().item()
    clip.save_pretrained(out, dtype=torch.float16)

    test = Shapes("test", length=min(CLIP_TEST_SCENES, 100 * steps))  # short: fewer
    test_images, _, test_scenes = test.batch(range(len(test)))
    saved = CLIP.from_pretrained(out, verify=False)  # as stored, in float16
    accuracy = zero_shot_accuracy(saved, test_images, test_scenes)
    before = zero_shot_accuracy(clip, test_images, test_scenes)  # float32
    change = max(abs(accuracy[q]["accuracy"] - before[q]["accuracy"]) for q in before)
    return {
        "zero_shot": accuracy,
        "float16_changes_accuracy_by": round(change, 4),
        "final_loss": round(sum(losses[-50:]) / len(losses[-50:]), 4),
        "temperature": round(temperature, 4),
        "vocab_size": len(tokenizer),
        "steps": steps,
        "batch_size": CLIP_BATCH,
        "cpu_seconds": round(time.process_time() - cpu_start),  # summed over threads
    }


# ----------------------------------------------------------------------------------
# pixel-uncond, pixel-text: Stable Diffusion's UNet on 32×32 Shapes pixels (lessons 03
# and 06). Small widths and attention only at 8×8: pixel space is expensive on a CPU,
# the latent model carries the quality. Trained on one thread: the budget is CPU time,
# and on a busy 2-core machine a second thread mostly spins (measured: 0.6 against
# 4.5 CPU seconds per step).

PIXEL_STEPS = 450  # AdamW steps of PIXEL_BATCH scenes
PIXEL_BATCH = 32
PIXEL_LR = 3e-3
PIXEL_SCENES = 10_240  # training scenes rendered once, reshuffled every epoch
PIXEL_SAMPLES = 64  # samples (DDIM, 25 steps) that the quality figures are measured on


def pixel_unet_config(cross_attention_dim=None):
    """The bundled pixel UNets: (16, 32, 64) channels, one ResBlock per level,
    a SpatialTransformer at 8×8 (with cross-attention if `cross_attention_dim`)."""
    from sdscratch.unet import UNetConfig

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
def pixel_uncond(out, seed, steps):
    """An unconditional UNet on 32×32 Shapes pixels with SD v1's noise schedule.

    DDPM loss, EMA weights saved in float16 to `out/unet`. Quality: held-out loss,
    FID of samples (judge features) next to the real-vs-real floor, and the share of
    the samples' pixels that are the background or one of the six colours.
    """
    import torch

    from sdscratch.checkpoint import load_component, save_component
    from sdscratch.schedules import NoiseSchedule
    from sdscratch.unet import UNet, UNetConfig

    steps, cpu_start = steps or PIXEL_STEPS, time.process_time()
    with _one_thread():
        config, schedule = pixel_unet_config(), NoiseSchedule.scaled_linear()
        with torch.random.fork_rng():  # the initial weights, from the seed
            torch.manual_seed(seed)
            unet = UNet(config)
        images = _val_images(min(PIXEL_SCENES, PIXEL_BATCH * steps), seed, "train")
        ema, losses = _train_pixel_unet(unet, schedule, images, None, steps, seed)
        save_component(ema, out / "unet", config, dtype=torch.float16)
        bundled = load_component(out / "unet", UNet, UNetConfig)  # as stored
        eps_fn = bundled  # unconditional: ε̂ = unet(x, t)
        quality, _ = _pixel_quality(bundled, schedule, seed, eps_fn)
    return {
        "steps": steps,
        "batch_size": PIXEL_BATCH,
        "cpu_seconds": round(time.process_time() - cpu_start),  # one thread
        "load_average": os.getloadavg()[0],
        "parameters": sum(p.numel() for p in unet.parameters()),
        "train_loss_last_50_steps": round(sum(losses[-50:]) / len(losses[-50:]), 4),
        **quality,
    }


PIXEL_TEXT_STEPS = 700
CAPTION_DROPOUT = 0.1  # share of training captions replaced by the empty prompt
GUIDANCE = 3.0  # classifier-free guidance scale of the measured samples


@recipe("pixel-text", default_out="shapes-pixel-text")
def pixel_text(out, seed, steps):
    """A text-conditioned UNet on 32×32 Shapes pixels.

    Its cross-attention reads the hidden states of shapes-clip's frozen text
    encoder, copied with its tokenizer into `out`. Captions are replaced by the
    empty prompt CAPTION_DROPOUT of the time, so that one model also predicts the
    unconditional noise: classifier-free guidance (Ho & Salimans 2022). Quality
    adds the judge's prompt accuracy of guided samples of evaluation prompts.
    """
    import torch

    from sdscratch.checkpoint import load_component, save_component
    from sdscratch.data import Shapes
    from sdscratch.metrics import evaluation_prompts, prompt_accuracy
    from sdscratch.schedules import NoiseSchedule
    from sdscratch.unet import UNet, UNetConfig

    steps, cpu_start = steps or PIXEL_TEXT_STEPS, time.process_time()
    with _one_thread():
        encode = _copy_text_encoder(resolve("shapes-clip"), out)
        hidden = encode([""])
        config = pixel_unet_config(cross_attention_dim=hidden.shape[-1])
        schedule = NoiseSchedule.scaled_linear()
        with torch.random.fork_rng():  # the initial weights, from the seed
            torch.manual_seed(seed)
            unet = UNet(config)
        count = min(PIXEL_SCENES, PIXEL_BATCH * steps)
        images, captions, _ = Shapes("train", seed=seed, length=count).batch(
            range(count)
        )
        contexts = encode(captions)  # (N, L, D), the frozen encoder's
        ema, losses = _train_pixel_unet(
            unet, schedule, images, contexts, steps, seed, empty=hidden[0]
        )
        save_component(ema, out / "unet", config, dtype=torch.float16)
        bundled = load_component(out / "unet", UNet, UNetConfig)  # as stored
        prompts, scenes = evaluation_prompts(PIXEL_SAMPLES, seed=seed)
        eps_fn = guided(bundled, encode(prompts), hidden, GUIDANCE)
        val_captions = Shapes("val", seed=seed, length=512).batch(range(512))[1]
        quality, samples = _pixel_quality(
            bundled, schedule, seed, eps_fn, encode(val_captions)
        )
        accuracy = prompt_accuracy(samples, scenes)
    return {
        "steps": steps,
        "batch_size": PIXEL_BATCH,
        "caption_dropout": CAPTION_DROPOUT,
        "cpu_seconds": round(time.process_time() - cpu_start),  # one thread
        "load_average": os.getloadavg()[0],
        "parameters": sum(p.numel() for p in unet.parameters()),
        "train_loss_last_50_steps": round(sum(losses[-50:]) / len(losses[-50:]), 4),
        "guidance_scale": GUIDANCE,
        f"prompt_accuracy_{PIXEL_SAMPLES}_test_prompts": round(accuracy, 3),
        **quality,
    }


def _copy_text_encoder(source, out):
    """Copy tokenizer/ and text_encoder/ of a CLIP checkpoint into `out`; return
    `encode(list of str) -> (B, L, D)`, its frozen hidden states."""
    import shutil

    import torch

    from sdscratch.checkpoint import load_component, verify
    from sdscratch.clip import TextEncoder, TextEncoderConfig
    from sdscratch.tokenizer import Tokenizer

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
    """Classifier-free guidance (Ho & Salimans 2022, eq. 6):
    ε̂ = ε̂(x, ∅) + scale · (ε̂(x, text) − ε̂(x, ∅)).

    Args:
        context: (B, L, D) the prompts' hidden states; empty: (1, L, D) the empty
            prompt's. Returns `eps_fn(x, t)` for `sdscratch.samplers.sample`.
    """
    import torch

    def eps_fn(x, t):
        both = torch.cat([empty.expand_as(context), context])  # (2B, L, D)
        uncond, cond = unet(torch.cat([x, x]), torch.cat([t, t]), both).chunk(2)
        return uncond + scale * (cond - uncond)

    return eps_fn


def _train_pixel_unet(unet, schedule, images, contexts, steps, seed, empty=None):
    """`fit` the UNet on (images, contexts) batches; return its EMA and the losses.

    contexts: (N, L, D) text hidden states, one per image, or None (unconditional).
    empty: (L, D) the empty prompt's, put in place of CAPTION_DROPOUT of contexts.
    """
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from sdscratch.train import EMA, diffusion_loss, fit

    tensors = (images,) if contexts is None else (images, contexts)
    batches = DataLoader(
        TensorDataset(*tensors),
        batch_size=PIXEL_BATCH,
        shuffle=True,
        generator=torch.Generator().manual_seed(seed),
        drop_last=len(images) > PIXEL_BATCH,
    )
    noise = torch.Generator().manual_seed(seed + 1)

    def loss_fn(model, batch):
        context = batch[1] if len(batch) > 1 else None
        if empty is not None:
            drop = torch.rand(len(context), generator=noise) < CAPTION_DROPOUT
            context = torch.where(drop[:, None, None], empty, context)
        return diffusion_loss(model, batch[0], schedule, noise, context)

    ema = EMA(unet, decay=0.98)
    warmup = min(30, steps // 10)
    losses = fit(unet, loss_fn, batches, steps, PIXEL_LR, ema, warmup=warmup)
    return ema.model, losses


def _pixel_quality(unet, schedule, seed, eps_fn, contexts=None) -> dict:
    """Held-out loss; FID (judge features) and solid-colour share of samples.

    eps_fn: `eps_fn(x, t) -> ε̂` for the first PIXEL_SAMPLES noises (guided for
    text models); contexts: (512, L, D) for the held-out loss, or None.
    """
    import torch

    from sdscratch.metrics import (
        fid_floor,
        frechet_distance,
        image_features,
        real_features,
    )
    from sdscratch.samplers import sample
    from sdscratch.train import diffusion_loss

    n, images = PIXEL_SAMPLES, _val_images(512, seed)
    held_out = torch.Generator().manual_seed(seed + 2)
    with torch.no_grad():
        val_loss = diffusion_loss(unet, images, schedule, held_out, contexts).item()
        noise = torch.randn((n, 3, 32, 32), generator=held_out)
        samples = sample(eps_fn, noise, "ddim", 25, schedule)
    fid = frechet_distance(image_features(samples), real_features(n, "val", seed))
    return {
        "val_loss_512_scenes": round(val_loss, 4),
        f"fid_{n}_samples_judge_features": round(fid, 2),
        f"fid_{n}_real_vs_real_floor": round(fid_floor(n, seed=seed), 2),
        "solid_colour_share_samples": round(solid_colour_share(samples), 3),
        "solid_colour_share_real": round(solid_colour_share(images[:n]), 3),
    }, samples


def _val_images(n, seed, split="val"):
    """The first n images of a split, (n, 3, 32, 32)."""
    from sdscratch.data import Shapes

    return Shapes(split, seed=seed, length=n).batch(range(n))[0]


@contextlib.contextmanager
def _one_thread():
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def solid_colour_share(images, tolerance=0.2) -> float:
    """The share of pixels within `tolerance` (RGB distance, [-1, 1] units) of the
    Shapes background or one of its six colours: ~0.95 for real scenes (the rest
    are anti-aliased edges), low for blurry, noisy or muddy samples.

    Args:
        images: (B, 3, H, W) in [-1, 1].
    """
    import torch

    from sdscratch.data import BACKGROUND, COLOURS

    palette = [torch.tensor(rgb) / 127.5 - 1 for rgb in COLOURS.values()]
    palette = torch.stack([torch.full((3,), BACKGROUND), *palette])  # (7, 3)
    pixels = images.clamp(-1, 1).permute(0, 2, 3, 1).reshape(-1, 3)  # (B·H·W, 3)
    distance = torch.cdist(pixels, palette).min(dim=1).values
    return (distance < tolerance).float().mean().item()


# ----------------------------------------------------------------------------------
# ldm: the latent text-to-image model (unet/, with copies of the bundled vae/,
# text_encoder/ and tokenizer/), the course's Stable Diffusion. The frozen VAE encodes
# the training scenes once (the posterior's mean and std, so that every step still
# draws a fresh latent sample); the frozen text encoder's hidden states are cheap and
# computed per batch. Its manifest holds the prompt accuracy and FID that the bundled
# judge measures on samples of the saved pipeline, at LDM_EVAL_SETTINGS.

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
LDM_THREADS = 1  # torch threads: see train_ldm
LDM_EVAL_SETTINGS = dict(num_inference_steps=20, guidance_scale=7.5, sampler="ddim")


def ldm_unet_config(latent_channels=4, latent_size=8, context_dim=96):
    """The latent UNet: SD v1's layout, two levels (8×8 and 4×4 for 8×8 latents),
    cross-attention to the text at both and in the middle."""
    from sdscratch.unet import UNetConfig

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


def encode_scenes(vae, tokenizer, count, batch_size=500):
    """The first `count` training scenes as VAE posteriors and token ids.

    Returns:
        means, stds (count, C, h, w) of the posterior q(z|x) (unscaled), ids (count, L).
    """
    import torch

    from sdscratch.data import Shapes

    train, means, stds, ids = Shapes("train"), [], [], []
    for start in range(0, count, batch_size):
        images, captions, _ = train.batch(range(start, min(start + batch_size, count)))
        with torch.no_grad():
            posterior = vae.encode(images)
        means.append(posterior.mean)
        stds.append(posterior.std)
        ids.append(tokenizer(captions))
    return torch.cat(means), torch.cat(stds), torch.cat(ids)


def load_ldm_parts():
    """The frozen VAE, text encoder and tokenizer (checked against their manifests)
    and the folders each came from."""
    from sdscratch.checkpoint import load_component, resolve, verify
    from sdscratch.clip import TextEncoder, TextEncoderConfig
    from sdscratch.tokenizer import Tokenizer
    from sdscratch.vae import VAE, VAEConfig

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
def train_ldm(out, seed, steps):
    """Stable Diffusion on Shapes: a text-conditioned UNet on the bundled VAE's
    latents, conditioned on the bundled text encoder, with caption dropout.

    Runs on one thread, as the vae recipe does: on the shared 2-core machine (load
    ~17) a training step took 0.44 CPU s on one thread, while two threads spin
    waiting for each other.
    """
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(LDM_THREADS)
    try:
        return _train_ldm(out, seed, steps or LDM_STEPS)
    finally:
        torch.set_num_threads(threads)


def _train_ldm(out, seed, steps):
    import os
    import shutil
    import time

    import torch

    from sdscratch.checkpoint import load_component, save_component
    from sdscratch.pipeline import StableDiffusion, write_schedule
    from sdscratch.schedules import NoiseSchedule
    from sdscratch.train import EMA, diffusion_loss, fit
    from sdscratch.unet import UNet, UNetConfig

    cpu_start, load = time.process_time(), os.getloadavg()
    vae, text_encoder, tokenizer, roots = load_ldm_parts()
    count = min(LDM_SCENES, steps * LDM_BATCH)
    means, stds, ids = encode_scenes(vae, tokenizer, count)  # (N, C, h, w), (N, L)
    empty = tokenizer([""])  # (1, L): the caption of a dropped caption
    scale, schedule = vae.config.scaling_factor, NoiseSchedule.scaled_linear()
    width = text_encoder.config.hidden_size
    config = ldm_unet_config(means.shape[1], means.shape[-1], width)
    with torch.random.fork_rng():  # the initial weights, from the seed
        torch.manual_seed(seed)
        unet = UNet(config)
    generator = torch.Generator().manual_seed(seed)

    def batches():
        for _ in range(steps):
            yield torch.randint(0, count, (LDM_BATCH,), generator=generator)

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
                 warmup=min(LDM_WARMUP, steps // 10), ema=ema, desc="ldm")  # fmt: skip
    save_component(ema.model, out / "unet", config, dtype=torch.float16)
    for name, root in roots.items():
        shutil.copytree(root / name, out / name, dirs_exist_ok=True)  # the same bytes
    write_schedule(out, schedule)
    training_cpu = time.process_time() - cpu_start
    stored = load_component(out / "unet", UNet, UNetConfig)  # as saved: float16
    pipe = StableDiffusion(stored, vae, text_encoder, tokenizer, schedule)
    quality = measure_ldm(pipe, seed, n=min(LDM_EVAL, 10 * steps))
    return quality | {
        "steps": steps,
        "batch_size": LDM_BATCH,
        "training_scenes": count,
        "final_loss": round(sum(losses[-100:]) / len(losses[-100:]), 4),
        "parameters": sum(p.numel() for p in unet.parameters()),
        "threads": LDM_THREADS,
        "cpu_seconds_training": round(training_cpu),  # summed over threads
        "cpu_seconds": round(time.process_time() - cpu_start),
        "load_average_start": round(load[0], 1),
        "load_average_end": round(os.getloadavg()[0], 1),
    }


def measure_ldm(pipe, seed, n=LDM_EVAL, settings=LDM_EVAL_SETTINGS) -> dict:
    """Prompt accuracy (one- and two-object prompts) and FID of a pipeline.

    The prompts are the canonical captions of the test split's first n scenes; FID
    compares with the val split's first n images, next to the real-vs-real floor at
    the same n (sdscratch.metrics' convention).
    """
    import torch

    from sdscratch.metrics import (
        evaluation_prompts,
        fid_floor,
        frechet_distance,
        image_features,
        prompt_accuracy,
        real_features,
    )

    captions, scenes = evaluation_prompts(n, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    images = torch.cat([
        pipe(captions[i : i + 250], generator=generator, output_type="pt", **settings)
        for i in range(0, n, 250)
    ])  # fmt: skip
    accuracy = {}
    for k in (1, 2):
        chosen = [i for i, scene in enumerate(scenes) if len(scene["objects"]) == k]
        accuracy[k] = prompt_accuracy(images[chosen], [scenes[i] for i in chosen])
    fid = frechet_distance(image_features(images), real_features(n, "val", seed))
    return {
        "prompt_accuracy_one_object": round(accuracy[1], 4),
        "prompt_accuracy_two_objects": round(accuracy[2], 4),
        "fid": round(fid, 2),
        "fid_real_vs_real": round(fid_floor(n, seed=seed), 2),
        "eval_images": n,
        **{f"eval_{key}": value for key, value in settings.items()},
    }
