"""fit on several processes: the same steps as one process with the whole batch.

tests/distributed_fit.py trains a tiny UNet for a few steps, as one plain process
and under Accelerate's launcher (two processes on the CPU, gloo); every run here
starts from the same weights and sees the same examples in the same order.
"""

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sdscratch.train import cpu_launch

WORKER = Path(__file__).parent / "distributed_fit.py"


def train(tmp_path, name, batch, processes=1, **env) -> tuple[dict, dict]:
    """Run the worker; return the weights it trained and its report."""
    out = tmp_path / f"{name}.safetensors"
    script = [str(WORKER), "--batch", str(batch), "--out", str(out)]
    command, launch_env = cpu_launch(script, processes)
    env |= launch_env
    env = os.environ | {"OMP_NUM_THREADS": "1"} | env
    result = subprocess.run(
        command, env=env, capture_output=True, text=True, timeout=240
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return load_file(out), json.loads(Path(f"{out}.json").read_text())


def largest_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[key] - b[key]).abs().max().item() for key in a)


@pytest.fixture(scope="module")
def whole_batch(tmp_path_factory):
    """One process, 16 examples per step."""
    return train(tmp_path_factory.mktemp("one"), "whole", 16)


@pytest.fixture(scope="module")
def split_batch(tmp_path_factory):
    """Two processes, 8 examples each per step."""
    return train(tmp_path_factory.mktemp("two"), "split", 8, processes=2)


def test_two_processes_with_half_batches_take_one_process_steps(
    whole_batch, split_batch, tmp_path
):
    (weights, report), (split, split_report) = whole_batch, split_batch
    assert split_report["processes"] == 2 and report["processes"] == 1
    assert largest_difference(weights, split) <= 1e-5
    assert split_report["losses"] == pytest.approx(report["losses"], rel=1e-5)
    # and the comparison can fail: one process with only half the batch differs
    half, _ = train(tmp_path, "half", 8)
    assert largest_difference(weights, half) > 1e-4


def test_each_process_draws_its_own_noise_and_the_first_as_one_process(whole_batch):
    """`rank_generator(seed)`: process 0 draws what a single process draws."""
    from sdscratch.train import rank_generator

    _, report = whole_batch
    expected = torch.randint(0, 2**31, (4,), generator=torch.Generator().manual_seed(7))
    assert report["draws"] == [expected.tolist()]
    assert rank_generator(7).initial_seed() == 7  # one process: the seed itself


def test_two_processes_give_each_rank_different_noise(split_batch):
    first, second = split_batch[1]["draws"]
    expected = torch.randint(0, 2**31, (4,), generator=torch.Generator().manual_seed(7))
    assert first == expected.tolist() and second != first


def test_gradient_accumulation_takes_the_whole_batch_steps(whole_batch, tmp_path):
    """Two batches of 8 per step, summed, on one process: the steps of 16."""
    weights, _ = whole_batch
    accumulated, report = train(
        tmp_path, "accumulated", 8, ACCELERATE_GRADIENT_ACCUMULATION_STEPS="2"
    )
    assert report["accumulation"] == 2
    assert largest_difference(weights, accumulated) <= 1e-5


def test_mixed_precision_bf16_trains_close_to_float32(whole_batch, tmp_path):
    weights, _ = whole_batch
    bf16, report = train(tmp_path, "bf16", 16, ACCELERATE_MIXED_PRECISION="bf16")
    assert report["precision"] == "bf16"
    assert 0 < largest_difference(weights, bf16) < 1e-2  # bf16 ran, and still trained
