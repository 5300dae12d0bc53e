"""Checks for the noise-level exercises: Stable Diffusion's β schedule, the clean
image a noise prediction implies, and the σ of the samplers that walk σ's
(lessons 01, 02, 04)."""

import torch

from sdscratch.exercises.compare import call, check, generator, levels, sd_schedule
from sdscratch.samplers import ddim_step
from sdscratch.schedules import NoiseSchedule


def reference_scaled_linear_betas(beta_start, beta_end, num_timesteps):
    """The solution of the `scaled_linear_betas` exercise: the package's betas."""
    return NoiseSchedule.scaled_linear(num_timesteps, beta_start, beta_end).betas


def check_scaled_linear_betas(fn) -> None:
    """`fn(beta_start, beta_end, num_timesteps) -> betas`: Stable Diffusion v1's
    schedule, √β_t rising linearly from √beta_start to √beta_end: (T,)."""

    def case(start, end, steps):
        want = reference_scaled_linear_betas(start, end, steps)
        mistakes = {
            "that is the linear schedule: it is √β that rises linearly, so "
            "square a linspace of the square roots.": torch.linspace(start, end, steps),
            "square the linspace of √β: β = (√β)².":
                torch.linspace(start**0.5, end**0.5, steps),
        }  # fmt: skip
        got, error = call(fn, start, end, steps)
        return got, error, want, mistakes

    cases = [case(0.00085, 0.012, 1000), case(1e-4, 0.02, 50)]
    return check("scaled_linear_betas", cases, atol=1e-7)


def check_predict_x0(fn) -> None:
    """`fn(x, eps, abar) -> x0`: the clean sample that a noise prediction implies,
    x̂0 = (x_t − √(1−ᾱ_t) ε) / √ᾱ_t, the closed form solved for x0."""
    g = generator(21)
    abars = sd_schedule().alphas_cumprod

    def case():
        t = int(torch.randint(0, 1000, (1,), generator=g))
        x, eps = torch.randn(2, 64, 2, generator=g)
        abar = float(abars[t])
        _, want = ddim_step(levels(abar, 1.0), 0, x, eps)
        mistakes = {
            "subtract the noise before dividing: (x_t − √(1−ᾱ_t) ε) / √ᾱ_t.":
                x / abar**0.5 - (1 - abar) ** 0.5 * eps,
            "x̂0 = (x_t − √(1−ᾱ_t) ε) / √ᾱ_t needs its square roots.":
                (x - (1 - abar) * eps) / abar,
            "divide by √ᾱ_t: x_t holds √ᾱ_t x0.": x - (1 - abar) ** 0.5 * eps,
        }  # fmt: skip
        got, error = call(fn, x, eps, abar)
        return got, error, want, mistakes

    return check("predict_x0", (case() for _ in range(3)), atol=1e-4)


def check_sigmas(fn) -> None:
    """`fn(alphas_cumprod) -> sigmas`: the σ of the samplers that walk σ's (Karras
    et al. 2022), σ_t = √((1−ᾱ_t)/ᾱ_t), the noise level of x_t / √ᾱ_t: (T,)."""
    schedule = sd_schedule()
    abar = schedule.alphas_cumprod
    mistakes = {
        "that is lesson 01's σ, √(1−ᾱ_t), the noise in x_t; the samplers' σ is "
        "that of x_t / √ᾱ_t, √((1−ᾱ_t)/ᾱ_t).": (1 - abar).sqrt(),
        "σ is a standard deviation: take the square root of (1−ᾱ_t)/ᾱ_t.":
            (1 - abar) / abar,
        "put the noise on top: σ_t = √((1−ᾱ_t)/ᾱ_t), which grows with t.":
            (abar / (1 - abar)).sqrt(),
    }  # fmt: skip
    got, error = call(fn, abar.clone())
    return check("sigmas", [(got, error, schedule.sigmas, mistakes)])
