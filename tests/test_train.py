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
