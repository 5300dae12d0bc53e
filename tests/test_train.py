import itertools

import pytest
import torch

from sdscratch.train import fit


def linear_fit(batches, steps):
    model = torch.nn.Linear(1, 1)
    return fit(model, lambda m, x: (m(x) - 2 * x).pow(2).mean(), batches, steps,
               lr=0.1, progress=False)  # fmt: skip


def test_fit_repeats_a_short_list_and_learns():
    batches = [torch.randn(8, 1, generator=torch.Generator().manual_seed(i))
               for i in range(3)]  # fmt: skip
    losses = linear_fit(batches, 50)
    assert len(losses) == 50
    assert losses[-1] < 0.01 * losses[0]


def test_fit_iterates_a_dataloader_again_without_keeping_its_batches():
    seen = []

    class Loader:  # re-iterable, like a DataLoader
        def __iter__(self):
            for i in range(2):
                batch = torch.full((4, 1), float(i + 1))
                seen.append(batch)
                yield batch

    linear_fit(Loader(), 7)
    assert len(seen) == 7  # drawn afresh on every pass, not replayed from a cache


def test_fit_consumes_an_endless_generator_and_refuses_a_short_one():
    endless = (torch.ones(2, 1) for _ in itertools.count())
    assert len(linear_fit(endless, 5)) == 5
    with pytest.raises(ValueError, match="ran out of batches"):
        linear_fit((torch.ones(2, 1) for _ in range(3)), 5)
    with pytest.raises(ValueError, match="no batches"):
        linear_fit([], 5)


@pytest.mark.parametrize("gamma", [None, 5.0])
def test_diffusion_loss_matches_the_diffusers_training_recipe(gamma):
    """The loss of diffusers' text-to-image training script, Min-SNR weighting
    included (`compute_snr`), on the same x0, t, noise and network."""
    from diffusers import DDPMScheduler
    from diffusers.training_utils import compute_snr

    from sdscratch.schedules import NoiseSchedule
    from sdscratch.train import diffusion_loss

    schedule = NoiseSchedule.scaled_linear()
    scheduler = DDPMScheduler(**schedule.diffusers_config())
    net = torch.nn.Conv2d(4, 4, 3, padding=1)
    unet = lambda x, t, context: net(x) * (1 + t[:, None, None, None] / 1000)  # noqa: E731
    x0 = torch.randn(16, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    ours = diffusion_loss(unet, x0, schedule, torch.Generator().manual_seed(1),
                          snr_gamma=gamma)  # fmt: skip
    draws = torch.Generator().manual_seed(1)  # the same draws, in the same order
    t = torch.randint(0, 1000, (16,), generator=draws)
    noise = torch.randn(x0.shape, generator=draws)
    pred = unet(scheduler.add_noise(x0, noise, t), t, None)
    if gamma is None:
        expected = torch.nn.functional.mse_loss(pred, noise)
    else:  # diffusers/examples/text_to_image/train_text_to_image.py
        snr = compute_snr(scheduler, t)
        capped = torch.stack([snr, gamma * torch.ones_like(t)], dim=1).min(dim=1)[0]
        weights = capped / snr
        loss = torch.nn.functional.mse_loss(pred, noise, reduction="none")
        expected = (loss.mean(dim=list(range(1, len(loss.shape)))) * weights).mean()
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-7)
