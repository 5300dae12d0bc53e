"""Checks for the training-at-scale exercises (lesson 16): the batch each process
trains on at a step, the shards each process's worker reads, and the gradient of
the whole batch from the processes' gradients."""

import torch
from accelerate.data_loader import BatchSamplerShard
from torch.utils.data import BatchSampler

from sdscratch.exercises.compare import call, check, generator
from sdscratch.shards import split_shards
from sdscratch.train import mean_gradient


def accelerate_batch(order, step, rank, processes, batch_size) -> torch.Tensor:
    """What Accelerate's prepared DataLoader gives process `rank` at `step`: the
    batches of `order` (drop_last) dealt out by `BatchSamplerShard`."""
    batches = BatchSampler(order.tolist(), batch_size, drop_last=True)
    shard = BatchSamplerShard(batches, num_processes=processes, process_index=rank,
                              split_batches=False, even_batches=True)  # fmt: skip
    return torch.tensor(list(shard)[step])


def check_rank_batch(fn) -> None:
    """`fn(order, step, rank, processes, batch_size) -> indices`: the examples that
    process `rank` of `processes` trains on at `step` when Accelerate shares out a
    DataLoader of `batch_size` per process whose (shuffled) order of examples is
    `order`: order (N,) int64 -> (batch_size,)."""
    g = generator(16)

    def case(processes, batch_size, step, rank):
        steps = 4  # full steps in the order, and a few examples left over
        order = torch.randperm(steps * processes * batch_size + 3, generator=g)
        want = accelerate_batch(order, step, rank, processes, batch_size)
        block = batch_size
        mistakes = {
            "every process trains on its own examples: at each step the next "
            "processes × batch_size of the order are shared out, batch "
            "step · processes + rank to process rank.": order[
                step * block : (step + 1) * block],
            "the processes share each step's stretch of the order; a process "
            "does not own a block of the dataset.": order[
                (rank * steps + step) * block : (rank * steps + step + 1) * block],
            "Accelerate deals out whole batches, not single examples in turn "
            "(that is torch's DistributedSampler).": order[rank::processes][
                step * block : (step + 1) * block],
        }  # fmt: skip
        got, error = call(fn, order.clone(), step, rank, processes, batch_size)
        return got, error, want, mistakes

    return check("rank_batch", [case(2, 4, 2, 1), case(3, 5, 1, 2), case(4, 3, 3, 3)])


def check_shard_split(fn) -> None:
    """`fn(shards, rank, processes, worker, workers) -> list`: the shards that
    DataLoader worker `worker` of process `rank` reads when the shards are dealt
    out without replacement, by process first and then by worker, as webdataset's
    `split_by_node` and `split_by_worker` do: a list of str, possibly empty."""

    def case(count, processes, workers, rank, worker):
        shards = [f"shard-{i:06d}.tar" for i in range(count)]
        want = split_shards(shards, rank, processes, worker, workers)
        mistakes = {
            "each of a process's workers reads different shards: split the "
            "process's share again, worker::workers.": shards[rank::processes],
            "split between the processes first (rank::processes), then that "
            "share between the workers.": shards[worker::workers],
            "split by process first, then each process's share by worker; "
            "rank · workers + worker is another order.":
                shards[rank * workers + worker :: processes * workers],
        }  # fmt: skip
        got, error = call(fn, list(shards), rank, processes, worker, workers)
        if error is None and isinstance(got, tuple):
            got = list(got)
        return got, error, want, mistakes

    return check(
        "shard_split",
        [case(11, 2, 3, 1, 1), case(13, 3, 2, 1, 0), case(3, 2, 2, 1, 1)],
    )


def check_mean_gradient(fn) -> None:
    """`fn(grads, counts) -> gradient`: the gradient of the mean loss over all
    processes' examples from each process's gradient of the mean over its own
    counts[r] examples: grads (R, P), counts (R,) int64 -> (P,)."""
    g = generator(17)

    def case(counts):
        counts = torch.tensor(counts)
        grads = torch.randn(len(counts), 7, generator=g)
        weighted = (grads * counts[:, None]).sum(0)
        mistakes = {
            "weight each process's gradient by its number of examples: a "
            "process with 2 examples counts less than one with 8.": grads.mean(0),
            "divide the weighted sum by the total number of examples.": weighted,
            "divide by the number of examples, Σ n_r, not of processes.":
                weighted / len(counts),
        }  # fmt: skip
        got, error = call(fn, grads.clone(), counts.clone())
        return got, error, mean_gradient(grads, counts), mistakes

    return check("mean_gradient", [case([8, 2]), case([5, 1, 3]), case([4, 4, 1, 7])])
