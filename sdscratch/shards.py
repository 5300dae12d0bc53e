"""Training data as webdataset tar shards: written once, streamed by every process.

A shard is a plain tar file; a sample is the files that share a name, here
`<key>.png` (or .jpg, .webp) and `<key>.txt`, its caption: the format LAION and
other web-scale image-text sets are published in. Training streams them: each
process (and each DataLoader worker) draws shards at random, with replacement, so
that no process runs out of data before another, however few shards there are.

Bad input never hangs a run: a folder without shards stops it with one sentence; a
sample whose image does not open, that has no caption, or a tar file that breaks
off is skipped with one warning naming the file, counted, and reported at the end.
"""

import io
import random
import warnings
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from PIL import Image

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
SHARD_NAME = "shard-{index:06d}.tar"
MAX_SKIPS_IN_A_ROW = 1000  # skipped samples in a row that mean no sample is usable


class ShardError(ValueError):
    """Shards that cannot be written or read (the CLI prints it, exit code 2)."""


def write_shards(samples, out, count) -> list[Path]:
    """Write `samples` round-robin into `count` tar shards in the new folder `out`.

    Args:
        samples: (key, image bytes, image suffix such as "png", caption) tuples.
        out: a folder that does not exist or is empty (nothing is overwritten).
        count: number of shards (at most the number of samples).
    Returns:
        the shard files, each written under a temporary name and renamed when full.
    """
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ShardError(
            f"{out} exists and is not an empty folder; choose another --out."
        )
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / SHARD_NAME.format(index=i) for i in range(count)]
    writers = [wds.TarWriter(str(path.with_suffix(".tar.part"))) for path in paths]
    written = 0
    try:
        for written, (key, data, suffix, caption) in enumerate(samples, start=1):
            sample = {"__key__": key, suffix: data, "txt": caption}
            writers[(written - 1) % count].write(sample)
        for writer in writers:
            writer.close()
        if written < count:
            raise ShardError(f"{written} samples cannot fill {count} shards.")
    except BaseException:  # also Ctrl-C: no half-written shard stays behind
        for path in paths:
            path.with_suffix(".tar.part").unlink(missing_ok=True)
        raise
    for path in paths:
        path.with_suffix(".tar.part").rename(path)
    return paths


def folder_samples(folder):
    """The learner's own images and their captions, checked before any is written.

    Every image in `folder` (IMAGE_SUFFIXES) needs a caption in a text file of the
    same name: `cat.png` and `cat.txt`.

    Returns:
        a list of (key, image bytes, suffix, caption), sorted by file name.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ShardError(f"--images {folder}: no such folder.")
    images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise ShardError(f"{folder} holds no images ({', '.join(IMAGE_SUFFIXES)}).")
    samples = []
    for path in images:
        caption = path.with_suffix(".txt")
        if not caption.is_file():
            raise ShardError(f"{path} has no caption: write it into {caption.name}.")
        try:
            with Image.open(path) as image:
                image.verify()
        except Exception as error:  # PIL raises many kinds
            raise ShardError(
                f"{path} is not an image PIL can open ({error})."
            ) from None
        suffix = path.suffix.lower().lstrip(".")
        text = caption.read_text(encoding="utf-8").strip()
        samples.append((path.stem, path.read_bytes(), suffix, text))
    return samples


def shard_files(folder) -> list[str]:
    """The .tar shards of `folder`, sorted, or one sentence if there are none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ShardError(f"{folder}: no such folder of shards.")
    shards = sorted(str(path) for path in folder.glob("*.tar"))
    if not shards:
        raise ShardError(
            f"{folder} holds no .tar shards; write some with `sdscratch data shards`."
        )
    return shards


def split_shards(shards, rank, processes, worker, workers) -> list:
    """The shards one DataLoader worker of one process reads when the shards are
    dealt out without replacement: by process first, then by worker (webdataset's
    `split_by_node`, then `split_by_worker`). With fewer shards than processes ×
    workers some get none, and their process runs out of batches before the others:
    why `ShardStream` draws with replacement instead.

    Args:
        shards: every shard, in one order that all processes agree on.
        rank: this process's index among `processes`.
        worker: this worker's index among the process's `workers` (1: no workers).
    Returns:
        shards[rank::processes][worker::workers]: may be empty.
    """
    return list(shards)[rank::processes][worker::workers]


class SkippedSample(Exception):
    """A sample that cannot be used; its message names the shard and the file."""


class ShardStream:
    """Endless batches from the shards of a folder, for `sdscratch.train.fit`.

    Each process, and each of its DataLoader workers, draws shards at random with
    replacement (webdataset's ResampledShards, seeded by `seed`, the process's rank
    and the worker's number), reads their samples through a shuffle buffer and
    batches them: every process gets as many full batches as it asks for.

    Args:
        folder: a folder of .tar shards (`write_shards`).
        batch_size: images per batch, per process.
        size: side of the square images the batches hold (resized, centre crop).
        seed: seeds the shard draws and the shuffle.
        workers: DataLoader worker processes per process (0: read in this one).
    Yields:
        (images (B, 3, size, size) in [-1, 1], captions: list of B str).
    """

    def __init__(self, folder, batch_size, size=32, seed=0, workers=0, buffer=500):
        self.folder, self.size = Path(folder), size
        self.shards = shard_files(folder)
        self.skipped = {}  # what was skipped (shard: file, why) -> times
        self.in_a_row = 0
        rank = int(wds.utils.pytorch_worker_info()[0])
        self.pipeline = wds.DataPipeline(
            wds.ResampledShards(self.shards, seed=seed, deterministic=True),
            wds.tarfile_to_samples(handler=self.skip),
            wds.shuffle(
                buffer, initial=min(buffer, 100), rng=random.Random(f"{seed}-{rank}")
            ),  # fmt: skip
            wds.map(self.decode, handler=self.skip),
            wds.batched(batch_size, collation_fn=collate, partial=False),
        )
        self.loader = self.pipeline
        if workers:
            self.loader = torch.utils.data.DataLoader(
                self.pipeline, batch_size=None, num_workers=workers
            )

    def __iter__(self):
        return iter(self.loader)

    def decode(self, sample) -> tuple[torch.Tensor, str]:
        """A sample's image, (3, size, size) in [-1, 1], and its caption."""
        where = f"{sample['__url__']}: {sample['__key__']}"
        images = [key for key in sample if "." + key in IMAGE_SUFFIXES]
        if "txt" not in sample:
            raise SkippedSample(f"{where} has no caption (.txt)")
        if not images:
            raise SkippedSample(f"{where} has no image")
        try:
            image = Image.open(io.BytesIO(sample[images[0]])).convert("RGB")
        except Exception:  # PIL raises many kinds
            raise SkippedSample(f"{where}.{images[0]} does not open as an image")
        self.in_a_row = 0
        return to_tensor(image, self.size), sample["txt"].decode("utf-8").strip()

    def skip(self, error) -> bool:
        """webdataset's error handler: warn once per file, count, go on (True);
        stop with ShardError after MAX_SKIPS_IN_A_ROW unusable samples in a row."""
        what = str(error)
        if not isinstance(error, SkippedSample):
            shard = next((a for a in error.args if str(a).endswith(".tar")), "a shard")
            what = f"{shard}: {error.args[0] if error.args else type(error).__name__}"
        if what not in self.skipped:
            warnings.warn(f"skipped {what}", stacklevel=2)
        self.skipped[what] = self.skipped.get(what, 0) + 1
        self.in_a_row += 1
        if self.in_a_row >= MAX_SKIPS_IN_A_ROW:
            raise ShardError(
                f"The last {self.in_a_row} samples read from {self.folder} were "
                f"unusable, e.g. {what}."
            )
        return True

    def report(self) -> str:
        """One sentence: what this process skipped (empty if nothing)."""
        if not self.skipped:
            return ""
        return (
            f"skipped {sum(self.skipped.values())} unusable samples "
            f"({len(self.skipped)} different) in {self.folder}."
        )


def to_tensor(image: Image.Image, size: int) -> torch.Tensor:
    """A PIL image, centre-cropped to a square and resized: (3, size, size) in
    [-1, 1]."""
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    image = image.crop((left, top, left + side, top + side))
    if side != size:
        image = image.resize((size, size), Image.Resampling.BICUBIC)
    pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy())  # (H, W, 3)
    return pixels.permute(2, 0, 1).float() / 127.5 - 1


def collate(samples) -> tuple[torch.Tensor, list[str]]:
    """[(image (3, H, W), caption)] -> (images (B, 3, H, W), captions)."""
    images, captions = zip(*samples)
    return torch.stack(images), list(captions)
