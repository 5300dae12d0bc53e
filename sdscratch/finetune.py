"""Fine-tuning a trained Stable Diffusion on a few images of something new.

Four methods, one loss (the denoising loss the model was trained with, Ho et al.
2020, eq. 14, on the example images' latents and captions); they differ in what
may change:

- "textual_inversion" (Gal et al. 2022): only the new token's vectors;
- "lora" (Hu et al. 2021): only the low-rank changes of the attention projections;
- "dreambooth" (Ruiz et al. 2023): the whole UNet, with prior preservation: images
  of the concept's class, drawn by the base model before training ("a heart" →
  "a shape"), are trained on too, so that the class keeps its meaning (eq. 2:
  L = L_concept + λ · L_prior);
- "full": the whole UNet, without prior preservation, for comparison.

A LoRA may be trained with prior preservation too (DreamBooth-LoRA, as diffusers'
`train_dreambooth_lora.py --with_prior_preservation`).

`finetune` returns what was learned (a `LoRA`, `NewTokens`, or the UNet itself) and
the loss at every step; the VAE and the text encoder stay frozen throughout.
"""

import torch

from sdscratch.lora import UNET_TARGETS, freeze, inject_lora
from sdscratch.textual_inversion import start_textual_inversion
from sdscratch.train import diffusion_loss, fit

METHODS = ("textual_inversion", "lora", "dreambooth", "full")
LEARNING_RATES = {  # defaults for the bundled model's size (AdamW)
    "textual_inversion": 5e-3,
    "lora": 1e-2,  # 1e-3 barely begins to draw a new shape in 300 steps
    "dreambooth": 1e-4,
    "full": 1e-4,
}


@torch.no_grad()
def encode_examples(pipe, images: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) images in [-1, 1] -> (N, C, h, w) scaled latents: the VAE
    posterior's mean, computed once (as kohya's "cache latents")."""
    posterior = pipe.vae.encode(images.to(pipe.device, pipe.dtype))
    return posterior.mean * pipe.vae.config.scaling_factor


@torch.no_grad()
def class_images(pipe, prompt: str, count: int, seed=0, **options) -> torch.Tensor:
    """DreamBooth's class images: `count` images of `prompt` drawn by the model
    as it is now (before fine-tuning), (count, 3, H, W) in [-1, 1].

    Args:
        options: for the pipeline call (num_inference_steps, guidance_scale...).
    """
    generator = torch.Generator().manual_seed(seed)
    return pipe([prompt] * count, generator=generator, output_type="pt", **options)


def denoising_loss(pipe, latents, prompts, generator=None) -> torch.Tensor:
    """The training loss on (B, C, h, w) latents and their B captions."""
    context = pipe.text_encoder(pipe.tokenizer(prompts).to(pipe.device))  # (B, L, D)
    return diffusion_loss(pipe.unet, latents, pipe.schedule, generator, context)


def start(pipe, method, rank=4, alpha=None, token=None, num_vectors=1,
          init_token=None, targets=UNET_TARGETS):  # fmt: skip
    """Freeze the pipeline and make trainable what `method` trains.

    Args:
        rank, alpha, targets: a LoRA's (targets: which layers, see `inject_lora`;
            ("attn2.to_k", "attn2.to_v") changes only the keys and values that
            read the text, as Kumari et al. 2023's Custom Diffusion does).
        token, num_vectors, init_token: textual inversion's.

    Returns:
        The module whose parameters train: `NewTokens`, a `LoRA` or the UNet.
    """
    if method not in METHODS:
        raise ValueError(f"Unknown fine-tuning method {method!r}; one of {METHODS}.")
    freeze(pipe.unet, pipe.vae, pipe.text_encoder)
    if method == "textual_inversion":
        if not token:
            raise ValueError("Textual inversion needs the new token, e.g. '<heart>'.")
        return start_textual_inversion(pipe, token, num_vectors, init_token)
    if method == "lora":
        return inject_lora({"unet": pipe.unet}, rank, alpha, targets=targets)
    return pipe.unet.requires_grad_(True)


def finetune(
    pipe,
    method,
    images,
    prompts,
    steps=100,
    lr=None,
    batch_size=4,
    seed=0,
    prior=None,
    prior_weight=1.0,
    progress=False,
    **options,
):
    """Fine-tune `pipe` in place on a few captioned images.

    Args:
        pipe: a `StableDiffusion`.
        method: "textual_inversion", "lora", "dreambooth" or "full".
        images: (N, 3, H, W) in [-1, 1], the examples (N ≤ 20 in the course).
        prompts: their N captions (with the new token, for textual inversion).
        steps, lr, batch_size: AdamW steps, learning rate (default: by method),
            examples per step.
        seed: draws the initial weights (a LoRA's A), the batches, timesteps and
            noise: the same seed, the same result, whatever ran before.
        prior: DreamBooth's (class images, class prompts), e.g. from
            `class_images`; needed by "dreambooth", optional for "lora" (as
            diffusers' DreamBooth-LoRA script), refused by the others ("full" is
            the comparison without it).
        prior_weight: λ of the prior-preservation loss.
        options: for `start` (rank, alpha, targets, token, num_vectors,
            init_token).
    Returns:
        (the trained module, the loss at every step).
    """
    if len(images) != len(prompts):
        raise ValueError(f"Got {len(images)} images for {len(prompts)} prompts.")
    if method == "dreambooth" and prior is None:
        raise ValueError("DreamBooth needs its class images: prior=(images, prompts).")
    if method in ("textual_inversion", "full") and prior is not None:
        raise ValueError(f"No prior preservation for {method}: only DreamBooth's "
                         "and a LoRA's changes are kept from drifting.")  # fmt: skip
    generator = torch.Generator().manual_seed(seed)
    latents = encode_examples(pipe, images)
    prior_latents = None if prior is None else encode_examples(pipe, prior[0])
    with torch.random.fork_rng():  # a LoRA's A (or TI's start) from `seed` too
        torch.manual_seed(seed)
        trained = start(pipe, method, **options)
    order = torch.randperm(len(latents), generator=generator)
    batches = list(order.split(batch_size))

    def loss_fn(module, rows):
        loss = denoising_loss(pipe, latents[rows], [prompts[i] for i in rows],
                              generator)  # fmt: skip
        if prior_latents is not None:  # Ruiz et al. 2023, eq. 2
            picks = torch.randint(len(prior_latents), (len(rows),), generator=generator)
            class_prompts = [prior[1][i] for i in picks]
            prior_loss = denoising_loss(pipe, prior_latents[picks], class_prompts,
                                        generator)  # fmt: skip
            loss = loss + prior_weight * prior_loss
        return loss

    lr = LEARNING_RATES[method] if lr is None else lr
    losses = fit(trained, loss_fn, batches, steps, lr=lr, desc=method,
                 progress=progress)  # fmt: skip
    if method == "textual_inversion":
        trained.write()
    freeze(pipe.unet)
    return trained, losses
