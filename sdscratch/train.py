"""Training: the loop every model shares, EMA weights and the diffusion loss.

The recipes that made the bundled checkpoints live in `sdscratch.recipes`.
"""

import copy
import itertools

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


class EMA:
    """An exponential moving average of a model's weights (Polyak averaging).

    Sampling from the averaged weights gives smoother, better images than the
    last training step's weights; every Stable Diffusion release ships EMA weights.
    """

    def __init__(self, model: torch.nn.Module, decay=0.999):
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: torch.nn.Module):
        for ema, live in zip(self.model.parameters(), model.parameters()):
            ema.lerp_(live, 1.0 - self.decay)
        for ema, live in zip(self.model.buffers(), model.buffers()):
            ema.copy_(live)


def fit(
    model,
    loss_fn,
    batches,
    steps,
    lr=1e-3,
    ema=None,
    weight_decay=0.0,
    grad_clip=1.0,
    warmup=0,
    desc="training",
    progress=True,
) -> list[float]:
    """Train `model` for `steps` AdamW steps; return the loss at every step.

    Args:
        model: the module whose parameters are trained (set to train mode).
        loss_fn: `loss_fn(model, batch) -> scalar tensor`.
        batches: a list or DataLoader of batches, iterated again as often as
            `steps` needs (a shuffling DataLoader reshuffles), or a generator that
            yields at least `steps` batches.
        lr: peak learning rate, reached after `warmup` steps, cosine decay after.
        ema: an `EMA` of the model, updated after every step.
        grad_clip: clip the gradient norm to this (None: no clipping).
    """
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: _lr_factor(s, steps, warmup)
    )
    losses = []
    bar = tqdm(
        itertools.islice(_repeat(batches), steps),
        total=steps,
        desc=desc,
        disable=not progress,
    )
    for batch in bar:
        loss = loss_fn(model, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        optimizer.step()
        schedule.step()
        if ema is not None:
            ema.update(model)
        losses.append(loss.item())
        if len(losses) % 20 == 0:
            bar.set_postfix(loss=f"{sum(losses[-20:]) / 20:.4f}")
    model.eval()
    return losses


def _repeat(batches):
    """Yield from `batches` again and again, without keeping its batches in memory.

    (`itertools.cycle` keeps a copy of every batch it has yielded: with a DataLoader
    that draws images on the fly, memory would grow by one batch per step.)
    """
    if iter(batches) is batches:  # a generator cannot restart: it must last
        yield from batches
        raise ValueError("fit() ran out of batches: give a list or a DataLoader.")
    while True:
        empty = True
        for batch in batches:
            empty = False
            yield batch
        if empty:
            raise ValueError("fit() got no batches to train on.")


def _lr_factor(step, steps, warmup):
    """Linear warm-up, then cosine decay to 10 % of the peak."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + torch.cos(torch.tensor(progress * torch.pi)).item())


def diffusion_loss(unet, x0, schedule, generator=None, context=None, snr_gamma=None):
    """The simple DDPM objective: predict the noise that was added.

    Ho et al. 2020, eq. 14: E_{t, x_0, ε} ‖ε − ε_θ(√ᾱ_t x_0 + √(1-ᾱ_t) ε, t)‖².

    Args:
        unet: `unet(x_t, t, context) -> ε̂`, same shape as x_t.
        x0: (B, C, H, W) clean images or latents.
        schedule: a `NoiseSchedule`.
        generator: draws t and ε.
        context: (B, L, D) text hidden states, or None.
        snr_gamma: None for the plain objective; a number γ weights each sample's
            error by min(SNR_t, γ) / SNR_t (Min-SNR, Hang et al. 2023): the nearly
            clean timesteps, which are easy, count less, so that training spends
            more of its effort on the noisy ones, where the layout is decided.
    """
    t = torch.randint(0, schedule.num_train_timesteps, (len(x0),), generator=generator)
    t = t.to(x0.device)
    noise = torch.randn(x0.shape, generator=generator).to(x0.device)
    x_t = schedule.add_noise(x0, noise, t)
    if snr_gamma is None:
        return F.mse_loss(unet(x_t, t, context), noise)
    errors = (unet(x_t, t, context) - noise).pow(2).mean(dim=(1, 2, 3))  # (B,)
    return (errors * min_snr_weight(schedule.snr(t).to(errors), snr_gamma)).mean()


def min_snr_weight(snr: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-γ loss weights for ε-prediction (Hang et al. 2023).

    min(SNR_t, γ) / SNR_t: 1 for the noisy timesteps (SNR_t ≤ γ), γ / SNR_t for
    the nearly clean ones, whose easy targets would otherwise dominate.

    Args:
        snr: (B,) the signal-to-noise ratio ᾱ_t / (1 - ᾱ_t) of each sample's t.
        gamma: γ, e.g. 5.
    Returns:
        (B,) weights in (0, 1].
    """
    return snr.clamp(max=gamma) / snr
