"""Noise schedules: how much noise the forward process adds at each timestep.

Ho et al. 2020 (DDPM), §2: q(x_t | x_{t-1}) = N(√(1-β_t) x_{t-1}, β_t I), and in
closed form q(x_t | x_0) = N(√ᾱ_t x_0, (1-ᾱ_t) I) with ᾱ_t = Π_{s≤t} (1-β_s).
"""

import math

import torch

SCHEDULES = ("linear", "scaled_linear", "cosine")
# diffusers calls the cosine schedule of Nichol & Dhariwal 2021 "squaredcos_cap_v2".
DIFFUSERS_NAMES = {
    "linear": "linear",
    "scaled_linear": "scaled_linear",
    "cosine": "squaredcos_cap_v2",
}


def per_sample(values: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Reshape one value per sample, shape (B,), to broadcast against x (B, ...)."""
    return values.reshape(-1, *([1] * (x.ndim - 1)))


class NoiseSchedule:
    """A β schedule and the quantities derived from it.

    Args:
        betas: (T,) β_1 … β_T, float32.
        name: "linear", "scaled_linear" or "cosine".
        beta_start, beta_end: the schedule's end points (ignored by "cosine").

    Two settings of diffusers' schedulers travel with the schedule (SD v1's values
    by default; a checkpoint's scheduler config sets them, see
    `sdscratch.loading.schedule_from_config`): `steps_offset`, added to ddpm's and
    ddim's timesteps (1: they run 981, 961, …, 1 in 50 steps, not 980, …, 0), and
    `set_alpha_to_one`, whether ddim's last step ends at ᾱ = 1 (True) or at ᾱ_0
    (False). The samplers that walk σ's space their timesteps over [0, T - 1]
    and ignore both, as diffusers' Euler and DPM-Solver++ schedulers do, unless a
    third setting, `timestep_spacing`, is "leading" (None: each sampler's own).
    """

    steps_offset = 1
    set_alpha_to_one = False
    timestep_spacing = None

    def __init__(self, betas, name, beta_start=0.0001, beta_end=0.02):
        self.name = name
        self.beta_start, self.beta_end = beta_start, beta_end
        self.betas = betas.float()  # (T,)
        self.alphas = 1.0 - self.betas  # (T,)  α_t
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)  # (T,)  ᾱ_t

    @classmethod
    def linear(cls, num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02):
        """β rises linearly (Ho et al. 2020, §4)."""
        betas = torch.linspace(beta_start, beta_end, num_train_timesteps)
        return cls(betas, "linear", beta_start, beta_end)

    @classmethod
    def scaled_linear(
        cls, num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012
    ):
        """√β rises linearly: Stable Diffusion v1's schedule."""
        sqrt_betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps)
        return cls(sqrt_betas**2, "scaled_linear", beta_start, beta_end)

    @classmethod
    def cosine(cls, num_train_timesteps=1000, s=0.008, max_beta=0.999):
        """ᾱ follows a squared cosine (Nichol & Dhariwal 2021, eq. 17), β capped."""
        t = torch.arange(num_train_timesteps + 1, dtype=torch.float64)
        alpha_bar = (
            torch.cos((t / num_train_timesteps + s) / (1 + s) * math.pi / 2) ** 2
        )
        betas = (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=max_beta)
        return cls(betas.float(), "cosine")

    @classmethod
    def from_name(cls, name, num_train_timesteps=1000, **kwargs):
        """Build a schedule by name: "linear", "scaled_linear" or "cosine"."""
        if name not in SCHEDULES:
            raise ValueError(f"Unknown schedule {name!r}; choose one of {SCHEDULES}.")
        return getattr(cls, name)(num_train_timesteps, **kwargs)

    @property
    def num_train_timesteps(self) -> int:
        return len(self.betas)

    @property
    def sigmas(self) -> torch.Tensor:
        """(T,) σ_t = √((1-ᾱ_t)/ᾱ_t), the noise level of x_t/√ᾱ_t (Karras 2022)."""
        return ((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5

    def snr(self, t=None) -> torch.Tensor:
        """Signal-to-noise ratio ᾱ_t / (1-ᾱ_t), for all timesteps or those in t."""
        abar = self.alphas_cumprod if t is None else self.alphas_cumprod[t]
        return abar / (1 - abar)

    def add_noise(self, x0, noise, t):
        """Sample q(x_t | x_0) in closed form: x_t = √ᾱ_t x_0 + √(1-ᾱ_t) ε.

        Args:
            x0: (B, ...) clean samples.
            noise: (B, ...) ε ~ N(0, I), same shape as x0.
            t: (B,) integer timesteps in [0, T).
        Returns:
            (B, ...) noisy samples x_t.
        """
        abar = self.alphas_cumprod.to(x0.device, x0.dtype)[t]  # (B,)
        abar = per_sample(abar, x0)  # (B, 1, ..., 1)
        return abar**0.5 * x0 + (1 - abar) ** 0.5 * noise

    def diffusers_config(self) -> dict:
        """The matching diffusers scheduler settings, for comparisons."""
        return {
            "num_train_timesteps": self.num_train_timesteps,
            "beta_start": self.beta_start,
            "beta_end": self.beta_end,
            "beta_schedule": DIFFUSERS_NAMES[self.name],
        }

    def scheduler_config(self) -> dict:
        """The whole scheduler config to save with a checkpoint: the β schedule
        and the settings our samplers follow (clip_sample off, steps_offset,
        set_alpha_to_one, and timestep_spacing if set), as diffusers reads them."""
        config = {
            **self.diffusers_config(),
            "clip_sample": False,
            "set_alpha_to_one": self.set_alpha_to_one,
            "steps_offset": self.steps_offset,
        }
        if self.timestep_spacing is not None:
            config["timestep_spacing"] = self.timestep_spacing
        return config

    def __repr__(self):
        return f"NoiseSchedule.{self.name}(T={self.num_train_timesteps})"
