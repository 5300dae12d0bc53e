"""Training data as webdataset tar shards: `sdscratch data shards` and ShardStream."""

import io
import json
import tarfile

import pytest
import torch
from PIL import Image

from sdscratch.__main__ import main
from sdscratch.shapes.data import Shapes
from sdscratch.shards import ShardError, ShardStream


def png(colour, size=(40, 24)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def add(tar, name, data: bytes):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def test_shapes_shards_stream_the_scenes_shapes_draws(tmp_path, capsys):
    assert main(["data", "shards", "--out", str(tmp_path / "s"), "--count", "2",
                 "--scenes", "20"]) == 0  # fmt: skip
    shards = sorted((tmp_path / "s").glob("*.tar"))
    assert len(shards) == 2
    names = tarfile.open(shards[0]).getnames()
    assert len(names) == 20 and names[:2] == [
        "train-0-0000000.png",
        "train-0-0000000.txt",
    ]
    images, captions, _ = Shapes("train").batch(range(20))
    stream = ShardStream(tmp_path / "s", batch_size=20, buffer=1)
    streamed, streamed_captions = next(iter(stream))
    assert streamed.shape == (20, 3, 32, 32)
    # the scenes of one shard, in some order: each is a Shapes scene, as PNG (8 bits)
    for image, caption in zip(streamed, streamed_captions):
        i = captions.index(caption)
        assert (image - images[i]).abs().max() <= 1 / 127.5 + 1e-6


def test_a_folder_of_own_images_becomes_shards_and_streams(tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    for name, colour in [("cat", "red"), ("dog", "blue"), ("sun", "yellow")]:
        (folder / f"{name}.png").write_bytes(png(colour))
        (folder / f"{name}.txt").write_text(f"a {colour} {name}\n")
    assert main(["data", "shards", "--images", str(folder), "--out",
                 str(tmp_path / "s"), "--count", "1"]) == 0  # fmt: skip
    stream = ShardStream(tmp_path / "s", batch_size=3, size=16, buffer=1)
    batch = next(iter(stream))  # one shard, read in order
    assert batch[0].shape == (3, 3, 16, 16)
    assert batch[1] == ["a red cat", "a blue dog", "a yellow sun"]
    red = batch[0][0]
    assert torch.allclose(red[:, 8, 8], torch.tensor([1.0, -1.0, -1.0]))


def test_bad_input_on_the_command_line_is_one_sentence_naming_the_file(
    tmp_path, capsys
):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "cat.png").write_bytes(png("red"))
    (folder / "dog.png").write_bytes(png("blue"))
    (folder / "cat.txt").write_text("a red cat")
    out = tmp_path / "s"
    assert main(["data", "shards", "--images", str(folder), "--out", str(out),
                 "--count", "1"]) == 2  # fmt: skip
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "dog.png has no caption" in error
    assert not out.exists() or not any(out.iterdir())
    (folder / "dog.txt").write_text("a blue dog")
    (folder / "broken.png").write_bytes(b"not a png")
    (folder / "broken.txt").write_text("nothing")
    assert main(["data", "shards", "--images", str(folder), "--out", str(out),
                 "--count", "1"]) == 2  # fmt: skip
    assert "broken.png" in capsys.readouterr().err
    (folder / "broken.png").unlink()
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "work.txt").write_text("mine")
    assert main(["data", "shards", "--images", str(folder), "--out", str(kept),
                 "--count", "1"]) == 2  # fmt: skip
    assert (kept / "work.txt").read_text() == "mine"  # nothing overwritten
    assert main(["data", "shards", "--images", str(folder), "--out", str(out),
                 "--count", "5"]) == 2  # fmt: skip
    assert "2 samples cannot fill 5 shards" in capsys.readouterr().err
    assert not list(out.glob("*"))  # no half-written shard stays


def test_an_empty_shard_folder_is_refused(tmp_path):
    with pytest.raises(ShardError, match="holds no .tar shards"):
        ShardStream(tmp_path, batch_size=2)


def test_unusable_samples_are_skipped_named_and_counted(tmp_path):
    with tarfile.open(tmp_path / "shard-000000.tar", "w") as tar:
        add(tar, "good.png", png("red"))
        add(tar, "good.txt", b"a red square")
        add(tar, "broken.png", b"garbage")
        add(tar, "broken.txt", b"nothing")
        add(tar, "silent.png", png("blue"))  # no caption
    stream = ShardStream(tmp_path, batch_size=4, buffer=1)
    with pytest.warns(UserWarning) as warned:
        images, captions = next(iter(stream))
    assert captions == ["a red square"] * 4  # only the usable sample, resampled
    messages = " ".join(str(w.message) for w in warned)
    assert (
        "broken.png does not open" in messages and "silent has no caption" in messages
    )
    skipped = [w for w in warned if str(w.message).startswith("skipped ")]
    assert len(skipped) == 2  # once per file, however often it comes round
    assert stream.report().startswith("skipped ") and "2 different" in stream.report()


def test_shards_with_nothing_usable_stop_instead_of_hanging(tmp_path, monkeypatch):
    monkeypatch.setattr("sdscratch.shards.MAX_SKIPS_IN_A_ROW", 50)
    with tarfile.open(tmp_path / "shard-000000.tar", "w") as tar:
        add(tar, "broken.png", b"garbage")
        add(tar, "broken.txt", b"nothing")
    (tmp_path / "shard-000001.tar").write_bytes(b"truncated" * 100)
    with pytest.warns(UserWarning), pytest.raises(ShardError, match="unusable"):
        next(iter(ShardStream(tmp_path, batch_size=2)))


def test_two_processes_stream_one_shard_with_two_workers_each(tmp_path):
    """Fewer shards (1) than processes × workers (4): no hang, equal batches."""
    from test_scaling import WORKER

    from sdscratch.train import cpu_launch

    assert main(["data", "shards", "--out", str(tmp_path / "s"), "--count", "1",
                 "--scenes", "40"]) == 0  # fmt: skip
    import os
    import subprocess

    script = [str(WORKER), "--batch", "8", "--steps", "6", "--workers", "2",
              "--shards", str(tmp_path / "s"),
              "--out", str(tmp_path / "run")]  # fmt: skip
    command, launch_env = cpu_launch(script, 2)
    env = os.environ | {"OMP_NUM_THREADS": "1"} | launch_env
    result = subprocess.run(command, env=env, capture_output=True, text=True,
                            timeout=180)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    for rank in (0, 1):
        report = json.loads((tmp_path / f"run.rank{rank}.json").read_text())
        assert report["sizes"] == [8] * 6


def test_the_vae_recipe_trains_on_a_folder_of_own_images(tmp_path, own_shards):
    from sdscratch.recipes import run_recipe

    manifest = run_recipe("vae", tmp_path / "vae", steps=2, shards=own_shards)
    assert (tmp_path / "vae" / "vae").is_dir()
    assert manifest["quality"]["shards_skipped"] == ""  # nothing was unusable
    assert manifest["command"].endswith(f"--shards {tmp_path / 's'}")
    # the command line: the same run, and a recipe that cannot is one sentence
    assert main(["train", "vae", "--steps", "2", "--out", str(tmp_path / "cli"),
                 "--shards", str(tmp_path / "s")]) == 0  # fmt: skip
    assert (tmp_path / "cli" / "vae").is_dir()
    assert main(["train", "judge", "--steps", "2", "--out", str(tmp_path / "j"),
                 "--shards", str(tmp_path / "s")]) == 2  # fmt: skip
    assert not (tmp_path / "j").exists()
    with pytest.raises(ValueError, match="judge recipe cannot train on shards"):
        run_recipe("judge", tmp_path / "judge", steps=2, shards=tmp_path / "s")


@pytest.mark.parametrize(
    "count, processes, workers", [(11, 2, 3), (13, 3, 2), (3, 2, 2)]
)
def test_split_shards_is_webdatasets_split_by_node_then_by_worker(
    count, processes, workers, monkeypatch
):
    import webdataset as wds

    from sdscratch.shards import split_shards

    shards = [f"shard-{i:06d}.tar" for i in range(count)]
    seen = []
    for rank in range(processes):
        for worker in range(workers):
            monkeypatch.setenv("RANK", str(rank))
            monkeypatch.setenv("WORLD_SIZE", str(processes))
            monkeypatch.setenv("WORKER", str(worker))
            monkeypatch.setenv("NUM_WORKERS", str(workers))
            theirs = list(wds.split_by_worker(wds.split_by_node(iter(shards))))
            assert split_shards(shards, rank, processes, worker, workers) == theirs
            seen += theirs
    assert sorted(seen) == shards  # every shard read once, by one worker


@pytest.fixture
def own_shards(tmp_path):
    """Two shards of four one-colour images with captions, as a learner makes them."""
    folder = tmp_path / "mine"
    folder.mkdir()
    for i, colour in enumerate(["red", "blue", "yellow", "green"]):
        (folder / f"photo{i}.png").write_bytes(png(colour, size=(48, 64)))
        (folder / f"photo{i}.txt").write_text(f"a {colour} photo")
    assert main(["data", "shards", "--images", str(folder), "--out",
                 str(tmp_path / "s"), "--count", "2"]) == 0  # fmt: skip
    return tmp_path / "s"


def one_colour(images) -> bool:
    """Every image (B, 3, H, W) is a single colour: none is a Shapes scene."""
    flat = images.flatten(2)  # (B, 3, H·W)
    return bool((flat.amax(-1) - flat.amin(-1)).max() < 0.05)


@pytest.mark.parametrize("name", ["pixel-uncond", "pixel-text"])
def test_the_pixel_recipes_train_on_shards(name, own_shards, tmp_path, monkeypatch):
    import sdscratch.recipes.pixel as pixel
    from sdscratch.recipes import run_recipe

    trained_on, train = [], pixel._train_pixel_unet

    def spy(unet, schedule, images, contexts, *args, **kwargs):
        trained_on.append(images)
        return train(unet, schedule, images, contexts, *args, **kwargs)

    monkeypatch.setattr(pixel, "_train_pixel_unet", spy)
    monkeypatch.setattr(pixel, "_pixel_quality", lambda *a, **k: ({}, None))
    monkeypatch.setattr(pixel, "_guided_quality", lambda *a, **k: {})
    manifest = run_recipe(name, tmp_path / "out", steps=2, shards=own_shards)
    assert manifest["quality"]["shards_skipped"] == ""
    assert manifest["command"].endswith(f"--shards {own_shards}")
    assert (tmp_path / "out" / "unet").is_dir()
    (images,) = trained_on
    assert len(images) >= 2 * pixel.PIXEL_BATCH and one_colour(images)
    assert not one_colour(Shapes("train").batch(range(8))[0])  # the check can fail


def test_clip_and_judge_refuse_shards_in_one_sentence(own_shards, tmp_path, capsys):
    for name in ("clip", "judge"):
        code = main(["train", name, "--steps", "2", "--out", str(tmp_path / name),
                     "--shards", str(own_shards)])  # fmt: skip
        err = capsys.readouterr().err
        assert code == 2 and f"The {name} recipe cannot train on shards." in err
        assert not (tmp_path / name).exists()
