"""Training: the loop every model shares, EMA weights and the diffusion loss.

`fit` runs on Hugging Face Accelerate, so the same loop runs as one plain process or
under `accelerate launch` (several processes, each training on its share of every
batch, their gradients averaged), with the gradient accumulation and mixed precision
that the `Accelerator` asks for, and it stops and resumes bit for bit from a
checkpoint. The recipes that made the bundled checkpoints live in `sdscratch.recipes`.
"""

import copy
import random
import socket
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator, PartialState
from accelerate.utils import parse_flag_from_env
from tqdm.auto import tqdm

CHECKPOINT_FILE = "rank-{rank}.pt"  # one file per process in fit's checkpoint folder


class EMA:
    """An exponential moving average of a model's weights (Polyak averaging).

    Sampling from the averaged weights gives smoother, better images than the
    last training step's weights; every Stable Diffusion release ships EMA weights.
    """

    def __init__(self, model: torch.nn.Module, decay=0.999):
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: torch.nn.Module):
        for ema, live in zip(self.model.parameters(), model.parameters()):
            ema.lerp_(live, 1.0 - self.decay)
        for ema, live in zip(self.model.buffers(), model.buffers()):
            ema.copy_(live)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "model": self.model.state_dict()}

    def load_state_dict(self, state: dict):
        self.decay = state["decay"]
        self.model.load_state_dict(state["model"])


def fit(
    model,
    loss_fn,
    batches,
    steps,
    lr=1e-3,
    ema=None,
    weight_decay=0.0,
    grad_clip=1.0,
    warmup=0,
    desc="training",
    progress=True,
    *,
    accelerator=None,
    generators=(),
    checkpoint=None,
    checkpoint_every=None,
) -> list[float]:
    """Train `model` for `steps` AdamW steps; return the loss at every step.

    On several processes (`accelerate launch`), each draws its own batches (a
    DataLoader is split between them by Accelerate) and the gradients are averaged:
    two processes with batches of B/2 take the steps one process takes with B.

    Args:
        model: the module whose parameters are trained (set to train mode).
        loss_fn: `loss_fn(model, batch) -> scalar tensor`.
        batches: a list or DataLoader of batches, iterated again as often as
            `steps` needs (a shuffling DataLoader reshuffles), or a generator that
            yields at least `steps` batches.
        lr: peak learning rate, reached after `warmup` steps, cosine decay after.
        ema: an `EMA` of the model, updated after every step.
        grad_clip: clip the gradient norm to this (None: no clipping).
        accelerator: an `accelerate.Accelerator` (default: a new one, which reads
            `accelerate launch`'s settings: processes, mixed precision, and the
            number of batches per step, ACCELERATE_GRADIENT_ACCUMULATION_STEPS).
        generators: every `torch.Generator` that `batches` and `loss_fn` draw
            from, so that a checkpoint holds their state.
        checkpoint: a folder; with `checkpoint_every`, fit saves there every that
            many steps (one file per process), and if it holds a checkpoint, fit
            resumes from it: the same weights, bit for bit, as a run never stopped.
    """
    accelerator = accelerator or Accelerator()
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: _lr_factor(s, steps, warmup)
    )
    # The model is not wrapped in DistributedDataParallel, whose wrapper has only
    # `forward`: loss functions call `vae.encode` and the like. `step` averages the
    # gradients between the processes itself, in one all-reduce.
    model.to(accelerator.device)
    optimizer = accelerator.prepare(optimizer)
    _same_start(params, accelerator)
    # Asking a DataLoader for an iterator draws a seed from its generator: fit has
    # always asked once before training, and the bundled checkpoints were made so.
    once = iter(batches) is batches  # a generator cannot restart
    if isinstance(batches, torch.utils.data.DataLoader):
        batches = accelerator.prepare(batches)  # each process its share
    stream = BatchStream(batches, generators, once)
    run = Run(model, optimizer, schedule, ema, stream, accelerator)
    if checkpoint is not None:
        run.resume(Path(checkpoint))
    bar = tqdm(total=steps, initial=len(run.losses), desc=desc,
               disable=not progress or not accelerator.is_main_process)  # fmt: skip
    while len(run.losses) < steps:
        run.step(loss_fn, params, grad_clip)
        bar.update()
        if len(run.losses) % 20 == 0:
            bar.set_postfix(loss=f"{sum(run.losses[-20:]) / 20:.4f}")
        if checkpoint and checkpoint_every and len(run.losses) % checkpoint_every == 0:
            run.save(Path(checkpoint))
    bar.close()
    model.eval()
    return run.losses


class Run:
    """What `fit` trains and how far it got: what a checkpoint saves and restores."""

    def __init__(self, model, optimizer, schedule, ema, stream, accelerator):
        self.model, self.optimizer, self.schedule = model, optimizer, schedule
        self.ema, self.stream, self.accelerator = ema, stream, accelerator
        self.losses = []  # one per step, averaged over the processes

    def step(self, loss_fn, params, grad_clip):
        """One AdamW step on `gradient_accumulation_steps` batches per process.

        Every batch's loss is divided by their number (in `accelerator.backward`),
        so that the summed gradients are their mean; then the processes average
        theirs, once per step, as DistributedDataParallel would.
        """
        accelerator = self.accelerator
        count = accelerator.gradient_accumulation_steps
        total = 0.0
        for _ in range(count):
            batch = next(self.stream)
            with accelerator.autocast():  # mixed precision, if asked for
                loss = loss_fn(self.model, batch)
            accelerator.backward(loss)
            total = total + loss.detach()
        if accelerator.num_processes > 1:
            _average_gradients(params, accelerator.num_processes)
        if grad_clip is not None:
            accelerator.clip_grad_norm_(params, grad_clip)
        self.optimizer.step()
        self.schedule.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self.model)
        if accelerator.num_processes > 1:
            total = accelerator.reduce(total, "mean")
        self.losses.append(total.item() / count)

    def save(self, folder: Path):
        """Write this process's checkpoint file (atomically) into `folder`."""
        folder.mkdir(parents=True, exist_ok=True)
        accelerator = self.accelerator
        state = {
            "processes": accelerator.num_processes,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(),
            "ema": None if self.ema is None else self.ema.state_dict(),
            "losses": self.losses,
            "data": self.stream.position(),
            "random": random_state(self.stream.generators),
        }
        path = folder / CHECKPOINT_FILE.format(rank=accelerator.process_index)
        torch.save(state, path.with_suffix(".tmp"))
        path.with_suffix(".tmp").replace(path)
        accelerator.wait_for_everyone()

    def resume(self, folder: Path):
        """Load this process's checkpoint file from `folder`, if there is one."""
        path = folder / CHECKPOINT_FILE.format(rank=self.accelerator.process_index)
        if not path.exists():
            return
        try:  # tensors only: no pickled code
            state = torch.load(path, weights_only=True)
        except Exception as error:  # torch raises many kinds, some in pages
            why = (str(error).strip().splitlines() or [type(error).__name__])[0]
            raise ValueError(f"{path} is not a checkpoint fit can read: {why}")
        if state["processes"] != self.accelerator.num_processes:
            raise ValueError(
                f"{path} was saved by {state['processes']} processes; resume it "
                f"with as many, not {self.accelerator.num_processes}."
            )
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        self.losses = state["losses"]
        self.stream.seek(state["data"])  # draws the batches again, without training
        set_random_state(self.stream.generators, state["random"])


def mean_gradient(grads: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """The gradient of the mean loss over all processes' examples, from each
    process's gradient of the mean over its own: Σ_r n_r g_r / Σ_r n_r.

    With equal counts it is the plain mean of the processes' gradients, what
    `fit`'s all-reduce computes (its batches are all full and of one size);
    with a short last batch on one process the plain mean would give that
    process's few examples the weight of a full batch.

    Args:
        grads: (R, ...) each of the R processes' gradient of its mean loss.
        counts: (R,) how many examples each process's mean was over.
    Returns:
        (...) the gradient of the mean over all Σ_r n_r examples.
    """
    weights = counts.to(grads.dtype) / counts.sum()  # (R,)
    return torch.einsum("r,r...->...", weights, grads)


def _same_start(params, accelerator):
    """Give every process the first process's initial weights."""
    if accelerator.num_processes > 1:
        with torch.no_grad():
            for p in params:
                torch.distributed.broadcast(p.data, src=0)


def _average_gradients(params, processes):
    """Replace every process's gradients with their mean over the processes
    (one all-reduce of all of them, flattened)."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.flatten() for g in grads])  # (number of parameters,)
    torch.distributed.all_reduce(flat)
    flat /= processes
    for p, chunk in zip(params, flat.split([g.numel() for g in grads])):
        p.grad = chunk.view_as(p).clone()


class BatchStream:
    """The batches `fit` draws, one after the other, and where it is in them.

    Its position is the number of passes over `batches`, the batches drawn in this
    pass, and the random state at the pass's start: enough to draw the same
    batches again after a restart.
    """

    def __init__(self, batches, generators=(), once=None):
        self.batches, self.generators = batches, list(generators)
        self.once = iter(batches) is batches if once is None else once
        self.passes, self.drawn, self.start, self.iterator = 0, 0, None, None

    def __iter__(self):
        return self

    def __next__(self):
        if self.iterator is None:
            self._begin()
        batch = next(self.iterator, _END)
        if batch is _END and not self.once and self.drawn > 0:
            self.passes += 1
            self._begin()
            batch = next(self.iterator, _END)
        if batch is _END and self.once:
            raise ValueError("fit() ran out of batches: give a list or a DataLoader.")
        if batch is _END:
            raise ValueError("fit() got no batches to train on.")
        self.drawn += 1
        return batch

    def _begin(self):
        self.start, self.drawn = random_state(self.generators), 0
        self.iterator = iter(self.batches)

    def position(self) -> dict:
        return {"passes": self.passes, "drawn": self.drawn, "start": self.start}

    def seek(self, position: dict):
        """Go to `position`: the random state of its pass's start, then its
        batches drawn again (`fit` restores the random state after them)."""
        set_random_state(self.generators, position["start"])
        self._begin()
        for _ in range(position["drawn"]):
            next(self)
        self.passes = position["passes"]


_END = object()


def random_state(generators=()) -> dict:
    """The state of torch's and Python's global generators and of `generators`."""
    return {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "generators": [g.get_state() for g in generators],
    }


def set_random_state(generators, state: dict):
    """Put `random_state`'s result back."""
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    for generator, saved in zip(generators, state["generators"], strict=True):
        generator.set_state(saved)


def rank_generator(seed: int) -> torch.Generator:
    """A `torch.Generator` for this process: on the first (or only) process seeded
    with `seed`, so that a single process draws what it always drew; on process r
    seeded from (seed, r), so that no two processes draw the same noise.

    Args:
        seed: the run's seed for this stream of draws.
    """
    rank = processes().process_index
    if rank == 0:
        return torch.Generator().manual_seed(seed)
    words = np.random.SeedSequence([seed, rank]).generate_state(2)  # 2 × uint32
    return torch.Generator().manual_seed(int(words[0]) << 32 | int(words[1]))


def _lr_factor(step, steps, warmup):
    """Linear warm-up, then cosine decay to 10 % of the peak."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + torch.cos(torch.tensor(progress * torch.pi)).item())


def diffusion_loss(unet, x0, schedule, generator=None, context=None, snr_gamma=None):
    """The simple DDPM objective: predict the noise that was added.

    Ho et al. 2020, eq. 14: E_{t, x_0, ε} ‖ε − ε_θ(√ᾱ_t x_0 + √(1-ᾱ_t) ε, t)‖².

    Args:
        unet: `unet(x_t, t, context) -> ε̂`, same shape as x_t.
        x0: (B, C, H, W) clean images or latents.
        schedule: a `NoiseSchedule`.
        generator: draws t and ε.
        context: (B, L, D) text hidden states, or None.
        snr_gamma: None for the plain objective; a number γ weights each sample's
            error by min(SNR_t, γ) / SNR_t (Min-SNR, Hang et al. 2023): the nearly
            clean timesteps, which are easy, count less, so that training spends
            more of its effort on the noisy ones, where the layout is decided.
    """
    t = torch.randint(0, schedule.num_train_timesteps, (len(x0),), generator=generator)
    t = t.to(x0.device)
    noise = torch.randn(x0.shape, generator=generator).to(x0.device)
    x_t = schedule.add_noise(x0, noise, t)
    if snr_gamma is None:
        return F.mse_loss(unet(x_t, t, context), noise)
    errors = (unet(x_t, t, context) - noise).pow(2).mean(dim=(1, 2, 3))  # (B,)
    return (errors * min_snr_weight(schedule.snr(t).to(errors), snr_gamma)).mean()


def min_snr_weight(snr: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-γ loss weights for ε-prediction (Hang et al. 2023).

    min(SNR_t, γ) / SNR_t: 1 for the noisy timesteps (SNR_t ≤ γ), γ / SNR_t for
    the nearly clean ones, whose easy targets would otherwise dominate.

    Args:
        snr: (B,) the signal-to-noise ratio ᾱ_t / (1 - ᾱ_t) of each sample's t.
        gamma: γ, e.g. 5.
    Returns:
        (B,) weights in (0, 1].
    """
    return snr.clamp(max=gamma) / snr


def processes() -> PartialState:
    """Accelerate's view of this process among those `accelerate launch` started.

    `accelerate launch --multi_gpu` on a machine without GPUs runs its processes
    on the CPU (gloo) when ACCELERATE_USE_CPU=true, as an `Accelerator` reads it.
    """
    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))


def cpu_launch(script: list[str], count: int) -> tuple[list[str], dict]:
    """The command line that runs `python *script` as `count` processes on the CPU
    (`accelerate launch --multi_gpu`: torchrun and gloo), and the environment
    variables it needs; one process is plain `python *script`.

    Returns:
        (argv, {variable: value}) to add to the environment.
    """
    if count == 1:
        return [sys.executable, *script], {}
    port = free_port()  # for the rendezvous
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
                "--num_processes", str(count), "--num_machines", "1",
                "--mixed_precision", "no", "--dynamo_backend", "no",
                "--main_process_port", str(port)]  # fmt: skip
    return [*launcher, *script], {"ACCELERATE_USE_CPU": "true"}


def free_port() -> int:
    """A TCP port on this machine that nobody listens on now: where the processes
    of a launch meet (`accelerate launch --main_process_port`, `notebook_launcher(
    use_port=...)`), so that two launches at the same time do not collide."""
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        return free.getsockname()[1]
