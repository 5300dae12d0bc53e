"""controlnet: a ControlNet for a frozen latent model, steered by outlines or masks.

Zhang, Rao & Agrawala 2023, trained as diffusers' `examples/controlnet/
train_controlnet.py` trains one: the ControlNet starts as a copy of the base's UNet
(`ControlNet.from_unet`), the UNet, VAE and text encoder stay frozen, the loss is the
plain DDPM loss of the steered UNet's noise prediction, and a share of the captions
is replaced by the empty one (`--proportion_empty_prompts`; the paper's 50 %, §3.4,
so that the ControlNet learns to read the control image alone).

The base is any of our latent models (`--base`, default the bundled shapes-ldm): its
UNet sets the ControlNet's widths, its VAE the image size and the hint encoder's
halvings (two for a VAE that shrinks 4×, three for 8×). The controls are drawn from
the scenes themselves (`sdscratch.shapes.controls`). The folder written is the
ControlNet itself (config.json, model.safetensors), with MANIFEST.json: what
`sdscratch generate --controlnet FOLDER` loads.

Its quality: on test scenes, how well the generated objects cover the control's
shapes (`control_iou`) and how often they keep the colour the prompt names (the
bundled judge).
"""

import math

import torch
from torch import nn

from sdscratch.checkpoint import load_component, save_component
from sdscratch.controlnet import (
    ControlNet,
    ControlNetConfig,
    steered_unet,
    unet_digest,
)
from sdscratch.pipeline import StableDiffusion
from sdscratch.recipes.common import mean_of_last, recipe, scenes_seed, seeded
from sdscratch.shapes.controls import CONTROLS, draw_controls
from sdscratch.shapes.data import Shapes, canonical_caption
from sdscratch.shapes.judge import check
from sdscratch.shapes.outline import coverage_by_colour, outline_iou
from sdscratch.train import diffusion_loss, fit, rank_generator

CONTROLNET_STEPS = 2600  # AdamW steps of CONTROLNET_BATCH latents (~9 CPU minutes)
CONTROLNET_BATCH = 32
# peak learning rate, after CONTROLNET_WARMUP steps (1e-3: the same IoU, prompt
# accuracy 4 points lower, on the benchmark's 500 scenes)
CONTROLNET_LR = 2e-3
CONTROLNET_WARMUP = 30
CONTROLNET_DROPOUT = 0.5  # share of captions replaced by "" (the paper's, §3.4)
CONTROLNET_SCENES = 16_000  # training scenes encoded once (fewer for short runs)
HINT_WIDTHS = (16, 32, 64, 128)  # SD's (16, 32, 96, 256), scaled to our widths
CONNECTIONS = ("zero", "random")  # how the ControlNet's connections start
CONTROLNET_EVAL = 200  # test scenes generated for the manifest
CONTROLNET_EVAL_SETTINGS = dict(num_inference_steps=20, guidance_scale=7.5)


def hint_widths(vae_scale_factor: int) -> tuple[int, ...]:
    """The hint encoder's widths for a VAE that shrinks images `vae_scale_factor`×:
    one halving per factor of 2 (SD: 8×, three), widths from HINT_WIDTHS."""
    halvings = round(math.log2(vae_scale_factor))
    if 2**halvings != vae_scale_factor or not 1 <= halvings < len(HINT_WIDTHS):
        raise ValueError(f"No hint encoder for a VAE factor of {vae_scale_factor}.")
    return HINT_WIDTHS[: halvings + 1]


def make_controlnet(unet, vae_scale_factor, connections="zero", seed=0):
    """A ControlNet for `unet` (`ControlNet.from_unet`), its hint encoder sized for
    the VAE; with connections="random", the zero convolutions (and the hint
    encoder's last one) start as ordinary, randomly initialised convolutions: the
    paper's ablation of zero convolutions (§4.4)."""
    if connections not in CONNECTIONS:
        raise ValueError(
            f"Unknown connections {connections!r}; choose one of {list(CONNECTIONS)}."
        )
    with seeded(seed):  # the hint encoder's (and random connections') weights
        controlnet = ControlNet.from_unet(unet, hint_widths(vae_scale_factor))
        if connections == "random":
            for conv in zero_convolutions(controlnet):
                conv.reset_parameters()  # PyTorch's default (Kaiming uniform)
    return controlnet


def zero_convolutions(controlnet) -> list[nn.Conv2d]:
    """Every convolution that starts at zero: the skips', the mid block's, and the
    hint encoder's last."""
    return [*controlnet.zero_convs, controlnet.mid_zero_conv,
            controlnet.hint_encoder.conv_out]  # fmt: skip


@recipe("controlnet", default_out="shapes-controlnet")
def train_controlnet(
    out, seed, steps, base="shapes-ldm", control="outline", connections="zero"
):
    """A ControlNet for the frozen `base`, steered by `control` images ("outline"
    or "mask"), its connections starting at zero (or random)."""
    if control not in CONTROLS:
        raise ValueError(
            f"Unknown control {control!r}; choose one of {list(CONTROLS)}."
        )
    steps = steps or CONTROLNET_STEPS
    pipe = StableDiffusion.from_pretrained(base)
    for model in (pipe.unet, pipe.vae, pipe.text_encoder):
        model.requires_grad_(False)
    controlnet = make_controlnet(pipe.unet, pipe.vae_scale_factor, connections, seed)
    count = min(CONTROLNET_SCENES, steps * CONTROLNET_BATCH)
    data = encode_scenes(pipe, count, control, scenes_seed("controlnet", seed))
    losses = fit_controlnet(controlnet, pipe, data, steps, seed)
    save_component(controlnet, out, controlnet.config, dtype=torch.float16)
    stored = load_component(out, ControlNet, ControlNetConfig)  # as saved: float16
    n, scenes = (
        min(CONTROLNET_EVAL, 10 * steps),
        scenes_seed("controlnet", seed, "eval"),
    )
    quality = measure_controlnet(pipe, stored, control, n, seed, scenes=scenes)
    return {
        "base": str(base),
        "base_unet_sha256": unet_digest(base),  # generate refuses it for another
        "control": control,
        "connections": connections,
        **{key: round(value, 4) for key, value in quality.items()},
        "eval_images": n,
        **{f"eval_{key}": value for key, value in CONTROLNET_EVAL_SETTINGS.items()},
        "steps": steps,
        "batch_size": CONTROLNET_BATCH,
        "learning_rate": CONTROLNET_LR,
        "caption_dropout": CONTROLNET_DROPOUT,
        "training_scenes": count,
        "final_loss": round(mean_of_last(losses, 50), 4),
        "parameters": sum(p.numel() for p in controlnet.parameters()),
    }


def encode_scenes(pipe, count, control, seed=0, batch_size=500):
    """The first `count` training scenes, drawn at the base's image size: VAE
    posteriors, token ids and control images.

    Returns:
        means, stds (N, C, h, w) of q(z|x) (unscaled), ids (N, L), controls
        (N, 1, H, W) in [0, 1] (one channel; the ControlNet takes it three times).
    """
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    train, parts = Shapes("train", size=size, seed=seed), []
    for start in range(0, count, batch_size):
        chunk = range(start, min(start + batch_size, count))
        images, captions, attrs = train.batch(chunk)
        with torch.no_grad():
            posterior = pipe.vae.encode(images)
        controls = draw_controls(attrs, control, size)[:, :1]  # (B, 1, H, W)
        ids = pipe.tokenizer(captions)  # (B, L)
        parts.append((posterior.mean, posterior.std, ids, controls))
    return [torch.cat(part) for part in zip(*parts)]


def fit_controlnet(controlnet, pipe, data, steps, seed, callback=None) -> list[float]:
    """`fit` the ControlNet: the frozen UNet, steered by it, predicts the noise of
    fresh posterior samples; CONTROLNET_DROPOUT of the captions are the empty one.

    Args:
        data: `encode_scenes`' means, stds, ids and controls.
        seed: of the one generator of batches, latent samples, dropout and noise.
        callback: `callback(step, controlnet)` before each step, `step` of them
            done (benchmarks/controlnet.py measures the training curve so).
    Returns:
        the loss of every step.
    """
    means, stds, ids, controls = data
    scale, empty = pipe.vae.config.scaling_factor, pipe.tokenizer([""])  # (1, L)
    generator = rank_generator(seed)

    def batches():
        for _ in range(steps):
            yield torch.randint(0, len(means), (CONTROLNET_BATCH,), generator=generator)

    done = iter(range(steps))

    def loss_fn(model, i):
        if callback is not None:
            callback(next(done), model)
        noise = torch.randn(means[i].shape, generator=generator)
        latents = (means[i] + stds[i] * noise) * scale  # a posterior sample, scaled
        drop = torch.rand(len(i), generator=generator) < CONTROLNET_DROPOUT
        with torch.no_grad():
            context = pipe.text_encoder(torch.where(drop[:, None], empty, ids[i]))
        control = controls[i].expand(-1, 3, -1, -1)  # (B, 3, H, W)
        steered = steered_unet(pipe.unet, model, control)
        return diffusion_loss(steered, latents, pipe.schedule, generator, context)

    warmup = min(CONTROLNET_WARMUP, steps // 10)
    return fit(controlnet, loss_fn, batches(), steps, lr=CONTROLNET_LR,
               warmup=warmup, desc="controlnet")  # fmt: skip


# ----------------------------------------------------------------------------------
# Measuring a ControlNet


def control_iou(images, masks) -> torch.Tensor:
    """How well the objects of generated images cover the control's shapes.

    The objects' pixels are read as `sdscratch.shapes.outline` reads them: each
    pixel's coverage by the nearest palette colour (`coverage_by_colour`); the
    measure is its soft IoU with the shapes' coverage, both edges steepened to half
    a pixel (`outline_iou`). A stray blob, a missing object or a wrong shape all
    lower it.

    Args:
        images: (B, 3, H, W) in [-1, 1].
        masks: (B, H, W) the control's shapes' coverage in [0, 1] (the "mask"
            control of the same scenes).
    Returns:
        (B,) IoU in [0, 1].
    """
    _, coverage = coverage_by_colour(images)  # (B, H, W)
    return torch.from_numpy(outline_iou(coverage.numpy(), masks.float().numpy()))


def measure_controlnet(pipe, controlnet, control, n, seed, scenes=0, scale=1.0,
                       batch_size=100, **settings) -> dict:  # fmt: skip
    """Adherence and colour of images steered by a ControlNet, on the first n test
    scenes: each scene's canonical caption as the prompt, its control image as the
    control.

    Args:
        control: the kind of control the ControlNet reads ("outline", "mask").
        seed: of the sampling noise; scenes: Shapes' seed of the scenes.
        scale: `controlnet_conditioning_scale`.
        settings: the pipeline's (default CONTROLNET_EVAL_SETTINGS).
    Returns:
        {"control_iou": mean IoU, "colour_accuracy": share of images whose objects
        have the colours the prompt names (the judge's reading), "prompt_accuracy":
        share right in every attribute}.
    """
    attrs = [Shapes("test", seed=scenes).scene(i)[1] for i in range(n)]
    captions = [canonical_caption(scene) for scene in attrs]
    images = generate_steered(pipe, controlnet, captions, attrs, control, seed, scale,
                              batch_size, **settings)  # fmt: skip
    return adherence(images, attrs)


def generate_steered(pipe, controlnet, captions, attrs, control, seed, scale=1.0,
                     batch_size=100, **settings) -> torch.Tensor:  # fmt: skip
    """The pipeline's image for each caption, steered by the control of each scene
    (attrs), batch after batch from one generator: (N, 3, H, W) in [-1, 1]."""
    settings = CONTROLNET_EVAL_SETTINGS | settings
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    generator, images = torch.Generator().manual_seed(seed), []
    for start in range(0, len(captions), batch_size):
        chunk = slice(start, start + batch_size)
        controls = draw_controls(attrs[chunk], control, size)
        images.append(pipe(captions[chunk], image=controls, controlnet=controlnet,
                           controlnet_conditioning_scale=scale, generator=generator,
                           output_type="pt", **settings))  # fmt: skip
    return torch.cat(images)


def adherence(images, attrs) -> dict:
    """`measure_controlnet`'s figures of images (N, 3, H, W) made for scenes attrs."""
    size = images.shape[-1]
    masks = draw_controls(attrs, "mask", size)[:, 0]  # (N, H, W)
    right = check(images, attrs)
    return {
        "control_iou": control_iou(images, masks).mean().item(),
        "colour_accuracy": right["colour"].float().mean().item(),
        "prompt_accuracy": right["scene"].float().mean().item(),
    }
