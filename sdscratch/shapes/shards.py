"""Shapes scenes as webdataset shards (`sdscratch data shards`): PNG and caption."""

import io

from PIL import Image

from sdscratch.shapes.data import Shapes

CHUNK = 500  # scenes rendered together


def shapes_samples(count, split="train", size=32, seed=0):
    """The first `count` scenes of a split as (key, PNG bytes, "png", caption),
    for `sdscratch.shards.write_shards`.

    Args:
        seed: Shapes' seed, the family of scenes (the course's dataset: 0).
    """
    scenes = Shapes(split, size=size, seed=seed, length=count)
    for start in range(0, count, CHUNK):
        indices = range(start, min(start + CHUNK, count))
        images, captions, _ = scenes.batch(indices)  # (B, 3, H, W) in [-1, 1]
        pixels = ((images + 1) * 127.5).round().clamp(0, 255).byte()
        for i, image, caption in zip(indices, pixels.permute(0, 2, 3, 1), captions):
            png = io.BytesIO()
            Image.fromarray(image.numpy()).save(png, format="PNG")
            yield f"{split}-{seed}-{i:07d}", png.getvalue(), "png", caption
