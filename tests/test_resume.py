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


def train(kind, checkpoint=None, stop=None, saved_generators=None):
    """Train from the start or from `checkpoint`; `stop`: raise at that step;
    `saved_generators`: how many of the run's generators the checkpoint keeps."""
    model, ema, batches, loss_fn, generators = setup(kind)
    generators = generators[:saved_generators]
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
    with pytest.raises(Interrupted):
        train("loader", tmp_path / "run", stop=STOP, saved_generators=1)
    resumed, _, _, _ = train("loader", tmp_path / "run", saved_generators=1)
    assert not torch.equal(model[0].weight, resumed[0].weight)


def test_a_checkpoint_of_another_number_of_processes_is_refused(tmp_path):
    model, ema, batches, loss_fn, generators = setup("loader")
    fit(model, loss_fn, batches, 3, progress=False, checkpoint=tmp_path,
        checkpoint_every=3)  # fmt: skip
    state = torch.load(tmp_path / "rank-0.pt", weights_only=True)
    state["processes"] = 2
    torch.save(state, tmp_path / "rank-0.pt")
    with pytest.raises(ValueError, match="saved by 2 processes"):
        fit(model, loss_fn, batches, 6, progress=False, checkpoint=tmp_path)


# ----------------------------------------------------------------------------------
# `sdscratch train RECIPE --resume DIR`: the same through the command line


def manifest_of(folder):
    import json

    return json.loads((folder / "MANIFEST.json").read_text())


@pytest.mark.parametrize("data", ["scenes", "shards"])
def test_a_recipe_stopped_midway_resumes_from_the_cli_to_the_same_weights(
    data, tmp_path, monkeypatch
):
    """vae, on Shapes drawn by a DataLoader or streamed from shards (whose
    reader's shuffle the resumed run must redo too)."""
    import sdscratch.recipes.vae as vae_recipe
    from conftest import run_cli

    monkeypatch.setattr("sdscratch.recipes.common.CHECKPOINT_EVERY", 2)
    monkeypatch.setattr(vae_recipe, "VAE_SCALE_SCENES", 64)  # a quicker evaluation
    monkeypatch.setattr(vae_recipe, "VAE_VAL_SCENES", 64)
    loss, calls, stop = vae_recipe.vae_loss, [0], [None]

    def counted(*args):
        calls[0] += 1
        if calls[0] == stop[0]:
            raise Interrupted
        return loss(*args)

    monkeypatch.setattr(vae_recipe, "vae_loss", counted)
    options = ["train", "vae", "--steps", "5"]
    if data == "shards":
        shards = tmp_path / "shards"
        assert run_cli("data", "shards", "--out", shards, "--count", 2,
                       "--scenes", 200)[0] == 0  # fmt: skip
        options += ["--shards", shards]
    options += ["--out"]
    assert run_cli(*options, tmp_path / "whole")[0] == 0
    calls[0], stop[0] = 0, 5  # step 5 stops the run, after step 4's checkpoint
    with pytest.raises(Interrupted):
        run_cli(*options, tmp_path / "run")
    saved = tmp_path / "run.checkpoint"
    assert (saved / "rank-0.pt").exists() and not (tmp_path / "run").exists()
    calls[0], stop[0] = 0, None
    code, out, err = run_cli(*options, tmp_path / "run", "--resume", saved)
    assert code == 0, err
    assert calls[0] == 1  # it trained step 5 only
    whole, resumed = manifest_of(tmp_path / "whole"), manifest_of(tmp_path / "run")
    assert resumed["sha256"] == whole["sha256"]  # the same weights, bit for bit
    assert not saved.exists()  # a finished run deletes its checkpoint


def test_resume_without_a_usable_checkpoint_is_one_sentence_and_exit_2(tmp_path):
    import json

    from conftest import run_cli

    def refused(*args) -> str:
        code, out, err = run_cli("train", "vae", "--steps", "2", "--out",
                                 tmp_path / "out", *args)  # fmt: skip
        assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
        return err

    assert "no such checkpoint folder" in refused("--resume", tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    assert "is not the checkpoint of a" in refused("--resume", tmp_path / "empty")
    other = tmp_path / "other"
    other.mkdir()
    command = f"python -m sdscratch train ldm --seed 0 --out {tmp_path / 'x'}"
    (other / "run.json").write_text(json.dumps({"recipe": "ldm", "command": command}))
    err = refused("--resume", other / "run.json")
    assert "a checkpoint of the ldm recipe, not of vae" in err
    command = f"python -m sdscratch train vae --seed 1 --steps 2 --out {tmp_path}/out"
    (other / "run.json").write_text(json.dumps({"recipe": "vae", "command": command}))
    assert "resume it with the same options" in refused("--resume", other)


def test_a_broken_checkpoint_file_or_a_stopped_run_is_never_overwritten(tmp_path):
    import json

    from conftest import run_cli

    out, saved = tmp_path / "out", tmp_path / "out.checkpoint"
    saved.mkdir()
    command = f"python -m sdscratch train vae --seed 0 --steps 2 --out {out}"
    (saved / "run.json").write_text(json.dumps({"recipe": "vae", "command": command}))
    (saved / "rank-0.pt").write_bytes(b"not a checkpoint")
    code, _, err = run_cli("train", "vae", "--steps", "2", "--out", out)
    assert code == 2 and f"{saved} holds a stopped run" in err
    code, _, err = run_cli("train", "vae", "--steps", "2", "--out", out,
                           "--resume", saved / "rank-0.pt")  # fmt: skip
    assert code == 2 and err.count("\n") == 1 and "not a checkpoint fit can read" in err
    assert (saved / "rank-0.pt").read_bytes() == b"not a checkpoint"
    assert not out.exists()
