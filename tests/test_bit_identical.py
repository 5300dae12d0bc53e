"""A guard against unintended changes: the bundled models draw the same pictures.

Every case below renders a few images with a bundled checkpoint (text-to-image,
img2img and inpainting with shapes-ldm over three samplers; the pixel-space UNets;
the VAE's reconstruction) and compares them, byte for byte as uint8 pixels, with
PNGs saved in tests/data/bit_identical/ from the code as it was when they were made.
A refactoring that is meant to change nothing must leave them equal.

The pictures are not "right" answers, only yesterday's answers. When a model is
retrained, or a change is meant to alter what the models draw, regenerate them on
one thread, and say why in the commit:

    OMP_NUM_THREADS=1 python tests/test_bit_identical.py
"""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

DATA = Path(__file__).parent / "data" / "bit_identical"
PROMPTS = ["a big red circle on the left", "a blue square above a green triangle"]


def _ldm():
    from sdscratch.pipeline import StableDiffusion

    return StableDiffusion.from_pretrained("shapes-ldm")


def _ldm_text(sampler, karras, steps):
    def render():
        generator = torch.Generator().manual_seed(7)
        return _ldm()(
            PROMPTS, num_inference_steps=steps, guidance_scale=5.0, sampler=sampler,
            karras=karras, generator=generator, num_images_per_prompt=2,
            output_type="pt",
        )  # fmt: skip

    return render


def _scene_image():
    """A Shapes test scene, (1, 3, 32, 32) in [-1, 1]."""
    from sdscratch.shapes.data import Shapes

    return Shapes("test")[3][0][None]


def _ldm_img2img():
    generator = torch.Generator().manual_seed(3)
    return _ldm().img2img(
        PROMPTS, _scene_image(), 0.6, num_inference_steps=20, guidance_scale=7.5,
        generator=generator, output_type="pt",
    )  # fmt: skip


def _ldm_inpaint():
    mask = torch.zeros(1, 1, 32, 32)
    mask[..., :, 16:] = 1  # repaint the right half
    generator = torch.Generator().manual_seed(5)
    return _ldm().inpaint(
        PROMPTS, _scene_image(), mask, num_inference_steps=15, guidance_scale=7.5,
        sampler="euler", generator=generator, output_type="pt",
    )  # fmt: skip


def _pixel_unet(name):
    from sdscratch.checkpoint import load_component, resolve, verify
    from sdscratch.unet import UNet, UNetConfig

    root = resolve(name)
    verify(root)
    return root, load_component(root / "unet", UNet, UNetConfig)


def _pixel_uncond():
    from sdscratch.checkpoint import read_manifest
    from sdscratch.samplers import sample
    from sdscratch.schedules import NoiseSchedule

    root, unet = _pixel_unet("shapes-pixel-uncond")
    scale = read_manifest(root)["quality"]["pixel_scale"]  # it diffuses pixels × scale
    generator = torch.Generator().manual_seed(11)
    noise = torch.randn((4, 3, 32, 32), generator=generator)
    with torch.no_grad():
        x = sample(
            unet, noise, "ddpm", 10, NoiseSchedule.scaled_linear(), generator=generator
        )
    return (x / scale).clamp(-1, 1)


def _pixel_text():
    """Classifier-free guidance at 3 over shapes-clip's text encoder, DDIM 15."""
    from sdscratch.checkpoint import load_component, read_manifest
    from sdscratch.clip import TextEncoder, TextEncoderConfig
    from sdscratch.samplers import sample
    from sdscratch.schedules import NoiseSchedule
    from sdscratch.tokenizer import Tokenizer

    root, unet = _pixel_unet("shapes-pixel-text")
    tokenizer = Tokenizer.from_pretrained(root / "tokenizer")
    encoder = load_component(root / "text_encoder", TextEncoder, TextEncoderConfig)
    with torch.no_grad():
        hidden = encoder(tokenizer(PROMPTS + ["", ""]))  # (4, L, D)
        noise = torch.randn((2, 3, 32, 32), generator=torch.Generator().manual_seed(2))

        def eps_fn(x, t):
            both = unet(torch.cat([x, x]), torch.cat([t, t]), hidden)
            cond, uncond = both.chunk(2)
            return uncond + 3.0 * (cond - uncond)

        x = sample(eps_fn, noise, "ddim", 15, NoiseSchedule.scaled_linear())
    return x / read_manifest(root)["quality"]["pixel_scale"]  # pixels × scale


def _vae_reconstruction():
    from sdscratch.checkpoint import load_component, resolve, verify
    from sdscratch.shapes.data import Shapes
    from sdscratch.vae import VAE, VAEConfig

    root = resolve("shapes-vae")
    verify(root)
    vae = load_component(root / "vae", VAE, VAEConfig)
    images = Shapes("test").batch(range(4))[0]
    with torch.no_grad():
        return vae.decode(vae.encode(images).mode()).clamp(-1, 1)


CASES = {
    "ldm_ddim": _ldm_text("ddim", False, 20),
    "ldm_euler_ancestral": _ldm_text("euler_ancestral", False, 10),
    "ldm_dpmpp_2m_karras": _ldm_text("dpmpp_2m", True, 10),
    "ldm_img2img": _ldm_img2img,
    "ldm_inpaint": _ldm_inpaint,
    "pixel_uncond_ddpm": _pixel_uncond,
    "pixel_text_ddim": _pixel_text,
    "vae_reconstruction": _vae_reconstruction,
}


def render(name) -> np.ndarray:
    """The images of case `name` side by side, (H, W·B, 3) uint8, on one thread."""
    from sdscratch.viz import make_grid, to_uint8

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the saved pictures were made on one thread
    try:
        images = CASES[name]()  # (B, 3, H, W) in [-1, 1]
    finally:
        torch.set_num_threads(threads)
    return to_uint8(make_grid(images, ncols=len(images), pad=0)[None])[0]


@pytest.mark.parametrize("name", sorted(CASES))
def test_bundled_models_draw_what_they_drew(name):
    saved = np.asarray(Image.open(DATA / f"{name}.png").convert("RGB"))
    now = render(name)
    assert now.shape == saved.shape
    differ = int((now != saved).any(-1).sum())
    assert differ == 0, (
        f"{differ} of {now.shape[0] * now.shape[1]} pixels of {name} changed; if "
        f"that is meant, regenerate with `python tests/test_bit_identical.py`."
    )


if __name__ == "__main__":
    DATA.mkdir(parents=True, exist_ok=True)
    for case in sys.argv[1:] or sorted(CASES):
        Image.fromarray(render(case)).save(DATA / f"{case}.png", optimize=True)
        print(DATA / f"{case}.png")
