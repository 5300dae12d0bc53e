"""Erasing a concept from a trained model: ESD (Gandikota et al. 2023).

"Erasing Concepts from Diffusion Models" fine-tunes a copy θ of the UNet so that,
on a prompt c that shows the concept, it predicts what the frozen original θ*
predicts when guided *away* from the concept (negative guidance as the teacher):

    ε_θ(x_t, c, t)  →  ε*(x_t, a, t) − η · (ε*(x_t, c, t) − ε*(x_t, a, t))

with a the anchor. In the paper a is the empty prompt: c comes to mean "anything
but c". An anchor that keeps the rest of c ("a small triangle on the left" for "a
small red triangle on the left") erases only part of it: here "red", from triangles
alone. η (the paper's 1.0) is how far past the anchor the target lies. The loss is
the squared error to that target, ‖ε_θ(x_t, c, t) − target‖².

Which weights train decides what else changes. "xattn" (ESD-x) trains only
the cross-attention (`attn2`), the one place the prompt enters: the change stays
with prompts that name the concept. "noxattn" (ESD-u) trains everything else: the
concept goes whatever the prompt says, and more of the rest moves with it.
"selfattn" and "full" are the paper's other choices.

Where x_t comes from (`x_t=`):

- "sampled" (the paper's): every step samples part-way from noise with the model
  being edited, under c, and trains at the level reached. On-policy: the x_t are
  those the edited model still visits. It costs up to `SAMPLED_STEPS` UNet calls
  per training step.
- "noised" (the default): the frozen model's own images of c, drawn once before
  training, noised to a random t at every step, as in training (q(x_t | x_0)). The
  x_t are those the *original* visits when it draws c, at every t, for the price
  of one draw; and the original's images of c are exactly where the concept
  lives, which is what the target must move. On the bundled model both erase;
  "sampled" took about 9 times the CPU time and damaged more: its chains drift
  with the edited model, and it trains on what that drift draws.

Preservation (`preserve=`, not in the paper): prompts that must keep their
meaning train towards the original's own prediction, λ · ‖ε_θ(x_t, p, t) −
ε*(x_t, p, t)‖², on the original's images of p. It costs one more UNet pass per
step.

What `benchmarks/erasing.py` measured on the bundled model, erasing "red" from
triangles with the anchors without "red": every train method erases it (the
triangles turn orange, the hue next to red: η pushes past the anchor, away from
red) and keeps them triangles; without preservation, red goes from the other
shapes too (ESD-x: red circles, squares and stars drawn right 20 % of the time,
from 100 %). One reason: the text encoder is causal, so in "a small red triangle"
the word "red" has not yet seen "triangle", and its hidden state is the one it
has in "a small red circle". Preservation on other red shapes and other-coloured
triangles (λ = 10, on shapes and colours the damage is not measured on) repairs
that for "noxattn" and "full" (about 99 % right) but not for "xattn" (56 %); with
30 unrelated captions preserved too, "full" left unrelated prompts where they were
(prompt accuracy and FID within a point). The empty anchor, ESD proper, barely
erases in 200 steps; the anchor "blue" (red → blue) overshoots, past blue, and
breaks the triangles. What the judge does not see: the erased triangles are
thinner than the original's, with concave sides, and small ones carry a few blue
specks.

    anchors = anchor_prompts(prompts, "red")  # "a small triangle on the left"
    erased, losses = erase(pipe, prompts, anchors, method="full", lr=1e-4,
                           preserve=keep, preserve_weight=10.0)
"""

import copy
import re

import torch
import torch.nn.functional as F

from sdscratch.lora import freeze
from sdscratch.pipeline import classifier_free_guidance
from sdscratch.samplers import ddim_step, noise_levels
from sdscratch.train import fit

TRAIN_METHODS = ("xattn", "noxattn", "selfattn", "full")  # ESD's `train_method`
X_T_SOURCES = ("noised", "sampled")
SAMPLED_STEPS = 50  # DDIM steps of the "sampled" chains (ESD: 50)


class ErasureError(ValueError):
    """A request that cannot erase anything (no prompts, unknown words...)."""


# ----------------------------------------------------------------------------------
# What trains


def trains(name: str, method: str) -> bool:
    """Whether `method` trains the UNet parameter called `name`.

    "xattn": the cross-attention (`attn2`) alone (ESD-x); "noxattn": everything
    but it (ESD-u); "selfattn": the self-attention (`attn1`); "full": all.
    """
    if method not in TRAIN_METHODS:
        raise ErasureError(
            f"Unknown train method {method!r}; choose one of {TRAIN_METHODS}."
        )
    if method == "full":
        return True
    if method == "selfattn":
        return ".attn1." in name
    return (".attn2." in name) == (method == "xattn")


def select_parameters(unet, method="xattn") -> list[str]:
    """Make the parameters `method` trains trainable, freeze the rest.

    Returns:
        The names of the trainable parameters.
    """
    names = []
    for name, parameter in unet.named_parameters():
        parameter.requires_grad_(trains(name, method))
        if parameter.requires_grad:
            names.append(name)
    if not names:
        raise ErasureError(f"Train method {method!r} trains nothing in this UNet.")
    return names


# ----------------------------------------------------------------------------------
# Prompts


def anchor_prompts(prompts, word: str, replacement="", tokenizer=None) -> list[str]:
    """Each prompt with `word` replaced (or, by default, removed): the anchors
    that erase `word` alone ("a small red triangle" -> "a small triangle").

    Args:
        prompts: the prompts that show the concept.
        word: the word(s) to erase, e.g. "red".
        replacement: what to put in its place ("": nothing).
        tokenizer: if given, `word` must be one the model knows.
    Returns:
        One anchor per prompt, whitespace tidied.
    """
    if tokenizer is not None:
        check_words(tokenizer, word)
    pattern = re.compile(rf"\b{re.escape(word.strip())}\b", re.IGNORECASE)
    anchors = []
    for prompt in prompts:
        if not pattern.search(prompt):
            raise ErasureError(f"The prompt {prompt!r} does not say {word!r}.")
        anchors.append(" ".join(pattern.sub(replacement, prompt).split()))
    return anchors


def check_words(tokenizer, text: str, error=ErasureError):
    """Refuse words the model never learned: a word its tokenizer knows only as
    pieces ("pink" -> "p", "ink") has no meaning of its own to erase or find.

    Raises:
        `error` (a ValueError), with one sentence naming the word.
    """
    words = text.split()
    if not words:
        raise error("The concept is empty: name its words.")
    for word in words:
        pieces = tokenizer.tokenize(word)
        if len(pieces) > 1:
            raise error(
                f"The model does not know the word {word!r}: its tokenizer splits it "
                f"into {len(pieces)} pieces, so it has no meaning of its own."
            )


def _check_prompts(prompts, anchors):
    if not prompts:
        raise ErasureError("Erasure needs at least one prompt that shows the concept.")
    if len(anchors) != len(prompts):
        raise ErasureError(f"Got {len(anchors)} anchors for {len(prompts)} prompts.")
    if any(p == a for p, a in zip(prompts, anchors)):
        same = next(p for p, a in zip(prompts, anchors) if p == a)
        raise ErasureError(f"The prompt {same!r} is its own anchor: nothing to erase.")


# ----------------------------------------------------------------------------------
# The target and the loss


@torch.no_grad()
def esd_target(frozen, x_t, t, context, anchor_context, eta=1.0) -> torch.Tensor:
    """ESD's target, ε*(x_t, a, t) − η (ε*(x_t, c, t) − ε*(x_t, a, t)).

    Args:
        frozen: the original UNet θ*, `frozen(x, t, context) -> ε`.
        x_t: (B, C, h, w) noisy latents at timesteps t (B,).
        context, anchor_context: (B, L, D) hidden states of c and of the anchor a.
        eta: η, how far past the anchor (ESD: 1.0).
    Returns:
        (B, C, h, w), no gradient.
    """
    both = frozen(torch.cat([x_t, x_t]), torch.cat([t, t]),
                  torch.cat([anchor_context, context]))  # fmt: skip
    eps_anchor, eps_concept = both.chunk(2)  # (B, C, h, w) each
    return eps_anchor - eta * (eps_concept - eps_anchor)


def esd_loss(unet, frozen, x_t, t, context, anchor_context, eta=1.0):
    """‖ε_θ(x_t, c, t) − ESD's target‖², averaged over every element."""
    target = esd_target(frozen, x_t, t, context, anchor_context, eta)
    return F.mse_loss(unet(x_t, t, context), target)


def preservation_loss(unet, frozen, x_t, t, context):
    """‖ε_θ(x_t, p, t) − ε*(x_t, p, t)‖²: prompts p keep the original's prediction."""
    with torch.no_grad():
        target = frozen(x_t, t, context)
    return F.mse_loss(unet(x_t, t, context), target)


# ----------------------------------------------------------------------------------
# Where x_t comes from


@torch.no_grad()
def draw_latents(pipe, prompts, count=4, seed=0, **options) -> torch.Tensor:
    """The pipeline's own images of each prompt, as latents: (P · count, C, h, w),
    `count` per prompt next to each other (row i shows prompts[i // count]).

    Args:
        options: for the pipeline call (num_inference_steps, guidance_scale...).
    """
    generator = torch.Generator().manual_seed(seed)
    return pipe(list(prompts), num_images_per_prompt=count, generator=generator,
                output_type="latent", **options)  # fmt: skip


def noised(latents, schedule, generator):
    """x_t ~ q(x_t | x_0) at a uniform random t: (x_t (B, C, h, w), t (B,))."""
    t = torch.randint(0, schedule.num_train_timesteps, (len(latents),),
                      generator=generator).to(latents.device)  # fmt: skip
    noise = torch.randn(latents.shape, generator=generator).to(latents)
    return schedule.add_noise(latents, noise, t), t


@torch.no_grad()
def sampled(unet, context, uncond, schedule, generator, guidance_scale=3.0,
            steps=SAMPLED_STEPS, shape=None):  # fmt: skip
    """ESD's x_t: DDIM from noise with `unet` (guided), stopped at a random step.

    Args:
        unet: the model being edited.
        context, uncond: (B, L, D) the prompts' and the empty prompt's states.
        guidance_scale: w of the partial sampling (ESD: 3).
        steps: DDIM steps of a whole chain; it stops after k ~ U{0..steps-1}.
        shape: (C, h, w) of the latents.
    Returns:
        (x_t (B, C, h, w), t (B,)): the level reached and its timestep.
    """
    levels = noise_levels("ddim", steps, schedule)
    eps_fn = classifier_free_guidance(unet, context, uncond, guidance_scale)
    stop = int(torch.randint(0, steps, (), generator=generator))
    x = torch.randn((len(context), *shape), generator=generator).to(context)
    for i in range(stop):
        t = levels.timesteps[i].to(x.device).repeat(len(x))
        x, _ = ddim_step(levels, i, x, eps_fn(x, t))
    return x, levels.timesteps[stop].to(x.device).repeat(len(x))


# ----------------------------------------------------------------------------------
# Erasing


def erase(
    pipe,
    prompts,
    anchors=None,
    method="xattn",
    eta=1.0,
    steps=200,
    lr=2e-4,
    batch_size=8,
    x_t="noised",
    images_per_prompt=4,
    preserve=(),
    preserve_weight=1.0,
    sampled_steps=SAMPLED_STEPS,
    seed=0,
    progress=False,
):
    """Erase what `prompts` show from a copy of `pipe`'s UNet (ESD).

    Args:
        pipe: a `StableDiffusion`; it is left unchanged.
        prompts: P prompts that show the concept ("a small red triangle on the
            left", ...).
        anchors: P anchors, one per prompt (default: the empty prompt, ESD
            proper); e.g. `anchor_prompts(prompts, "red")` erases "red" alone.
        method: which weights train: "xattn" (ESD-x), "noxattn" (ESD-u),
            "selfattn" or "full" (`trains`).
        eta: η of the target (ESD: 1.0).
        steps, lr, batch_size: AdamW steps, learning rate, x_t per step.
        x_t: "noised" (the original's images of c, noised) or "sampled" (ESD's
            partial sampling with the edited model); see the module docstring.
        images_per_prompt: the original's images drawn per prompt ("noised", and
            for `preserve`), with 20 DDIM steps at guidance 7.5.
        preserve: prompts that should keep their meaning (default: none).
        preserve_weight: λ of the preservation loss.
        sampled_steps: DDIM steps of a whole "sampled" chain (ESD: 50).
        seed: draws the images, batches, timesteps and noise.
    Returns:
        (a copy of `pipe` with the erased UNet (the VAE, the text encoder and the
        tokenizer are `pipe`'s own, shared), the loss at every step).
    """
    anchors = [""] * len(prompts) if anchors is None else list(anchors)
    _check_prompts(list(prompts), anchors)
    if x_t not in X_T_SOURCES:
        raise ErasureError(f"Unknown x_t source {x_t!r}; choose one of {X_T_SOURCES}.")
    trains("", method)  # an unknown method: now, before the images are drawn
    generator = torch.Generator().manual_seed(seed)
    draw = dict(count=images_per_prompt, seed=seed, num_inference_steps=20,
                guidance_scale=7.5)  # fmt: skip
    concept = _Prompts(pipe, prompts, anchors, draw if x_t == "noised" else None)
    kept = _Prompts(pipe, preserve, preserve, draw) if preserve else None
    frozen = pipe.unet
    unet = copy.deepcopy(frozen)
    freeze(frozen)
    select_parameters(unet, method)

    def loss_fn(model, _):
        rows = torch.randint(len(concept), (batch_size,), generator=generator)
        context, anchor = concept.contexts[rows], concept.anchors[rows]
        if x_t == "noised":
            latents, t = noised(concept.latents[rows], pipe.schedule, generator)
        else:
            uncond = concept.empty.expand_as(context)
            latents, t = sampled(model, context, uncond, pipe.schedule, generator,
                                 steps=sampled_steps,
                                 shape=pipe.latent_shape)  # fmt: skip
        loss = esd_loss(model, frozen, latents, t, context, anchor, eta)
        if kept is not None:
            rows = torch.randint(len(kept), (batch_size,), generator=generator)
            latents, t = noised(kept.latents[rows], pipe.schedule, generator)
            loss = loss + preserve_weight * preservation_loss(
                model, frozen, latents, t, kept.contexts[rows]
            )
        return loss

    losses = fit(unet, loss_fn, [None], steps, lr=lr, desc=f"erase ({method})",
                 progress=progress)  # fmt: skip
    freeze(unet)
    erased = copy.copy(pipe)
    erased.__dict__.pop("loras", None)  # a LoRA attached to pipe is not the copy's
    erased.unet = unet
    return erased, losses


class _Prompts:
    """Prompts, their anchors' and the empty prompt's hidden states, and
    (with `draw`) the original's latents of each: row i of `contexts`, `anchors`
    and `latents` belong together."""

    @torch.no_grad()
    def __init__(self, pipe, prompts, anchors, draw=None):
        prompts, anchors = list(prompts), list(anchors)
        ids = pipe.tokenizer(prompts + anchors + [""]).to(pipe.device)
        hidden = pipe.text_encoder(ids)  # (2P + 1, L, D)
        p, count = len(prompts), draw["count"] if draw else 1
        self.contexts = hidden[:p].repeat_interleave(count, 0)  # (P · count, L, D)
        self.anchors = hidden[p : 2 * p].repeat_interleave(count, 0)
        self.empty = hidden[-1:]  # (1, L, D)
        self.latents = None if draw is None else draw_latents(pipe, prompts, **draw)

    def __len__(self) -> int:
        return len(self.contexts)
