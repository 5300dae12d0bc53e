"""Samplers: from noise to data by reversing the diffusion, one step at a time.

Five samplers, each one function that takes one step, listed in one registry,
`SAMPLERS`, and one loop, `sample()`, that drives them. The loop is the loop of a
diffusers pipeline with the matching scheduler (what
`XScheduler.from_config(pipe.scheduler.config)` gives on an SD v1.5 pipeline):
scale the initial noise, scale the model input, take a step. So the two agree
number for number (tests/test_samplers.py).

A noisy sample has two common forms (Karras et al. 2022, §2 and Appendix C.2):
- variance preserving, what the model sees: x_t = √ᾱ_t x_0 + √(1-ᾱ_t) ε;
  ddpm, ddim and dpmpp_2m keep x in this form;
- variance exploding: x = x_t / √ᾱ_t = x_0 + σ ε with σ = √((1-ᾱ_t)/ᾱ_t);
  euler and euler_ancestral keep x in this form and give the model x / √(σ² + 1).
"""

import inspect
import numbers
from collections.abc import Callable
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from sdscratch.schedules import NoiseSchedule

# What the loop can hand a step function beyond (levels, i, x, eps).
STEP_OPTIONS = ("eta", "generator", "previous")


@dataclass(frozen=True)
class Sampler:
    """One sampler: its step function and what sets its noise levels apart.

    `SAMPLERS` maps each name to one of these; everything else (the loop, the
    checks, the command line's choices, the tests' diffusers schedulers) reads it.
    """

    step: Callable  # step(levels, i, x, eps, **options) -> (x_next, x0_pred)
    diffusers_class: str  # the matching diffusers scheduler, e.g. "DDIMScheduler"
    walks_sigmas: bool  # steps along a list of σ's (so Karras σ's apply), not ᾱ's
    variance_exploding: bool  # keeps x = x_0 + σ ε, not √ᾱ x_0 + √(1-ᾱ) ε
    # tells the model whole (long) timesteps; a σ walker that does lays them out as
    # DPMSolverMultistepScheduler does (N + 1 points over [0, T - 1], rounded)
    whole_timesteps: bool
    reads_set_alpha_to_one: bool = False  # ends at ᾱ_0 unless set_alpha_to_one

    def __post_init__(self):
        unknown = set(self.options) - set(STEP_OPTIONS)
        if unknown:
            raise ValueError(
                f"{self.step.__name__} takes {sorted(unknown)}, which the loop does "
                f"not give; a step may take only {STEP_OPTIONS}."
            )

    @property
    def options(self) -> tuple:
        """The keywords the step takes beyond (levels, i, x, eps), e.g. ("eta",)."""
        return tuple(inspect.signature(self.step).parameters)[4:]


def randn(shape, generator=None, device=None, dtype=torch.float32) -> torch.Tensor:
    """ε ~ N(0, I), drawn as diffusers' `randn_tensor` draws it: the one place noise
    is drawn for sampling (initial latents and the stochastic samplers' steps).

    Args:
        shape: the tensor's shape, e.g. (B, C, h, w).
        generator: a `torch.Generator`, or None for torch's global one. A CPU
            generator draws on the CPU, whatever `device`: the same seed gives the
            same noise on every machine.
        device: where the noise goes (default: the CPU).
        dtype: its dtype (default float32).
    Returns:
        the noise, `shape`, on `device`.
    """
    device = torch.device(device or "cpu")
    where = device
    if generator is not None and generator.device.type != device.type:
        if generator.device.type != "cpu":
            raise ValueError(
                f"A {generator.device.type} generator cannot make noise for {device}."
            )
        where = torch.device("cpu")
    noise = torch.randn(shape, generator=generator, device=where, dtype=dtype)
    return noise.to(device)


def img2img_start(num_inference_steps: int, strength: float) -> int:
    """Where img2img starts (SDEdit, Meng et al. 2022): skip the noisiest steps.

    It runs the last int(N · strength) of the N steps, as diffusers' img2img
    pipelines do (`get_timesteps`): strength 1 runs every step from pure noise,
    0.3 the last 30 %, 0 (or little enough to round down to no step) none.

    Args:
        num_inference_steps: N, the steps of the whole schedule.
        strength: in [0, 1].
    Returns:
        the index of the first step that runs, in [0, N] (N: no step runs).
    """
    if not (isinstance(strength, numbers.Real) and 0 <= strength <= 1):
        raise ValueError(f"strength must be between 0 and 1, got {strength!r}.")
    run = min(int(num_inference_steps * strength), num_inference_steps)
    return num_inference_steps - run


@dataclass
class NoiseLevels:
    """The noise levels a sampler visits on its way from noise to data.

    Step i goes from level i to level i + 1; level N (after the last step) is clean,
    or nearly so. Build it with `noise_levels(sampler, num_inference_steps, ...)`.
    """

    sampler: str  # the sampler these levels are for (they differ per sampler)
    timesteps: torch.Tensor  # (N,) the timestep the model is told at each step
    sigmas: torch.Tensor  # (N + 1,) σ = √((1-ᾱ)/ᾱ) at each level
    alphas_cumprod: torch.Tensor  # (N + 1,) ᾱ = 1 / (1 + σ²) at each level
    spacing: str = "linspace"  # how the timesteps were spaced: "leading" or this

    def __len__(self) -> int:
        return len(self.timesteps)

    @property
    def variance_exploding(self) -> bool:
        """Does this sampler keep x as x_0 + σ ε (rather than √ᾱ x_0 + √(1-ᾱ) ε)?"""
        return SAMPLERS[self.sampler].variance_exploding

    @property
    def init_noise_sigma(self):
        """The standard deviation of pure noise at level 0, in the sampler's form:
        σ_max for the variance-exploding samplers, or √(σ_max² + 1) when their
        timesteps are "leading", as diffusers' Euler schedulers have it."""
        if not self.variance_exploding:
            return 1.0
        top = self.sigmas.max()
        return (top**2 + 1) ** 0.5 if self.spacing == "leading" else top

    def model_input(self, x: torch.Tensor, i: int) -> torch.Tensor:
        """What the model sees at step i: always the variance-preserving x_t."""
        if self.variance_exploding:
            return x / (self.sigmas[i] ** 2 + 1) ** 0.5
        return x

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, i: int) -> torch.Tensor:
        """Noise clean x0 to level i, in the sampler's form (img2img, inpainting)."""
        if self.variance_exploding:
            return x0 + noise * self.sigmas[i]
        abar = self.alphas_cumprod[i]
        return abar**0.5 * x0 + (1 - abar) ** 0.5 * noise


def noise_levels(
    sampler="ddim", num_inference_steps=20, schedule=None, karras=False
) -> NoiseLevels:
    """The timesteps and σ's `sampler` visits in `num_inference_steps` steps.

    ddpm and ddim take every (T // N)-th timestep counted from the schedule's
    steps_offset ("leading" spacing; SD v1: steps_offset=1); euler and dpmpp_2m
    spread theirs evenly over [0, T - 1] ("linspace", unless the schedule's
    timestep_spacing is "leading"), and with `karras=True` space the σ's as Karras
    et al. 2022, eq. 5, instead. All as diffusers' schedulers.

    Args:
        sampler: a name in `SAMPLERS`.
        num_inference_steps: N, the number of model evaluations.
        schedule: a `NoiseSchedule` (default: Stable Diffusion v1's scaled_linear).
        karras: Karras σ's (only for samplers that walk σ's).
    """
    schedule = schedule or NoiseSchedule.scaled_linear()
    steps = num_inference_steps
    spec = _check(sampler, steps, schedule, karras)
    abar = schedule.alphas_cumprod  # (T,)
    if not spec.walks_sigmas:  # "leading" spacing, from steps_offset
        stride = schedule.num_train_timesteps // steps
        timesteps = (torch.arange(steps) * stride + schedule.steps_offset).flip(0)
        # After the last step: ᾱ = 1 (clean), or ᾱ_0 for a sampler that reads
        # set_alpha_to_one (ddim) when that is False (as in SD v1's config).
        clean = not spec.reads_set_alpha_to_one or schedule.set_alpha_to_one
        final = torch.ones(1) if clean else abar[:1]
        levels = torch.cat([abar[timesteps], final])  # (N + 1,)
        sigmas = ((1 - levels) / levels) ** 0.5
        return NoiseLevels(sampler, timesteps, sigmas, levels, "leading")
    timesteps, sigmas = _sigma_timesteps(spec, steps, schedule, karras)
    sigmas = torch.cat([sigmas, torch.zeros(1, dtype=sigmas.dtype)]).float()
    spacing = _spacing(spec, schedule)
    return NoiseLevels(sampler, timesteps, sigmas, 1 / (1 + sigmas**2), spacing)


def _sigma_timesteps(spec, steps, schedule, karras):
    """(N,) timesteps and (N,) σ's (float64) of a sampler that walks σ's."""
    size, points = schedule.num_train_timesteps, _points(spec, steps)
    if _spacing(spec, schedule) == "leading":  # from steps_offset, as ddim's
        timesteps = torch.arange(points, dtype=torch.float64) * (size // points)
        timesteps = timesteps.flip(0) + schedule.steps_offset
    else:  # "linspace": evenly over [0, T - 1]
        timesteps = torch.linspace(0, size - 1, points, dtype=torch.float64).flip(0)
    if spec.whole_timesteps:  # dpmpp_2m: N + 1 points, the t = 0 end dropped
        timesteps = timesteps.round()[:-1].long()
    else:
        timesteps = timesteps.float()
    sigmas = _interp(timesteps.double(), schedule.sigmas.double())  # (N,)
    if not karras:
        return timesteps, sigmas
    # Karras σ's span the σ's above (euler), or the whole schedule (dpmpp_2m); the
    # two differ only for one step, where euler's list is just σ(t = 0).
    span = schedule.sigmas.flip(0) if spec.whole_timesteps else sigmas
    sigmas = karras_sigmas(span[-1].item(), span[0].item(), steps)
    timesteps = _sigma_to_t(sigmas, schedule.sigmas.log().double())
    if not spec.whole_timesteps:
        return timesteps.float(), sigmas
    # dpmpp_2m gives the model whole timesteps: rounded, except for the cosine
    # schedule, which diffusers truncates instead.
    timesteps = timesteps if schedule.name == "cosine" else timesteps.round()
    return timesteps.long(), sigmas


def _spacing(spec, schedule) -> str:
    """How a sampler spaces its timesteps: "leading" (every (T // N)-th from
    steps_offset) for ddpm and ddim, and for the others when the scheduler config
    asks for it; else "linspace", the default of diffusers' Euler and DPM-Solver++
    schedulers."""
    if not spec.walks_sigmas or schedule.timestep_spacing == "leading":
        return "leading"
    return "linspace"


def _points(spec, steps) -> int:
    """How many timesteps a sampler spaces out: N, or N + 1 for a σ walker with
    whole timesteps (dpmpp_2m, which drops the last)."""
    return steps + 1 if spec.walks_sigmas and spec.whole_timesteps else steps


def karras_sigmas(sigma_min, sigma_max, n, rho=7.0) -> torch.Tensor:
    """Karras et al. 2022, eq. 5: the σ's evenly spaced in σ^(1/ρ), ρ = 7.

    σ_i = (σ_max^(1/ρ) + i/(N-1) (σ_min^(1/ρ) - σ_max^(1/ρ)))^ρ puts more of the
    N steps at low noise levels, where the details are decided.

    Args:
        sigma_min, sigma_max: the ends, σ_min < σ_max.
        n: N, how many σ's (one per step).
        rho: ρ.
    Returns:
        (N,) float64, from σ_max down to σ_min.
    """
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    min_inv_rho, max_inv_rho = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def _interp(t, values):
    """values[t] for fractional t, linear between neighbours (numpy.interp)."""
    low = t.floor().long().clamp(max=len(values) - 2)
    w = t - low
    return (1 - w) * values[low] + w * values[low + 1]


def _sigma_to_t(sigmas, log_sigmas):
    """The fractional timestep of each σ: interpolate t linearly in log σ."""
    log_sigma = sigmas.clamp(min=1e-10).log()  # (N,)
    low = (log_sigmas[:, None] <= log_sigma).sum(0) - 1  # (N,) last level below σ
    low = low.clamp(0, len(log_sigmas) - 2)
    w = (log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[low + 1])
    return low + w.clamp(0, 1)


def _check(sampler, steps, schedule, karras) -> Sampler:
    """The registry's entry for `sampler`, or one clear ValueError for a request
    no sampler here can do."""
    if sampler not in SAMPLERS:
        raise ValueError(
            f"Unknown sampler {sampler!r}; choose one of {tuple(SAMPLERS)}."
        )
    spec, size = SAMPLERS[sampler], schedule.num_train_timesteps
    whole = isinstance(steps, numbers.Integral) and not isinstance(steps, bool)
    if not whole or not 1 <= steps <= size:
        raise ValueError(
            f"num_inference_steps must be between 1 and {size}, got {steps!r}."
        )
    if schedule.timestep_spacing not in (None, "leading"):
        raise ValueError(
            f"timestep_spacing={schedule.timestep_spacing!r}: sdscratch's samplers "
            "follow None (each sampler's own) or 'leading'."
        )
    offset, points = schedule.steps_offset, _points(spec, steps)
    first = (points - 1) * (size // points) + offset  # its largest, if "leading"
    if _spacing(spec, schedule) == "leading" and first >= size:
        raise ValueError(
            f"{sampler} cannot take {steps} steps: with steps_offset={offset}, its "
            f"first timestep would be {first}, past the schedule's last, {size - 1}."
        )
    if karras and not spec.walks_sigmas:
        walkers = tuple(name for name, s in SAMPLERS.items() if s.walks_sigmas)
        raise ValueError(f"Karras sigmas need one of {walkers}, not {sampler}.")
    return spec


def ddpm_step(levels, i, x, eps, generator=None):
    """One ancestral step of DDPM (Ho et al. 2020, eq. 6-7, Algorithm 2).

    Notation: x = x_t, eps = ε_θ(x_t, t), abar = ᾱ_t, abar_prev = ᾱ_s for the next
    timestep s < t, alpha = α = ᾱ_t / ᾱ_s and beta = β = 1 - α (one step of a
    strided chain, Nichol & Dhariwal 2021, §4), x0 = x̂_0.
    """
    abar, abar_prev = levels.alphas_cumprod[i], levels.alphas_cumprod[i + 1]
    alpha = abar / abar_prev
    beta = 1 - alpha
    # 1. x̂_0 from the predicted noise (eq. 4 solved for x_0)
    x0 = (x - (1 - abar) ** 0.5 * eps) / abar**0.5
    # 2. the mean μ̃(x_t, x̂_0) of the posterior q(x_s | x_t, x_0) (eq. 7)
    mean = (abar_prev**0.5 * beta / (1 - abar)) * x0
    mean = mean + (alpha**0.5 * (1 - abar_prev) / (1 - abar)) * x
    # 3. its variance β̃ = (1-ᾱ_s)/(1-ᾱ_t) β (eq. 7); floored, so that the last
    #    step (ᾱ_s = 1, β̃ = 0) still draws its noise, as diffusers does
    variance = ((1 - abar_prev) / (1 - abar) * beta).clamp(min=1e-20)
    # 4. x_s = μ̃ + √β̃ z
    z = randn(x.shape, generator, x.device, x.dtype)
    return mean + variance**0.5 * z, x0


def ddim_step(levels, i, x, eps, eta=0.0, generator=None):
    """One step of DDIM (Song et al. 2021, eq. 12); η = 0 makes it deterministic.

    Notation: x = x_t, eps = ε_θ(x_t), abar = α_t and abar_prev = α_{t-1} in the
    paper's notation (our ᾱ), x0 = "predicted x_0", sigma = σ_t(η) (eq. 16).
    """
    abar, abar_prev = levels.alphas_cumprod[i], levels.alphas_cumprod[i + 1]
    # 1. "predicted x_0"
    x0 = (x - (1 - abar) ** 0.5 * eps) / abar**0.5
    # 2. σ_t(η) = η √((1-α_{t-1})/(1-α_t)) √(1 - α_t/α_{t-1})
    sigma = eta * ((1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev)) ** 0.5
    # 3. "direction pointing to x_t"
    direction = (1 - abar_prev - sigma**2) ** 0.5 * eps
    # 4. x_{t-1} = √α_{t-1} x̂_0 + direction + σ_t z ("random noise" only if η > 0)
    x_prev = abar_prev**0.5 * x0 + direction
    if eta > 0:
        x_prev = x_prev + sigma * randn(x.shape, generator, x.device, x.dtype)
    return x_prev, x0


def euler_step(levels, i, x, eps):
    """One Euler step of the probability-flow ODE (Karras et al. 2022, Algorithm 1).

    Notation: x = x_i = x_0 + σ_i ε, sigma = σ_i, sigma_next = σ_{i+1},
    x0 = D(x_i; σ_i) the denoised image, d = dx/dσ = (x - D(x; σ)) / σ (eq. 4).
    """
    sigma, sigma_next = levels.sigmas[i], levels.sigmas[i + 1]
    # 1. D(x_i; σ_i) = x_i - σ_i ε̂
    x0 = x - sigma * eps
    # 2. d_i = (x_i - D(x_i; σ_i)) / σ_i
    d = (x - x0) / sigma
    # 3. x_{i+1} = x_i + (σ_{i+1} - σ_i) d_i
    return x + d * (sigma_next - sigma), x0


def euler_ancestral_step(levels, i, x, eps, generator=None):
    """An Euler step down to σ_down, then fresh noise back up to σ_{i+1}.

    The ancestral sampler of k-diffusion (Crowson), on Karras et al. 2022's ODE: the
    step removes more noise than the ODE would (to σ_down), then adds new noise of
    size σ_up, with σ_down² + σ_up² = σ_{i+1}², as DDPM does with its β̃.
    Notation as in `euler_step`.
    """
    sigma, sigma_next = levels.sigmas[i], levels.sigmas[i + 1]
    # 1. split σ_{i+1}² into σ_up² (new noise) and σ_down² (kept noise)
    sigma_up = (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5
    sigma_down = (sigma_next**2 - sigma_up**2) ** 0.5
    # 2. D(x_i; σ_i) and d_i as in Euler
    x0 = x - sigma * eps
    d = (x - x0) / sigma
    # 3. Euler step to σ_down, then x += σ_up z
    x_next = x + d * (sigma_down - sigma)
    return x_next + randn(x.shape, generator, x.device, x.dtype) * sigma_up, x0


def dpmpp_2m_step(levels, i, x, eps, previous=None):
    """One step of DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", Algorithm 2).

    Notation: x = x̃_{t_{i-1}}; alpha_s, sigma_s = α_{t_{i-1}}, σ_{t_{i-1}} of the
    variance-preserving form (α = 1/√(1+σ²), σ_VP = α σ); alpha_t, sigma_t = α_{t_i},
    σ_{t_i}; lambda_s, lambda_t = λ = log(α/σ), half the log-SNR; h = h_i =
    λ_{t_i} - λ_{t_{i-1}}; x0 = x_θ(x̃_{t_{i-1}}, t_{i-1}) the data prediction;
    previous = x_θ of the step before.
    """
    alpha_s, sigma_s = _vp(levels.sigmas[i])
    alpha_t, sigma_t = _vp(levels.sigmas[i + 1])
    lambda_s = alpha_s.log() - sigma_s.log()
    lambda_t = alpha_t.log() - sigma_t.log()  # +inf at the end (σ = 0)
    h = lambda_t - lambda_s
    # 1. the data prediction x_θ = (x - σ ε̂) / α
    x0 = (x - sigma_s * eps) / alpha_s
    # 2. first order, DPM-Solver++(1) (the same as DDIM):
    #    x̃_{t_i} = (σ_{t_i}/σ_{t_{i-1}}) x̃_{t_{i-1}} - α_{t_i} (e^{-h_i} - 1) x_θ
    update = alpha_t * (torch.exp(-h) - 1.0)
    x_next = (sigma_t / sigma_s) * x - update * x0
    # 3. second order, except at the first step (no previous x_θ) and the last
    #    (to σ = 0): x_θ becomes D_i = x_θ + (x_θ - x_θ_prev) / (2 r_i),
    #    r_i = h_{i-1} / h_i
    if previous is not None and i < len(levels) - 1:
        alpha_prev, sigma_prev = _vp(levels.sigmas[i - 1])
        r = (lambda_s - (alpha_prev.log() - sigma_prev.log())) / h
        x_next = x_next - (0.5 * update) * ((1.0 / r) * (x0 - previous))
    return x_next, x0


def _vp(sigma):
    """(α, σ_VP) of the variance-preserving form for a variance-exploding σ."""
    alpha = 1 / (sigma**2 + 1) ** 0.5
    return alpha, sigma * alpha


# The registry: every sampler by its community name (ComfyUI/A1111). Add one here,
# and the loop, the checks and the command line know it.
SAMPLERS = {
    "ddpm": Sampler(ddpm_step, "DDPMScheduler", walks_sigmas=False,
                    variance_exploding=False, whole_timesteps=True),
    "ddim": Sampler(ddim_step, "DDIMScheduler", walks_sigmas=False,
                    variance_exploding=False, whole_timesteps=True,
                    reads_set_alpha_to_one=True),
    "euler": Sampler(euler_step, "EulerDiscreteScheduler", walks_sigmas=True,
                     variance_exploding=True, whole_timesteps=False),
    "euler_ancestral": Sampler(euler_ancestral_step,
                               "EulerAncestralDiscreteScheduler", walks_sigmas=True,
                               variance_exploding=True, whole_timesteps=False),
    "dpmpp_2m": Sampler(dpmpp_2m_step, "DPMSolverMultistepScheduler",
                        walks_sigmas=True, variance_exploding=False,
                        whole_timesteps=True),
}  # fmt: skip


@torch.no_grad()
def sample(
    eps_fn,
    noise,
    sampler="ddim",
    num_inference_steps=20,
    schedule=None,
    karras=False,
    eta=0.0,
    generator=None,
    callback=None,
    init=None,
    strength=1.0,
    mask=None,
    progress=False,
) -> torch.Tensor:
    """Turn noise into samples: the reverse diffusion, with the chosen sampler.

    Text-to-image starts from pure noise. img2img (SDEdit) gives `init` and a
    `strength`: the loop starts part-way (`img2img_start`), from `init` noised to
    that level. Inpainting also gives a `mask`: after every step, the part where
    mask is 0 is put back to `init`, noised to the new level (diffusers'
    inpainting with a plain UNet).

    Args:
        eps_fn: `eps_fn(x_t, t) -> ε̂`, the noise prediction, shaped like x_t; t is
            (B,) as diffusers gives it: long for samplers with `whole_timesteps`
            (ddpm, ddim, dpmpp_2m), float for euler and euler_ancestral
            (fractional with Karras σ's).
        noise: (B, ...) ε ~ N(0, I), the starting noise.
        sampler: a name in `SAMPLERS` ("ddim", "euler", "dpmpp_2m", ...).
        num_inference_steps: steps, one model evaluation each (img2img: fewer).
        schedule: the `NoiseSchedule` the model was trained with (default: SD v1's).
        karras: Karras et al. 2022 σ spacing (samplers that walk σ's).
        eta: DDIM's η (ddim only): 0 deterministic, 1 as noisy as DDPM.
        generator: draws the noise that ddpm, euler_ancestral and ddim (η > 0) add.
        callback: `callback(i, t, x, x0_pred)` after step i; if it returns a
            tensor, that tensor replaces x (a hook for custom guidance or masks).
        init: (B, ...) clean samples to start from (img2img, inpainting), or None.
        strength: share of the steps to run from `init`, in [0, 1]; if no step
            runs, `init` comes back as it is.
        mask: broadcastable to x; 1 where to generate, 0 where to keep `init`.
        progress: show a progress bar.
    Returns:
        (B, ...) the samples.
    """
    levels = noise_levels(sampler, num_inference_steps, schedule, karras)
    spec = SAMPLERS[sampler]
    start = _check_inputs(spec, sampler, len(levels), eta, init, strength, mask)
    if init is None:
        x = noise * levels.init_noise_sigma
    elif start == len(levels):
        return init  # no step runs at this strength: the image as it is
    else:
        x = levels.add_noise(init, noise, start)
    x0_pred, wanted = None, spec.options  # e.g. ("generator",) for ddpm
    for i in tqdm(range(start, len(levels)), desc=sampler, disable=not progress):
        t = levels.timesteps[i].to(x.device).repeat(len(x))  # (B,)
        eps = eps_fn(levels.model_input(x, i), t)
        given = {"eta": eta, "generator": generator, "previous": x0_pred}
        x, x0_pred = spec.step(levels, i, x, eps, **{k: given[k] for k in wanted})
        if mask is not None:
            last = i == len(levels) - 1
            known = init if last else levels.add_noise(init, noise, i + 1)
            x = (1 - mask) * known + mask * x
        if callback is not None:
            replaced = callback(i, t, x, x0_pred)
            x = x if replaced is None else replaced
    return x


def _check_inputs(spec, sampler, steps, eta, init, strength, mask) -> int:
    """The first step to run, or one clear ValueError for arguments that do not go
    together."""
    if eta != 0 and "eta" not in spec.options:
        takers = tuple(name for name, s in SAMPLERS.items() if "eta" in s.options)
        raise ValueError(f"eta applies to {', '.join(takers)} only, not to {sampler}.")
    if init is None and (strength != 1.0 or mask is not None):
        raise ValueError("strength and mask need an init to start from.")
    return 0 if init is None else img2img_start(steps, strength)
