"""The samplers against diffusers' schedulers, driven by the diffusers pipeline loop.

The reference is the scheduler a diffusers user gets by swapping samplers on an SD
v1.5 pipeline, `XScheduler.from_config(pipe.scheduler.config)`, built
offline from that config; the loop is the pipeline's: `init_noise_sigma`,
`scale_model_input`, `step` with the same generator.
"""

from types import SimpleNamespace

import diffusers
import pytest
import torch
from diffusers import DDIMScheduler
from diffusers.utils.torch_utils import randn_tensor

from sdscratch.loading import schedule_from_config
from sdscratch.samplers import (
    SAMPLERS,
    Sampler,
    ddim_step,
    img2img_start,
    karras_sigmas,
    noise_levels,
    randn,
    sample,
)
from sdscratch.schedules import NoiseSchedule

# The diffusers scheduler of each sampler, as the registry names it.
SCHEDULERS = {
    name: getattr(diffusers, spec.diffusers_class) for name, spec in SAMPLERS.items()
}
# (sampler, karras, eta): every sampler; Karras σ's for those that walk σ's; η = 1
# for those that take an η.
CASES = [(name, False, 0.0) for name in SAMPLERS]
CASES += [(name, True, 0.0) for name, spec in SAMPLERS.items() if spec.walks_sigmas]
CASES += [
    (name, False, 1.0) for name, spec in SAMPLERS.items() if "eta" in spec.options
]
STEPS = [1, 2, 7, 20, 50]
SCHEDULES = ["scaled_linear", "linear", "cosine"]
TOLERANCE = 1e-5


def reference(sampler, schedule, karras=False, config=None):
    """The matching diffusers scheduler, from SD v1.5's config with our β schedule
    (or from `config`)."""
    config = config or {
        **schedule.diffusers_config(),
        "clip_sample": False,
        "set_alpha_to_one": False,
        "steps_offset": 1,
    }
    if karras and sampler != "euler_ancestral":
        config = {**config, "use_karras_sigmas": True}
    scheduler_class = SCHEDULERS[sampler]
    known = scheduler_class.from_config({})  # the class's own defaults
    return scheduler_class.from_config(
        {k: v for k, v in config.items() if k in known.config}
    )


def set_timesteps(scheduler, sampler, steps, schedule, karras):
    """scheduler.set_timesteps(steps), and Karras σ's for euler_ancestral.

    diffusers' EulerAncestralDiscreteScheduler has no Karras option, so its steps
    walk the Karras σ's and timesteps of EulerDiscreteScheduler(use_karras_sigmas).
    """
    scheduler.set_timesteps(steps)
    if karras and sampler == "euler_ancestral":
        euler = reference("euler", schedule, karras=True)
        euler.set_timesteps(steps)
        scheduler.sigmas, scheduler.timesteps = euler.sigmas, euler.timesteps


def make_eps_fn(schedule, shape):
    """A cheap deterministic stand-in for a UNet: the ideal noise prediction for
    Gaussian data N(μ, s²) per pixel, plus a nonlinear term so that errors show.
    """
    g = torch.Generator().manual_seed(1)
    mu = 0.5 * torch.randn(shape[1:], generator=g)
    s2 = 0.1 + torch.rand(shape[1:], generator=g)
    abar_table = schedule.alphas_cumprod.double()

    def eps_fn(x, t):
        assert t.shape == (len(x),)
        t = t.double()
        low = t.floor().long().clamp(max=len(abar_table) - 2)
        abar = torch.lerp(abar_table[low], abar_table[low + 1], t - low).float()
        abar = abar.reshape(-1, *([1] * (x.ndim - 1)))
        ideal = (1 - abar) ** 0.5 * (x - abar**0.5 * mu) / (abar * s2 + 1 - abar)
        return ideal + 0.05 * torch.sin(3 * x + t.float().reshape(abar.shape) / 100)

    return eps_fn


def diffusers_loop(scheduler, eps_fn, noise, eta, generator, start=0, init=None):
    """The denoising loop of StableDiffusion(Img2Img)Pipeline, for a given scheduler.

    With `init`: img2img, from `timesteps[start:]` after `add_noise`.
    """
    timesteps = scheduler.timesteps[start:]
    if init is None:
        x = noise * scheduler.init_noise_sigma
    else:
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(start)
        x = scheduler.add_noise(init, noise, timesteps[:1].repeat(len(init)))
    extra = {"generator": generator}
    if isinstance(scheduler, DDIMScheduler):
        extra["eta"] = eta
    for t in timesteps:
        model_input = scheduler.scale_model_input(x, t)
        eps = eps_fn(model_input, t.repeat(len(x)))
        x = scheduler.step(eps, t, x, **extra).prev_sample
    return x


@pytest.mark.parametrize("schedule_name", SCHEDULES)
@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("sampler,karras,eta", CASES)
def test_sample_matches_diffusers(sampler, karras, eta, steps, schedule_name):
    schedule = NoiseSchedule.from_name(schedule_name)
    shape = (2, 3, 8, 8)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    eps_fn = make_eps_fn(schedule, shape)
    scheduler = reference(sampler, schedule, karras)
    set_timesteps(scheduler, sampler, steps, schedule, karras)
    generator = torch.Generator().manual_seed(42)
    first_repeats = scheduler.timesteps[0] in scheduler.timesteps[1:]
    if sampler == "dpmpp_2m" and first_repeats:
        # Karras σ's on the cosine schedule: several σ's round to timestep 998, and
        # diffusers' step counter, found by timestep, starts at the second step and
        # runs off the end. Ours walks the steps in order; nothing to compare with.
        with pytest.raises(IndexError):
            diffusers_loop(scheduler, eps_fn, noise, eta, generator)
        pytest.skip("diffusers' DPMSolverMultistepScheduler fails on this case")
    expected = diffusers_loop(scheduler, eps_fn, noise, eta, generator)
    ours = sample(
        eps_fn,
        noise,
        sampler,
        steps,
        schedule,
        karras=karras,
        eta=eta,
        generator=torch.Generator().manual_seed(42),
    )
    error = (ours - expected).abs().max().item()
    assert error <= TOLERANCE, f"max abs difference {error:.2e}"


@pytest.mark.parametrize("sampler,karras,eta", CASES)
def test_timesteps_and_sigmas_match_diffusers(sampler, karras, eta):
    schedule = NoiseSchedule.scaled_linear()
    for steps in STEPS:
        scheduler = reference(sampler, schedule, karras)
        set_timesteps(scheduler, sampler, steps, schedule, karras)
        levels = noise_levels(sampler, steps, schedule, karras)
        assert levels.timesteps.dtype == scheduler.timesteps.dtype
        torch.testing.assert_close(levels.timesteps, scheduler.timesteps)
        if SAMPLERS[sampler].walks_sigmas:
            torch.testing.assert_close(levels.sigmas, scheduler.sigmas)
        torch.testing.assert_close(
            torch.as_tensor(levels.init_noise_sigma),
            torch.as_tensor(scheduler.init_noise_sigma),
        )


@pytest.mark.parametrize("strength", [0.3, 0.75, 1.0])
@pytest.mark.parametrize("sampler,karras,eta", CASES)
def test_img2img_matches_diffusers(sampler, karras, eta, strength):
    schedule, steps, shape = NoiseSchedule.scaled_linear(), 20, (2, 3, 8, 8)
    g = torch.Generator().manual_seed(0)
    init = torch.randn(shape, generator=g).tanh()
    noise = torch.randn(shape, generator=g)
    eps_fn = make_eps_fn(schedule, shape)
    scheduler = reference(sampler, schedule, karras)
    set_timesteps(scheduler, sampler, steps, schedule, karras)
    start = img2img_start(steps, strength)
    expected = diffusers_loop(
        scheduler, eps_fn, noise, eta, torch.Generator().manual_seed(7), start, init
    )
    ours = sample(
        eps_fn,
        noise,
        sampler,
        steps,
        schedule,
        karras=karras,
        eta=eta,
        generator=torch.Generator().manual_seed(7),
        init=init,
        strength=strength,
    )
    error = (ours - expected).abs().max().item()
    assert error <= TOLERANCE, f"max abs difference {error:.2e}"


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_inpainting_matches_diffusers_loop(sampler):
    """StableDiffusionInpaintPipeline with a 4-channel UNet: after each step, the
    known region (mask 0) is `init` noised to the next timestep, or `init` itself
    after the last step."""
    schedule, steps, shape = NoiseSchedule.scaled_linear(), 10, (2, 3, 8, 8)
    g = torch.Generator().manual_seed(0)
    init = torch.randn(shape, generator=g).tanh()
    noise = torch.randn(shape, generator=g)
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., 2:6, 3:7] = 1
    strength = 0.8
    eps_fn = make_eps_fn(schedule, shape)
    scheduler = reference(sampler, schedule)
    scheduler.set_timesteps(steps)
    start = steps - int(steps * strength)
    timesteps = scheduler.timesteps[start:]
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(start)
    x = scheduler.add_noise(init, noise, timesteps[:1].repeat(len(init)))
    generator = torch.Generator().manual_seed(3)
    for i, t in enumerate(timesteps):
        eps = eps_fn(scheduler.scale_model_input(x, t), t.repeat(len(x)))
        x = scheduler.step(eps, t, x, generator=generator).prev_sample
        known = init
        if i < len(timesteps) - 1:
            known = scheduler.add_noise(init, noise, timesteps[i + 1 : i + 2])
        x = (1 - mask) * known + mask * x
    ours = sample(
        eps_fn,
        noise,
        sampler,
        steps,
        schedule,
        generator=torch.Generator().manual_seed(3),
        init=init,
        strength=strength,
        mask=mask,
    )
    error = (ours - x).abs().max().item()
    assert error <= TOLERANCE, f"max abs difference {error:.2e}"
    torch.testing.assert_close(ours * (1 - mask), init * (1 - mask))


@pytest.mark.parametrize("sampler,karras,eta", CASES)
def test_samples_have_the_data_distribution(sampler, karras, eta):
    """With the ideal noise prediction for N(μ, s²) data, many steps give N(μ, s²)."""
    schedule = NoiseSchedule.scaled_linear()
    mu, s = 0.3, 0.5
    noise = torch.randn(5000, 1, generator=torch.Generator().manual_seed(0))
    abar_table = schedule.alphas_cumprod.double()

    def eps_fn(x, t):
        t = t[0].double()  # the same for the whole batch
        low = t.floor().long().clamp(max=len(abar_table) - 2)
        abar = torch.lerp(abar_table[low], abar_table[low + 1], t - low).float()
        return (1 - abar) ** 0.5 * (x - abar**0.5 * mu) / (abar * s**2 + 1 - abar)

    generator = torch.Generator().manual_seed(1)
    x = sample(eps_fn, noise, sampler, 200, schedule, karras, eta, generator)
    assert x.mean().item() == pytest.approx(mu, abs=0.03)
    assert x.std().item() == pytest.approx(s, abs=0.03)


def test_callback_sees_every_step_and_can_replace_x():
    seen = []

    def callback(i, t, x, x0_pred):
        seen.append((i, t.tolist(), x0_pred.shape))
        return torch.zeros_like(x) if i == 4 else None

    levels = noise_levels("ddim", 5)
    out = sample(lambda x, t: x, torch.ones(3, 2), "ddim", 5, callback=callback)
    assert [i for i, _, _ in seen] == list(range(5))
    assert [t for _, t, _ in seen] == [[t] * 3 for t in levels.timesteps.tolist()]
    assert seen[0][2] == (3, 2)
    assert torch.equal(out, torch.zeros(3, 2))


def test_karras_sigmas_span_the_schedule():
    schedule = NoiseSchedule.scaled_linear()
    sigmas = karras_sigmas(0.03, 14.6, 10)
    assert sigmas[0].item() == pytest.approx(14.6)
    assert sigmas[-1].item() == pytest.approx(0.03)
    assert torch.all(sigmas[1:] < sigmas[:-1])
    levels = noise_levels("euler", 10, schedule, karras=True)
    assert levels.sigmas[-1] == 0 and len(levels.sigmas) == 11


@pytest.mark.parametrize("steps", [1, 7, 20, 50])
@pytest.mark.parametrize("strength", [0.0, 0.01, 0.3, 0.55, 0.75, 0.8, 1.0])
def test_img2img_start_is_diffusers_rule(steps, strength):
    """The first step img2img runs is where diffusers' img2img pipeline starts."""
    scheduler = reference("ddim", NoiseSchedule.scaled_linear())
    scheduler.set_timesteps(steps)
    pipe = SimpleNamespace(scheduler=scheduler)
    get_timesteps = diffusers.StableDiffusionImg2ImgPipeline.get_timesteps
    timesteps, runs = get_timesteps(pipe, steps, strength, "cpu")
    start = img2img_start(steps, strength)
    assert steps - start == runs
    assert torch.equal(noise_levels("ddim", steps).timesteps[start:], timesteps)


def test_a_strength_that_runs_no_step_gives_init_back():
    init = torch.randn(2, 3, generator=torch.Generator().manual_seed(0))
    out = sample(lambda x, t: x, torch.ones(2, 3), "ddim", 20, init=init, strength=0.01)
    assert torch.equal(out, init)


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("spacing", [None, "leading"])
@pytest.mark.parametrize("offset, to_one", [(0, True), (3, True), (2, False)])
def test_scheduler_config_settings_are_followed(sampler, spacing, offset, to_one):
    """A scheduler config with other settings than SD v1.5's: every sampler does
    what `XScheduler.from_config(config)` does with them (ddpm and ddim shift their
    timesteps by steps_offset, ddim ends at ᾱ = 1 if set_alpha_to_one; the others'
    "linspace" timesteps ignore both, unless timestep_spacing is "leading")."""
    config = dict(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
        beta_schedule="scaled_linear", clip_sample=False, steps_offset=offset,
        set_alpha_to_one=to_one,
    )  # fmt: skip
    if spacing is not None:
        config["timestep_spacing"] = spacing
    schedule = schedule_from_config({"_class_name": "PNDMScheduler", **config})
    shape = (2, 3, 4, 4)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    eps_fn = make_eps_fn(schedule, shape)
    scheduler = reference(sampler, schedule, config=config)
    scheduler.set_timesteps(10)
    expected = diffusers_loop(
        scheduler, eps_fn, noise, 0.0, torch.Generator().manual_seed(1)
    )
    ours = sample(eps_fn, noise, sampler, 10, schedule,
                  generator=torch.Generator().manual_seed(1))  # fmt: skip
    levels = noise_levels(sampler, 10, schedule)
    torch.testing.assert_close(levels.timesteps, scheduler.timesteps)
    torch.testing.assert_close(torch.as_tensor(levels.init_noise_sigma),
                               torch.as_tensor(scheduler.init_noise_sigma))  # fmt: skip
    assert (ours - expected).abs().max() <= TOLERANCE


def test_randn_draws_what_diffusers_randn_tensor_draws():
    for dtype in (torch.float32, torch.float16):
        ours = randn((2, 4, 3), torch.Generator().manual_seed(5), "cpu", dtype)
        theirs = randn_tensor((2, 4, 3), torch.Generator().manual_seed(5), "cpu", dtype)
        assert ours.dtype == dtype and torch.equal(ours, theirs)


def test_a_misspelled_step_keyword_is_an_error():
    levels = noise_levels("ddim", 5)
    x = torch.zeros(1, 2)
    with pytest.raises(TypeError, match="etta"):
        ddim_step(levels, 0, x, x, etta=0.5)
    with pytest.raises(TypeError, match="eta"):
        SAMPLERS["euler"].step(levels, 0, x, x, eta=0.5)


def test_the_registry_refuses_a_step_the_loop_cannot_call():
    def heun_step(levels, i, x, eps, churn=0.0):
        return x, x

    with pytest.raises(ValueError, match="churn"):
        Sampler(heun_step, "HeunDiscreteScheduler", walks_sigmas=True,
                variance_exploding=True, whole_timesteps=False)  # fmt: skip


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"sampler": "heun"}, "Unknown sampler 'heun'"),
        ({"num_inference_steps": 0}, "steps must be between 1 and 1000, got 0"),
        ({"num_inference_steps": 1001}, "between 1 and 1000, got 1001"),
        ({"num_inference_steps": 2.5}, "between 1 and 1000, got 2.5"),
        ({"num_inference_steps": 1000}, "ddim cannot take 1000 steps: with steps_o"),
        ({"karras": True}, "Karras sigmas need one of"),
        ({"sampler": "euler", "eta": 0.5}, "eta applies to ddim only"),
        ({"strength": 0.5}, "strength and mask need an init"),
        ({"init": torch.zeros(1, 2), "strength": 1.5}, "strength must be between"),
    ],
)
def test_bad_requests_are_one_clear_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        sample(lambda x, t: x, torch.zeros(1, 2), **kwargs)
