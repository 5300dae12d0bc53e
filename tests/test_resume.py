"""fit stopped mid-way and resumed from its checkpoint: the weights of a run that was
never stopped, bit for bit (model, optimizer, LR schedule, EMA, random state, data
position), with a reshuffling DataLoader and with an endless generator."""

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from sdscratch.train import EMA, fit

STEPS, STOP = 11, 7  # the interrupted run saves every 3 steps, so resumes at 6


class Interrupted(Exception):
    pass


def setup(kind):
    """A fresh model, EMA, batches and loss, as a new process would build them."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(4, 16), torch.nn.GELU(), torch.nn.Dropout(0.2),
        torch.nn.Linear(16, 4),
    )  # fmt: skip
    data = torch.Generator().manual_seed(1)
    noise = torch.Generator().manual_seed(2)
    x = torch.randn(40, 4, generator=data)
    if kind == "loader":  # 5 batches a pass: the run reshuffles twice
        batches = DataLoader(TensorDataset(x), batch_size=8, shuffle=True,
                             generator=data, drop_last=True)  # fmt: skip
    else:

        def endless():
            while True:
                yield (x[torch.randint(0, 40, (8,), generator=data)],)

        batches = endless()

    def loss_fn(model, batch):
        target = batch[0].flip(1) + 0.1 * torch.randn(batch[0].shape, generator=noise)
        return (model(batch[0]) - target).pow(2).mean()

    return model, EMA(model, decay=0.9), batches, loss_fn, [data, noise]


def train(kind, checkpoint=None, stop=None):
    model, ema, batches, loss_fn, generators = setup(kind)
    steps = [0]

    def counted(model, batch):
        steps[0] += 1
        if steps[0] == stop:
            raise Interrupted
        return loss_fn(model, batch)

    losses = fit(model, counted, batches, STEPS, lr=0.05, ema=ema, warmup=3,
                 progress=False, generators=generators, checkpoint=checkpoint,
                 checkpoint_every=3)  # fmt: skip
    return model, ema, losses, steps[0]


@pytest.mark.parametrize("kind", ["loader", "generator"])
def test_a_resumed_run_ends_with_the_weights_of_one_never_stopped(kind, tmp_path):
    model, ema, losses, _ = train(kind)
    with pytest.raises(Interrupted):
        train(kind, tmp_path / "run", stop=STOP)
    assert (tmp_path / "run" / "rank-0.pt").exists()
    resumed, resumed_ema, resumed_losses, trained = train(kind, tmp_path / "run")
    assert trained == STEPS - 6  # it went on from step 6, not from the start
    assert resumed_losses == losses
    for a, b in zip(model.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)
    for a, b in zip(ema.model.state_dict().values(),
                    resumed_ema.model.state_dict().values()):  # fmt: skip
        assert torch.equal(a, b)


def test_without_the_generators_the_resume_differs(tmp_path):
    """The check can fail: a checkpoint that forgets the loss's generator resumes
    with other noise."""
    model, _, _, _ = train("loader")
    fresh, ema, batches, loss_fn, generators = setup("loader")
    calls = [0]

    def stopping(model, batch):
        calls[0] += 1
        if calls[0] == STOP:
            raise Interrupted
        return loss_fn(model, batch)

    options = dict(lr=0.05, ema=ema, warmup=3, progress=False, checkpoint_every=3,
                   checkpoint=tmp_path / "run", generators=generators[:1])  # fmt: skip
    with pytest.raises(Interrupted):
        fit(fresh, stopping, batches, STEPS, **options)
    fresh, ema, batches, loss_fn, generators = setup("loader")
    options |= dict(ema=ema, generators=generators[:1])
    fit(fresh, loss_fn, batches, STEPS, **options)
    assert not torch.equal(model[0].weight, fresh[0].weight)


def test_a_checkpoint_of_another_number_of_processes_is_refused(tmp_path):
    model, ema, batches, loss_fn, generators = setup("loader")
    fit(model, loss_fn, batches, 3, progress=False, checkpoint=tmp_path,
        checkpoint_every=3)  # fmt: skip
    state = torch.load(tmp_path / "rank-0.pt", weights_only=True)
    state["processes"] = 2
    torch.save(state, tmp_path / "rank-0.pt")
    with pytest.raises(ValueError, match="saved by 2 processes"):
        fit(model, loss_fn, batches, 6, progress=False, checkpoint=tmp_path)
