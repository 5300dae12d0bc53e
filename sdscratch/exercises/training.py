"""Checks for the latent-diffusion training exercises: the scaled latents the UNet
learns on, the Min-SNR loss weight and the EMA of the weights (lesson 09)."""

import types

import torch
from torch import nn

from sdscratch.exercises.compare import call, check, generator, sd_schedule
from sdscratch.pipeline import StableDiffusion
from sdscratch.train import EMA, min_snr_weight
from sdscratch.vae import VAE, VAEConfig


def _tiny_vae(g, scaling_factor):
    """A small VAE (32×32 images -> 4×16×16 latents) with seeded random weights."""
    with torch.random.fork_rng():  # the default init leaves the global RNG as it was
        vae = VAE(VAEConfig(block_out_channels=(8, 8), norm_num_groups=4)).eval()
    vae.config.scaling_factor = scaling_factor
    with torch.no_grad():
        for parameter in vae.parameters():  # seeded, not the global RNG
            parameter.copy_(torch.randn(parameter.shape, generator=g) * 0.2)
    return vae


def check_encode_latents(fn) -> None:
    """`fn(vae, images, generator) -> latents`: what the latent UNet trains on, a
    sample of the VAE's posterior q(z|x) drawn with `generator`, times
    `vae.config.scaling_factor`: images (B, 3, H, W) -> (B, C, H/f, W/f)."""
    g = generator(12)

    def case(scale):
        vae = _tiny_vae(g, scale)
        images = torch.rand(3, 3, 32, 32, generator=g) * 2 - 1
        seed = int(torch.randint(0, 2**31, (1,), generator=g))
        pipe = types.SimpleNamespace(vae=vae, device=torch.device("cpu"),
                                     dtype=torch.float32)  # fmt: skip
        want = StableDiffusion.encode_images(pipe, images, generator(seed))
        with torch.no_grad():
            posterior = vae.encode(images)
            sampled = posterior.sample(generator(seed))
            mistakes = {
                "multiply the posterior sample by vae.config.scaling_factor, so "
                "that the latents have about unit std.": sampled,
                "multiply by the scaling factor when encoding; dividing is the "
                "decoder's side.": sampled / scale,
                "draw a sample of the posterior with the generator, "
                "`.sample(generator)`, not its mean.": posterior.mean * scale,
            }
            got, error = call(fn, vae, images, generator(seed))
        return got, error, want, mistakes

    return check("encode_latents", [case(0.37), case(2.5)])


def check_min_snr_weight(fn) -> None:
    """`fn(snr, gamma) -> weights`: the Min-SNR-γ weight of each sample's loss
    for ε-prediction (Hang et al. 2023), min(SNR_t, γ) / SNR_t: snr (B,) -> (B,)."""
    g = generator(13)
    snrs = sd_schedule().snr()

    def case(gamma):
        snr = snrs[torch.randint(0, 1000, (64,), generator=g)]
        want = min_snr_weight(snr, gamma)
        mistakes = {
            "that is SNR_t / min(SNR_t, γ): put the minimum on top.": 1 / want,
            "divide by SNR_t: the weight is min(SNR_t, γ) / SNR_t, at most 1.":
                snr.clamp(max=gamma),
            "take the minimum: min(SNR_t, γ) / SNR_t is 1 wherever SNR_t ≤ γ.":
                gamma / snr,
            "that is the weight for v-prediction; for ε-prediction divide by "
            "SNR_t, not SNR_t + 1.": snr.clamp(max=gamma) / (snr + 1),
        }  # fmt: skip
        got, error = call(fn, snr.clone(), gamma)
        return got, error, want, mistakes

    return check("min_snr_weight", [case(5.0), case(1.0)])


def check_ema_update(fn) -> None:
    """`fn(average, weight, decay) -> average`: one step of the exponential moving
    average of a weight tensor, decay · average + (1 - decay) · weight, as
    `sdscratch.train.EMA.update` does for every parameter."""
    g = generator(14)

    def case(decay):
        with torch.random.fork_rng():  # leave the global RNG as it was
            model = nn.Linear(6, 5)
        with torch.no_grad():
            for parameter in model.parameters():  # seeded, not the global RNG
                parameter.copy_(torch.randn(parameter.shape, generator=g))
        ema = EMA(model, decay)
        with torch.no_grad():
            model.weight.add_(torch.randn(model.weight.shape, generator=g))
        average, weight = ema.model.weight.detach().clone(), model.weight.detach()
        ema.update(model)
        mistakes = {
            "the average keeps `decay` of itself: decay · average + (1 - decay) "
            "· weight.": decay * weight + (1 - decay) * average,
            "the new average mixes the old one with the weight; it does not "
            "drop it.": (1 - decay) * weight,
            "the two shares add up to 1: the weight's share is (1 - decay).":
                decay * average + weight,
        }  # fmt: skip
        got, error = call(fn, average.clone(), weight.clone(), decay)
        return got, error, ema.model.weight.detach(), mistakes

    return check("ema_update", [case(0.9), case(0.999)])
