"""The ldm recipe, run short (`--steps 2`) on tiny random frozen parts in tmp_path.

The recipe's real run uses the bundled shapes-vae and shapes-clip; here tiny random
stand-ins (with manifests, as the recipe checks them) keep the test fast and
independent of the bundled checkpoints.
"""

import os

import pytest
import torch

from sdscratch import recipes
from sdscratch.checkpoint import read_manifest, save_component, verify, write_manifest
from sdscratch.clip import TextEncoder, TextEncoderConfig
from sdscratch.pipeline import StableDiffusion
from sdscratch.shapes.data import Shapes
from sdscratch.tokenizer import train_bpe
from sdscratch.vae import VAE, VAEConfig


@pytest.fixture
def tiny_parts(tmp_path, monkeypatch):
    """A random 32×32 -> 8×8×4 VAE and a random text encoder, each with a manifest."""
    captions = [Shapes().scene(i)[0] for i in range(200)]
    tokenizer = train_bpe(captions, vocab_size=600, context_length=32)
    torch.manual_seed(0)
    config = TextEncoderConfig(len(tokenizer), 32, 32, 64, 1, 2, "quick_gelu", 1e-5,
                               tokenizer.eos_id)  # fmt: skip
    clip, vae = tmp_path / "clip", tmp_path / "vae"
    save_component(TextEncoder(config), clip / "text_encoder", config)
    tokenizer.save_pretrained(clip / "tokenizer")
    vae_config = VAEConfig(block_out_channels=(8, 8, 8), norm_num_groups=4)
    save_component(VAE(vae_config), vae / "vae", vae_config)
    for root in (clip, vae):
        write_manifest(root, "a test's stand-in", 0, 0.0, {})
    monkeypatch.setitem(recipes.LDM_PARTS, "vae", str(vae))
    monkeypatch.setitem(recipes.LDM_PARTS, "clip", str(clip))
    return tmp_path


def test_ldm_recipe_short_run_writes_a_loadable_checkpoint(tiny_parts):
    out = tiny_parts / "ldm"
    manifest = recipes.run_recipe("ldm", out=out, steps=2)
    assert manifest["command"].endswith(f"train ldm --seed 0 --steps 2 --out {out}")
    quality = read_manifest(out)["quality"]
    assert quality["steps"] == 2 and quality["eval_images"] == 20
    # the figures are those of the checkpoint as stored, measured again here
    again = recipes.measure_ldm(StableDiffusion.from_pretrained(out), seed=0, n=20)
    for key in ("prompt_accuracy_one_object", "prompt_accuracy_two_objects"):
        assert quality[key] == again[key]
    assert quality["fid"] == pytest.approx(again["fid"], abs=0.011)
    cpu_bound = manifest["wall_time_seconds"] * os.cpu_count() + 1
    assert quality["cpu_seconds_training"] <= manifest["cpu_seconds"] <= cpu_bound
    verify(out)
    for name in ("vae", "text_encoder", "tokenizer"):  # copies of the frozen parts
        source = tiny_parts / ("vae" if name == "vae" else "clip") / name
        for file in source.iterdir():
            assert (out / name / file.name).read_bytes() == file.read_bytes()
    pipe = StableDiffusion.from_pretrained(out)
    images = pipe("a red circle", num_inference_steps=2,
                  generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert images[0].size == (32, 32)


def test_ldm_recipe_refuses_a_missing_part(tiny_parts, monkeypatch):
    monkeypatch.setitem(recipes.LDM_PARTS, "vae", str(tiny_parts / "missing"))
    with pytest.raises(ValueError, match="No checkpoint"):
        recipes.run_recipe("ldm", out=tiny_parts / "ldm", steps=2)


def test_ldm_recipe_trains_on_shards_of_own_images(tiny_parts, monkeypatch):
    """`--shards`: the UNet learns the latents and captions of the shards' images."""
    from PIL import Image

    import sdscratch.recipes.ldm as ldm
    from sdscratch.__main__ import main

    folder = tiny_parts / "mine"
    folder.mkdir()
    for i, colour in enumerate(["red", "blue", "yellow"]):
        Image.new("RGB", (40, 40), colour).save(folder / f"photo{i}.png")
        (folder / f"photo{i}.txt").write_text(f"a {colour} photo")
    shards = tiny_parts / "s"
    assert main(["data", "shards", "--images", str(folder), "--out", str(shards),
                 "--count", "3"]) == 0  # fmt: skip
    seen, encode = [], ldm.encode_batches

    def spy(vae, tokenizer, batches):
        batches = list(batches)
        seen.extend(caption for _, captions in batches for caption in captions)
        return encode(vae, tokenizer, batches)

    monkeypatch.setattr(ldm, "encode_batches", spy)
    manifest = recipes.run_recipe("ldm", tiny_parts / "ldm", steps=2, shards=shards)
    assert manifest["quality"]["shards_skipped"] == ""
    assert manifest["quality"]["training_scenes"] == len(seen) >= 2 * ldm.LDM_BATCH
    assert set(seen) == {"a red photo", "a blue photo", "a yellow photo"}
    StableDiffusion.from_pretrained(tiny_parts / "ldm")  # a loadable checkpoint
