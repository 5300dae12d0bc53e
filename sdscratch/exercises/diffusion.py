"""Checks for the diffusion exercises: noising, the loss, sampler steps, guidance,
img2img and inpainting with its latent mask (lessons 01, 02, 04, 07, 10)."""

import torch
import torch.nn.functional as F

from sdscratch.exercises.compare import call, check, generator, levels, sd_schedule
from sdscratch.pipeline_inputs import latent_mask
from sdscratch.samplers import ddim_step, ddpm_step, img2img_start, karras_sigmas


def _pair(g, shape):
    """Two independent standard normal tensors of `shape`."""
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g)


def check_add_noise(fn) -> None:
    """`fn(x0, noise, t, alphas_cumprod) -> x_t`: x_t = √ᾱ_t x0 + √(1-ᾱ_t) ε.

    x0 and noise (B, C, H, W), t (B,) integer timesteps, alphas_cumprod (T,).
    """
    schedule, g = sd_schedule(), generator()
    abars = schedule.alphas_cumprod

    def case():
        x0, noise = _pair(g, (4, 3, 8, 8))
        t = torch.randint(1, 1000, (4,), generator=g)
        a = abars[t].reshape(-1, 1, 1, 1)  # (B, 1, 1, 1)
        early = abars[t - 1].reshape(-1, 1, 1, 1)
        no_roots = a * x0 + (1 - a) * noise
        swapped = (1 - a).sqrt() * x0 + a.sqrt() * noise
        off_by_one = early.sqrt() * x0 + (1 - early).sqrt() * noise
        mistakes = {
            "the weights need square roots: √ᾱ_t and √(1-ᾱ_t).": no_roots,
            "the weights are swapped: x0 takes √ᾱ_t, the noise √(1-ᾱ_t).": swapped,
            "ᾱ is read one timestep early: alphas_cumprod[t], not [t - 1].":
                off_by_one,
        }  # fmt: skip
        got, error = call(fn, x0, noise, t, abars)
        return got, error, schedule.add_noise(x0, noise, t), mistakes

    return check("add_noise", (case() for _ in range(3)))


def check_snr(fn) -> None:
    """`fn(alphas_cumprod) -> snr`: the signal-to-noise ratio ᾱ_t / (1-ᾱ_t), (T,)."""
    abars = sd_schedule().alphas_cumprod
    want = abars / (1 - abars)
    mistakes = {
        "that is the noise-to-signal ratio: put ᾱ_t on top.": (1 - abars) / abars,
        "no square root: the SNR compares variances, ᾱ_t and 1-ᾱ_t.": want.sqrt(),
        "that is the log-SNR; the SNR itself is ᾱ_t / (1-ᾱ_t).": want.log(),
    }
    got, error = call(fn, abars)
    return check("snr", [(got, error, want, mistakes)])


def _toy_model(g):
    """A small fixed ε-model, eps(x, t), for points (B, 2) or images (B, C, H, W):
    a seeded linear map of each sample's values, plus a term in t."""
    weights = {}

    def eps(x, t):
        features = x.flatten(1)  # (B, D)
        d = features.shape[1]
        if d not in weights:
            weights[d] = torch.randn(d, d, generator=g) / d**0.5
        out = features @ weights[d] + t.float()[:, None] / 1000  # (B, D)
        return out.reshape(x.shape)

    return eps


def reference_diffusion_loss(eps_model, x0, t, noise, alphas_cumprod):
    """The solution of the `diffusion_loss` exercise: DDPM's simple loss."""
    abar = alphas_cumprod[t].reshape(-1, *[1] * (x0.ndim - 1))  # (B, 1, …, 1)
    x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * noise
    return F.mse_loss(eps_model(x_t, t), noise)


def check_diffusion_loss(fn) -> None:
    """`fn(eps_model, x0, t, noise, alphas_cumprod) -> loss`: DDPM's simple loss
    (Ho et al. 2020, eq. 14), the mean squared error between ε and
    eps_model(x_t, t) at x_t = √ᾱ_t x0 + √(1-ᾱ_t) ε; a 0-d tensor. x0 and noise
    have any shape (B, …): points (B, 2) or images (B, C, H, W)."""
    schedule, g = sd_schedule(), generator(1)
    model = _toy_model(g)

    def case(shape):
        x0, noise = _pair(g, shape)
        t = torch.randint(0, 1000, (shape[0],), generator=g)
        x_t = schedule.add_noise(x0, noise, t)
        mistakes = {
            "the target is the noise ε, not the clean image x0.":
                F.mse_loss(model(x_t, t), x0),
            "the model must see the noisy x_t, not the clean x0.":
                F.mse_loss(model(x0, t), noise),
            "take the mean of the squared errors, not the sum.":
                F.mse_loss(model(x_t, t), noise, reduction="sum"),
        }  # fmt: skip
        got, error = call(fn, model, x0, t, noise, schedule.alphas_cumprod)
        return got, error, F.mse_loss(model(x_t, t), noise), mistakes

    shapes = [(64, 2), (64, 2), (4, 3, 8, 8)]
    return check("diffusion_loss", (case(shape) for shape in shapes))


def _step_inputs(g):
    """x_t, ε and two ᾱ's of a step (ᾱ_t < ᾱ_prev), drawn from SD's schedule."""
    abars = sd_schedule().alphas_cumprod
    t = int(torch.randint(50, 1000, (1,), generator=g))
    prev = t - int(torch.randint(1, 50, (1,), generator=g))
    x, eps = _pair(g, (2, 4, 8, 8))
    return x, eps, float(abars[t]), float(abars[prev])


def reference_ddpm_step(x, eps, abar, abar_prev, z):
    """The solution of the `ddpm_step` exercise (Ho et al. 2020, eq. 6-7)."""
    alpha = abar / abar_prev
    beta = 1 - alpha
    x0 = (x - (1 - abar) ** 0.5 * eps) / abar**0.5
    mean = abar_prev**0.5 * beta / (1 - abar) * x0
    mean = mean + alpha**0.5 * (1 - abar_prev) / (1 - abar) * x
    return mean + ((1 - abar_prev) / (1 - abar) * beta) ** 0.5 * z


def check_ddpm_step(fn) -> None:
    """`fn(x, eps, abar, abar_prev, z) -> x_prev`: one DDPM step (Ho et al. 2020,
    eq. 6-7) from ᾱ_t = abar to ᾱ_prev = abar_prev, with α = ᾱ_t/ᾱ_prev,
    β = 1 - α: x_prev = μ̃(x_t, x̂0) + √β̃ z, β̃ = (1-ᾱ_prev)/(1-ᾱ_t) β."""
    g = generator(2)

    def case():
        x, eps, a, a_prev = _step_inputs(g)
        seed = int(torch.randint(0, 2**31, (1,), generator=g))
        z = torch.randn(x.shape, generator=generator(seed))  # the step's own noise
        want, _ = ddpm_step(levels(a, a_prev), 0, x, eps, generator(seed))
        beta = 1 - a / a_prev
        posterior_variance = (1 - a_prev) / (1 - a) * beta
        mean = want - posterior_variance**0.5 * z
        mistakes = {
            "the noise's variance is the posterior's β̃ = (1-ᾱ_prev)/(1-ᾱ_t) β, "
            "not β.": mean + beta**0.5 * z,
            "scale z by the standard deviation √β̃, not the variance β̃.":
                mean + posterior_variance * z,
            "the step adds fresh noise √β̃ z after the mean.": mean,
        }  # fmt: skip
        got, error = call(fn, x, eps, a, a_prev, z)
        return got, error, want, mistakes

    return check("ddpm_step", (case() for _ in range(3)))


def reference_ddim_step(x, eps, abar, abar_prev):
    """The solution of the `ddim_step` exercise (Song et al. 2021, eq. 12, η = 0)."""
    x0 = (x - (1 - abar) ** 0.5 * eps) / abar**0.5
    return abar_prev**0.5 * x0 + (1 - abar_prev) ** 0.5 * eps


def check_ddim_step(fn) -> None:
    """`fn(x, eps, abar, abar_prev) -> x_prev`: one deterministic DDIM step (Song
    et al. 2021, eq. 12, η = 0): x_prev = √ᾱ_prev x̂0 + √(1-ᾱ_prev) ε."""
    g = generator(3)

    def case():
        x, eps, a, a_prev = _step_inputs(g)
        want, x0 = ddim_step(levels(a, a_prev), 0, x, eps)
        x0_no_roots = (x - (1 - a) * eps) / a
        mistakes = {
            "the direction to x_t uses the next level: √(1-ᾱ_prev) ε, not "
            "√(1-ᾱ_t) ε.": a_prev**0.5 * x0 + (1 - a) ** 0.5 * eps,
            "x̂0 = (x_t - √(1-ᾱ_t) ε) / √ᾱ_t needs its square roots.":
                a_prev**0.5 * x0_no_roots + (1 - a_prev) ** 0.5 * eps,
            "return x_prev, not the predicted x̂0.": x0,
        }  # fmt: skip
        got, error = call(fn, x, eps, a, a_prev)
        return got, error, want, mistakes

    return check("ddim_step", (case() for _ in range(3)))


def check_karras_sigmas(fn) -> None:
    """`fn(sigma_min, sigma_max, n, rho=7.0) -> sigmas`: Karras et al. 2022, eq. 5,
    (n,) from σ_max down to σ_min, evenly spaced in σ^(1/ρ)."""

    def case(low, high, n):
        want = karras_sigmas(low, high, n)
        ramp = torch.linspace(0, 1, n, dtype=torch.float64)
        even = high + ramp * (low - high)
        inverted = (high**7 + ramp * (low**7 - high**7)) ** (1 / 7)
        mistakes = {
            "go from σ_max down to σ_min: sampling starts at the most noise.":
                want.flip(0),
            "space the σ's evenly in σ^(1/ρ), not in σ (ρ = 7).": even,
            "the exponents are 1/ρ inside and ρ outside.": inverted,
        }  # fmt: skip
        got, error = call(fn, low, high, n)
        return got, error, want, mistakes

    return check("karras_sigmas", [case(0.03, 14.6, 10), case(0.1, 80.0, 25)])


def check_guidance(fn) -> None:
    """`fn(eps_uncond, eps_text, guidance_scale) -> eps`: classifier-free guidance
    (Ho & Salimans 2022, eq. 6, with w = guidance_scale): ε_∅ + w (ε_c - ε_∅)."""
    g = generator(7)

    def case(w):
        uncond, text = _pair(g, (2, 4, 8, 8))
        mistakes = {
            "start from the unconditional prediction and push towards the "
            "prompt's: ε_∅ + w (ε_c - ε_∅).": text + w * (uncond - text),
            "the guided prediction starts from ε_∅: add it to w (ε_c - ε_∅).":
                w * (text - uncond),
        }  # fmt: skip
        got, error = call(fn, uncond, text, w)
        return got, error, uncond + w * (text - uncond), mistakes

    return check("guidance", [case(7.5), case(3.0), case(0.0)])


def check_img2img_start(fn) -> None:
    """`fn(num_inference_steps, strength) -> first`: the index of the first of the
    sampler's steps that img2img runs (SDEdit; diffusers' rule: it runs
    int(steps · strength) steps, at most all of them, the last ones)."""

    def case(steps, strength):
        want = img2img_start(steps, strength)
        rounded = steps - min(round(steps * strength), steps)
        mistakes = {
            "return where the run starts, not how many steps it runs.": steps - want,
            "round down as diffusers does: int(steps · strength).": rounded,
        }
        got, error = call(fn, steps, strength)
        return got, error, want, mistakes

    grid = [(20, 0.8), (20, 0.3), (50, 0.75), (10, 1.0), (30, 0.55), (7, 0.5)]
    return check("img2img_start", [case(steps, strength) for steps, strength in grid])


def check_inpaint_blend(fn) -> None:
    """`fn(latents, known, mask) -> latents`: after a step, keep the model's latents
    where mask = 1 (repaint) and put back `known` (the image's latent, noised to
    this step) where mask = 0."""
    g = generator(10)

    def case():
        latents, known = _pair(g, (2, 4, 8, 8))
        mask = (torch.rand(2, 1, 8, 8, generator=g) > 0.5).float()
        inverted = mask * known + (1 - mask) * latents
        mistakes = {
            "mask = 1 marks what to repaint: take the model's latents there.":
                inverted,
        }  # fmt: skip
        got, error = call(fn, latents, known, mask)
        return got, error, (1 - mask) * known + mask * latents, mistakes

    return check("inpaint_blend", (case() for _ in range(3)))


def reference_downsample_mask(mask, factor):
    """The solution of the `downsample_mask` exercise: the pipeline's latent mask."""
    return latent_mask(mask, 1, len(mask), factor, mask)


def check_downsample_mask(fn) -> None:
    """`fn(mask, factor) -> mask`: an inpainting mask (B, 1, H, W), 1 = repaint, at
    the latents' resolution (B, 1, H/f, W/f): a latent cell is repainted as much
    as the most repainted pixel it covers (a max over each f×f block)."""
    g = generator(22)

    def case(factor):
        mask = (torch.rand(2, 1, 32, 32, generator=g) > 0.97).float()  # a few dots
        want = reference_downsample_mask(mask, factor)
        mistakes = {
            "take the largest value of each block, not the mean: a cell that "
            "covers any repainted pixel is repainted.": F.avg_pool2d(mask, factor),
            "every pixel of the block counts, not one of them: take the block's "
            "maximum.": mask[..., ::factor, ::factor],
        }  # fmt: skip
        got, error = call(fn, mask.clone(), factor)
        return got, error, want, mistakes

    return check("downsample_mask", [case(4), case(8)])
