import itertools

import pytest
import torch

from sdscratch.train import EMA, fit


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


# ----------------------------------------------------------------------------------
# EMA and the learning-rate schedule, against a hand computation and torch's and
# diffusers' own implementations


def test_ema_update_is_the_polyak_average_and_copies_buffers():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    ema = EMA(model, decay=0.9)
    start = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    model.train()(torch.randn(8, 3))  # moves BatchNorm's running statistics
    ema.update(model)
    for averaged, old, new in zip(ema.model.parameters(), start, model.parameters()):
        torch.testing.assert_close(averaged, 0.9 * old + 0.1 * new)  # by hand
    for averaged, live in zip(ema.model.buffers(), model.buffers()):
        assert torch.equal(averaged, live)
    assert not any(p.requires_grad for p in ema.model.parameters())


def test_ema_follows_diffusers_ema_model_over_many_steps():
    from diffusers.training_utils import EMAModel

    torch.manual_seed(1)
    model = torch.nn.Linear(5, 2)
    ours = EMA(model, decay=0.95)
    # a constant decay: update_after_step=-1 skips diffusers' first-step copy
    theirs = EMAModel(model.parameters(), decay=0.95, min_decay=0.95,
                      update_after_step=-1)  # fmt: skip
    for _ in range(20):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.3 * torch.randn_like(p))
        ours.update(model)
        theirs.step(model.parameters())
    for averaged, expected in zip(ours.model.parameters(), theirs.shadow_params):
        torch.testing.assert_close(averaged, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("steps, warmup", [(40, 5), (30, 0), (12, 1)])
def test_learning_rate_is_torchs_linear_warmup_then_cosine_to_a_tenth(
    steps, warmup, monkeypatch
):
    """fit's learning rates, step by step, against torch's own schedulers:
    LinearLR from lr/warmup up to lr, then CosineAnnealingLR down to lr/10."""
    from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, SequentialLR

    lr, seen, optimizers = 0.05, [], []

    class Recorded(torch.optim.AdamW):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            optimizers.append(self)

    def loss_fn(model, x):
        seen.append(optimizers[0].param_groups[0]["lr"])  # the lr of this step
        return model(x).pow(2).mean()

    monkeypatch.setattr(torch.optim, "AdamW", Recorded)
    fit(torch.nn.Linear(1, 1), loss_fn, [torch.ones(2, 1)], steps, lr=lr,
        warmup=warmup, progress=False)  # fmt: skip
    parameter = torch.zeros(1, requires_grad=True)
    reference = torch.optim.SGD([parameter], lr=lr)
    cosine = CosineAnnealingLR(reference, T_max=steps - warmup, eta_min=lr / 10)
    if warmup:
        linear = LinearLR(reference, start_factor=1 / warmup, end_factor=1.0,
                          total_iters=max(warmup - 1, 1))  # fmt: skip
        schedule = SequentialLR(reference, [linear, cosine], milestones=[warmup])
    else:
        schedule = cosine
    expected = []
    for _ in range(steps):
        expected.append(reference.param_groups[0]["lr"])
        reference.step()
        schedule.step()
    assert seen == pytest.approx(expected, rel=1e-6, abs=1e-9)


def test_mean_gradient_of_uneven_shares_is_the_whole_batchs_gradient():
    """Processes with 8, 2 and 5 examples: their gradients combined by
    `mean_gradient` equal autograd's gradient of the mean over all 15."""
    from sdscratch.train import mean_gradient

    g = torch.Generator().manual_seed(0)
    model = torch.nn.Linear(3, 2)
    x, y = torch.randn(15, 3, generator=g), torch.randn(15, 2, generator=g)

    def gradient(rows):
        model.zero_grad()
        (model(x[rows]) - y[rows]).pow(2).mean().backward()
        return torch.cat([p.grad.flatten() for p in model.parameters()])

    shares = [range(0, 8), range(8, 10), range(10, 15)]
    grads = torch.stack([gradient(list(rows)) for rows in shares])  # (3, 8)
    whole = gradient(list(range(15)))
    counts = torch.tensor([len(rows) for rows in shares])
    assert torch.allclose(mean_gradient(grads, counts), whole, atol=1e-6)
    assert not torch.allclose(grads.mean(0), whole, atol=1e-3)  # the plain mean
