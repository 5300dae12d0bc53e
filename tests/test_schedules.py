"""The schedules against diffusers' DDPMScheduler, the reference implementation."""

import pytest
import torch
from diffusers import DDPMScheduler

from sdscratch.schedules import SCHEDULES, NoiseSchedule

CASES = [
    ("linear", {}),
    ("linear", {"beta_start": 0.0002, "beta_end": 0.03}),
    ("scaled_linear", {}),
    ("cosine", {}),
]


def reference(schedule: NoiseSchedule) -> DDPMScheduler:
    return DDPMScheduler(**schedule.diffusers_config())


@pytest.mark.parametrize("name,kwargs", CASES)
@pytest.mark.parametrize("steps", [1000, 50])
def test_alphas_cumprod_match_diffusers(name, kwargs, steps):
    ours = NoiseSchedule.from_name(name, steps, **kwargs)
    theirs = reference(ours)
    torch.testing.assert_close(ours.betas, theirs.betas, atol=1e-6, rtol=0)
    torch.testing.assert_close(
        ours.alphas_cumprod, theirs.alphas_cumprod, atol=1e-6, rtol=0
    )


@pytest.mark.parametrize("name", SCHEDULES)
def test_add_noise_matches_diffusers(name):
    ours = NoiseSchedule.from_name(name)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(6, 3, 8, 8, generator=g)
    noise = torch.randn(6, 3, 8, 8, generator=g)
    t = torch.tensor([0, 1, 10, 500, 998, 999])
    expected = reference(ours).add_noise(x0, noise, t)
    torch.testing.assert_close(
        ours.add_noise(x0, noise, t), expected, atol=1e-6, rtol=0
    )


def test_add_noise_works_for_points():
    ours = NoiseSchedule.scaled_linear()
    x0, noise = torch.ones(4, 2), torch.zeros(4, 2)
    t = torch.tensor([0, 100, 500, 999])
    expected = ours.alphas_cumprod[t, None].sqrt().expand(4, 2)
    torch.testing.assert_close(ours.add_noise(x0, noise, t), expected)


def test_sd_v1_end_points():
    betas = NoiseSchedule.scaled_linear().betas
    assert betas[0].item() == pytest.approx(0.00085)
    assert betas[-1].item() == pytest.approx(0.012)


def test_snr_and_sigmas_agree():
    s = NoiseSchedule.cosine()
    torch.testing.assert_close(s.snr(), 1 / s.sigmas**2, rtol=1e-4, atol=0)
    assert torch.all(s.snr()[1:] < s.snr()[:-1]), "SNR must fall with t"


def test_unknown_schedule_is_one_clear_error():
    with pytest.raises(ValueError, match="Unknown schedule 'quadratic'"):
        NoiseSchedule.from_name("quadratic")


# ----------------------------------------------------------------------------------
# The scheduler config a checkpoint carries, written and read back


@pytest.mark.parametrize("name,kwargs", CASES)
@pytest.mark.parametrize("steps", [1000, 500])
def test_read_schedule_gives_what_diffusers_reads_from_the_same_file(
    name, kwargs, steps, tmp_path
):
    import json

    from diffusers import DDIMScheduler

    from sdscratch.pipeline import SCHEDULER_CONFIG, read_schedule, write_schedule

    write_schedule(tmp_path, NoiseSchedule.from_name(name, steps, **kwargs))
    ours = read_schedule(tmp_path)
    config = json.loads((tmp_path / SCHEDULER_CONFIG).read_text())
    theirs = DDIMScheduler.from_config(config)
    assert ours.name == name and ours.num_train_timesteps == steps
    torch.testing.assert_close(ours.alphas_cumprod, theirs.alphas_cumprod,
                               atol=1e-6, rtol=0)  # fmt: skip


@pytest.mark.parametrize("spacing", [None, "leading"])
def test_scheduler_settings_survive_writing_and_reading(spacing, tmp_path):
    from sdscratch.pipeline import read_schedule, write_schedule
    from sdscratch.samplers import noise_levels

    schedule = NoiseSchedule.scaled_linear()
    schedule.steps_offset, schedule.set_alpha_to_one = 3, True
    schedule.timestep_spacing = spacing
    write_schedule(tmp_path, schedule)
    back = read_schedule(tmp_path)
    assert (back.steps_offset, back.set_alpha_to_one) == (3, True)
    assert back.timestep_spacing == spacing
    for sampler in ("ddim", "euler"):
        before = noise_levels(sampler, 7, schedule).timesteps
        torch.testing.assert_close(noise_levels(sampler, 7, back).timesteps, before)


def test_an_unknown_timestep_spacing_is_one_clear_error():
    from sdscratch.samplers import noise_levels

    schedule = NoiseSchedule.scaled_linear()
    schedule.timestep_spacing = "trailing"
    with pytest.raises(ValueError, match="timestep_spacing='trailing'"):
        noise_levels("euler", 10, schedule)
