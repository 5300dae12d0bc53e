"""StableDiffusion: against diffusers' pipelines, saving and loading, bad input.

Every test builds tiny random components (no trained checkpoint needed). The parity
tests build diffusers' and transformers' models from configs, port their weights
into ours, and run diffusers' own StableDiffusionPipeline / Img2ImgPipeline next to
ours with the same generator seed.
"""

import diffusers
import pytest
import torch
from diffusers import (
    AutoencoderKL,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from PIL import Image
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from conftest import diffusers_of, randomise
from sdscratch.checkpoint import CheckpointError, write_manifest
from sdscratch.pipeline import (
    StableDiffusion,
    classifier_free_guidance,
    rescale_guidance,
)
from sdscratch.port import (
    text_encoder_from_transformers,
    unet_from_diffusers,
    vae_from_diffusers,
)
from sdscratch.samplers import SAMPLERS, noise_levels
from sdscratch.schedules import NoiseSchedule
from sdscratch.shapes.data import Shapes
from sdscratch.tokenizer import train_bpe
from sdscratch.viz import to_pil

PROMPTS = ["a small red circle on the left", "a big blue star above a green cross"]
SIZE = 16  # pixels; the tiny VAE halves it twice: 4×4 latents
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """diffusers / transformers parts, random, and a tokenizer folder for both."""
    folder = tmp_path_factory.mktemp("tokenizer")
    captions = [Shapes("train").scene(i)[0] for i in range(300)]
    train_bpe(captions, vocab_size=600, context_length=16).save_pretrained(folder)
    tokenizer = CLIPTokenizer.from_pretrained(folder)
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer), max_position_embeddings=16, hidden_size=32,
            intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            eos_token_id=tokenizer.eos_token_id,
        )
    )  # fmt: skip
    vae = AutoencoderKL(
        block_out_channels=(8, 16, 16), layers_per_block=1, norm_num_groups=4,
        down_block_types=("DownEncoderBlock2D",) * 3, scaling_factor=0.7,
        up_block_types=("UpDecoderBlock2D",) * 3, sample_size=SIZE,
    )  # fmt: skip
    unet = UNet2DConditionModel(
        sample_size=SIZE // 4, in_channels=4, out_channels=4,
        block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, attention_head_dim=4,
    )  # fmt: skip
    parts = dict(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, unet=unet)
    for seed, name in enumerate(("text_encoder", "vae", "unet")):
        randomise(parts[name], seed + 1)
    return parts | {"folder": folder}


@pytest.fixture(scope="module")
def pipe(references):
    """Our pipeline with the references' weights, ported."""
    from sdscratch.tokenizer import Tokenizer

    return StableDiffusion(
        unet_from_diffusers(references["unet"]),
        vae_from_diffusers(references["vae"]),
        text_encoder_from_transformers(references["text_encoder"]),
        Tokenizer.from_pretrained(references["folder"]),
    )


def reference_pipeline(references, cls=StableDiffusionPipeline, sampler="ddim"):
    """diffusers' pipeline `cls` with the same models and `sampler`'s scheduler."""
    scheduler = getattr(diffusers, SAMPLERS[sampler].diffusers_class)
    sd15 = dict(  # SD v1.5's scheduler config
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
        clip_sample=False, set_alpha_to_one=False, steps_offset=1,
    )  # fmt: skip
    reference = cls(
        vae=references["vae"],
        text_encoder=references["text_encoder"],
        tokenizer=references["tokenizer"],
        unet=references["unet"],
        scheduler=scheduler.from_config(sd15),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    reference.set_progress_bar_config(disable=True)
    return reference


def as_pixels(images: torch.Tensor) -> torch.Tensor:
    """Ours, in [-1, 1] -> diffusers' output_type="pt", in [0, 1]."""
    return (images / 2 + 0.5).clamp(0, 1)


def test_text_to_image_equals_diffusers(pipe, references):
    options = dict(num_inference_steps=6, guidance_scale=7.5, num_images_per_prompt=2)
    ours = pipe(
        PROMPTS,
        negative_prompt=["a purple square", ""],
        generator=torch.Generator().manual_seed(1024),
        output_type="pt",
        **options,
    )
    expected = reference_pipeline(references)(
        PROMPTS,
        negative_prompt=["a purple square", ""],
        generator=torch.Generator().manual_seed(1024),
        output_type="pt",
        **options,
    ).images
    assert ours.shape == expected.shape == (4, 3, SIZE, SIZE)
    assert (as_pixels(ours) - expected).abs().max() <= TOLERANCE
    assert (ours[0] - ours[1]).abs().max() > 0.01  # two different images per prompt


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_every_sampler_equals_diffusers_with_its_scheduler(pipe, references, sampler):
    """The registry's diffusers scheduler in diffusers' pipeline; the stochastic
    samplers (ddpm, euler_ancestral) draw their noise as diffusers does."""
    generator = torch.Generator().manual_seed(7)
    ours = pipe(PROMPTS[0], num_inference_steps=5, sampler=sampler,
                generator=generator, output_type="pt")  # fmt: skip
    reference = reference_pipeline(references, sampler=sampler)
    expected = reference(PROMPTS[0], num_inference_steps=5, output_type="pt",
                         generator=torch.Generator().manual_seed(7)).images  # fmt: skip
    assert (as_pixels(ours) - expected).abs().max() <= TOLERANCE


@pytest.mark.filterwarnings("ignore:You have passed 2 text prompts")
def test_img2img_equals_diffusers(pipe, references):
    image = Shapes("val", size=SIZE)[0][0][None]  # (1, 3, 16, 16) in [-1, 1]
    options = dict(strength=0.6, num_inference_steps=10, output_type="pt")
    ours = pipe.img2img(PROMPTS, image, generator=torch.Generator().manual_seed(3),
                        **options)  # fmt: skip
    reference = reference_pipeline(references, cls=StableDiffusionImg2ImgPipeline)
    expected = reference(PROMPTS, image=as_pixels(image), **options,
                         generator=torch.Generator().manual_seed(3)).images  # fmt: skip
    assert (as_pixels(ours) - expected).abs().max() <= TOLERANCE


def inpaint_both(pipe, references, prompts, mask, seed, their_mask=None, **options):
    """Final latents of our inpaint and of diffusers' StableDiffusionInpaintPipeline
    (4-channel UNet; given `their_mask` if not None) on a Shapes image, and the
    first latents each UNet saw."""
    image = Shapes("val", size=SIZE)[4][0][None]  # (1, 3, 16, 16) in [-1, 1]
    reference = reference_pipeline(references, cls=StableDiffusionInpaintPipeline)
    first = []  # ours, then diffusers': the first latents (the UNet's input's half)

    def keep_first(count):
        def hook(module, args):
            if len(first) < count:
                first.append(args[0].chunk(2)[0])

        return hook

    hooks = [unet.register_forward_pre_hook(keep_first(count))
             for count, unet in ((1, pipe.unet), (2, references["unet"]))]  # fmt: skip
    try:
        ours = pipe.inpaint(
            prompts,
            image,
            mask,
            output_type="latent",
            generator=torch.Generator().manual_seed(seed),
            **options,
        )
        their_mask = mask if their_mask is None else their_mask
        theirs = reference(prompts, image=as_pixels(image), mask_image=their_mask,
                           height=SIZE, width=SIZE, output_type="latent",
                           generator=torch.Generator().manual_seed(seed),
                           **options).images  # fmt: skip
    finally:
        for hook in hooks:
            hook.remove()
    return ours, theirs, image, first


@pytest.mark.filterwarnings("ignore:You have passed 2 text prompts")
@pytest.mark.parametrize("strength", [0.7, 0.4])
def test_inpainting_equals_diffusers(pipe, references, strength):
    """diffusers' StableDiffusionInpaintPipeline with a 4-channel UNet blends the
    latents the same way: after each step, the kept part is the image's latent
    noised to the next step's level (clean after the last step). Compared on the
    final latents; diffusers pastes no pixels back (ours does, at the end)."""
    mask = torch.zeros(1, 1, SIZE, SIZE)
    mask[..., 4:12, :8] = 1  # whole 4×4-pixel latent cells
    options = dict(strength=strength, num_inference_steps=8, guidance_scale=5.0)
    ours, theirs, image, _ = inpaint_both(pipe, references, PROMPTS, mask, 3, **options)
    assert ours.shape == theirs.shape == (2, 4, 4, 4)
    assert (ours - theirs).abs().max() <= 1e-4
    kept = pipe.encode_images(image, torch.Generator().manual_seed(3))
    assert (ours - kept).abs()[..., :1, :].max() <= 1e-4  # outside: the image's
    assert (ours - kept).abs()[..., 1:3, :2].max() > 0.01  # inside: repainted


def test_inpainting_at_strength_1_starts_where_img2img_does_not_from_noise(
    pipe, references
):
    """The first difference from diffusers: at strength 1, diffusers' inpainting
    starts from pure noise; ours, as img2img (ours and diffusers') at strength 1,
    from the image's latent noised to the first step's level, √ᾱ z + √(1-ᾱ) ε,
    which keeps a trace of the image (√ᾱ = 0.13 at the first of 8 DDIM steps)."""
    mask = torch.zeros(1, 1, SIZE, SIZE)
    mask[..., 4:12, :8] = 1
    options = dict(strength=1.0, num_inference_steps=8, guidance_scale=5.0)
    ours, theirs, image, first = inpaint_both(pipe, references, PROMPTS[0], mask, 3,
                                              **options)  # fmt: skip
    latent = pipe.encode_images(image, torch.Generator().manual_seed(3))
    abar = noise_levels("ddim", 8, pipe.schedule).alphas_cumprod[0]  # t = 876
    expected = abar.sqrt() * latent + (1 - abar).sqrt() * first[1]  # ε: diffusers'
    assert (first[0] - expected).abs().max() <= 1e-5
    assert (ours - theirs).abs().max() > 0.01


def test_inpainting_mask_cells_are_the_max_of_their_pixels_not_nearest(
    pipe, references
):
    """The second difference: a latent cell that a mask covers in part. diffusers
    resizes the mask to the latents with nearest-neighbour (a cell takes one of its
    pixels); ours takes the cell's largest value (max-pooling), so a cell is
    repainted when any of its pixels is. With the mask widened to whole cells, the
    two agree."""
    mask = torch.zeros(1, 1, SIZE, SIZE)
    mask[..., 6:10, 2:7] = 1  # cells covered in part
    widened = torch.nn.functional.max_pool2d(mask, 4).repeat_interleave(4, -1)
    widened = widened.repeat_interleave(4, -2)  # (1, 1, 16, 16), whole cells
    options = dict(strength=0.7, num_inference_steps=6, guidance_scale=5.0)
    ours, theirs, _, _ = inpaint_both(pipe, references, PROMPTS[0], mask, 5,
                                      their_mask=widened, **options)  # fmt: skip
    assert (ours - theirs).abs().max() <= 1e-4  # theirs given whole cells: the same
    ours, theirs, _, _ = inpaint_both(pipe, references, PROMPTS[0], mask, 5,
                                      **options)  # fmt: skip
    assert (ours - theirs).abs().max() > 0.01


def test_guidance_is_the_cfg_formula(pipe):
    context, uncond = pipe.encode_prompt(PROMPTS, ["", ""])
    x, t = torch.randn(2, 4, 4, 4), torch.tensor([500, 500])
    with torch.no_grad():
        eps_text, eps_uncond = pipe.unet(x, t, context), pipe.unet(x, t, uncond)
        for w in (0.0, 1.0, 7.5):
            guided = pipe.guided_noise(context, uncond, w)(x, t)
            expected = eps_uncond + w * (eps_text - eps_uncond)
            assert torch.allclose(guided, expected, atol=TOLERANCE)  # batch of 2B
    assert (eps_text - eps_uncond).abs().max() > 1e-3  # the prompt matters


def test_guidance_rescale_equals_diffusers_rescale_noise_cfg(pipe):
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import (
        rescale_noise_cfg,
    )

    context, uncond = pipe.encode_prompt(PROMPTS, ["", ""])
    x, t = torch.randn(2, 4, 4, 4), torch.tensor([500, 500])
    with torch.no_grad():
        eps_text = pipe.unet(x, t, context)
        guided = classifier_free_guidance(pipe.unet, context, uncond, 7.5)(x, t)
        for phi in (0.0, 0.7, 1.0):
            ours = classifier_free_guidance(pipe.unet, context, uncond, 7.5, phi)(x, t)
            theirs = rescale_noise_cfg(guided, eps_text, guidance_rescale=phi)
            assert torch.allclose(ours, theirs, atol=TOLERANCE)
    assert (rescale_guidance(guided, eps_text, 0.7) - guided).abs().max() > 1e-3


def test_guidance_rescale_option_equals_diffusers_pipeline(bundled):
    reference = diffusers_of(bundled)
    prompts = ["a large red circle above a small blue square", "a small yellow star"]
    options = dict(guidance_scale=12.0, num_inference_steps=4, output_type="pt")
    images = {}
    for phi in (0.0, 0.7):
        options["guidance_rescale"] = phi
        ours = bundled(prompts, generator=torch.Generator().manual_seed(7), **options)
        theirs = reference(
            prompts, generator=torch.Generator().manual_seed(7), **options
        ).images
        assert (as_pixels(ours) - theirs).abs().max() <= 1e-4
        images[phi] = ours
    assert (images[0.7] - images[0.0]).abs().max() > 0.05  # the option matters


def test_same_seed_gives_bit_identical_images_and_another_seed_does_not(pipe):
    def run(seed):
        generator = torch.Generator().manual_seed(seed)
        return pipe(PROMPTS, num_inference_steps=4, generator=generator)

    first, again, other = run(1024), run(1024), run(1025)
    assert len(first) == 2 and all(isinstance(i, Image.Image) for i in first)
    assert first[0].size == (SIZE, SIZE)
    assert [i.tobytes() for i in first] == [i.tobytes() for i in again]
    assert first[0].tobytes() != other[0].tobytes()


def test_saved_pipeline_loads_and_gives_the_same_images(pipe, tmp_path):
    pipe.save_pretrained(tmp_path)
    write_manifest(tmp_path, "test", 0, 0.0, {})
    loaded = StableDiffusion.from_pretrained(tmp_path)
    assert isinstance(loaded.schedule, NoiseSchedule)
    assert loaded.schedule.name == "scaled_linear"

    def run(model):
        return model(PROMPTS[0], num_inference_steps=3, output_type="latent",
                     generator=torch.Generator().manual_seed(0))  # fmt: skip

    assert torch.equal(run(pipe), run(loaded))


def test_damaged_checkpoint_is_refused(pipe, tmp_path):
    pipe.save_pretrained(tmp_path)
    write_manifest(tmp_path, "python -m sdscratch train ldm", 0, 0.0, {})
    weights = tmp_path / "unet" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + bytes(8))
    with pytest.raises(CheckpointError, match="does not match its sha256"):
        StableDiffusion.from_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="No checkpoint"):
        StableDiffusion.from_pretrained(tmp_path / "nowhere")


def test_callback_sees_every_step_and_can_replace_the_latents(pipe):
    seen = []
    pipe(PROMPTS[0], num_inference_steps=5, callback=lambda i, *_: seen.append(i))
    assert seen == [0, 1, 2, 3, 4]
    zeros = pipe(PROMPTS[0], num_inference_steps=2, output_type="latent",
                 callback=lambda i, t, x, x0: torch.zeros_like(x))  # fmt: skip
    assert torch.equal(zeros, torch.zeros(1, 4, 4, 4))


def test_img2img_strength_zero_keeps_the_image_and_one_does_not(pipe):
    image = Shapes("val", size=SIZE)[1][0][None]
    kept = pipe.img2img(PROMPTS[0], image, strength=0.0, output_type="pt",
                        generator=torch.Generator().manual_seed(0))  # fmt: skip
    latent = pipe.encode_images(image, torch.Generator().manual_seed(0))
    assert torch.equal(kept, pipe.decode_latents(latent))
    changed = pipe.img2img(PROMPTS[0], to_pil(image), strength=1.0, output_type="pt")
    assert (changed - kept).abs().max() > 0.01


def test_inpainting_keeps_the_pixels_outside_the_mask(pipe):
    image = Shapes("val", size=SIZE)[2][0][None]
    mask = torch.zeros(1, 1, SIZE, SIZE)
    mask[..., :, : SIZE // 2] = 1  # repaint the left half
    out = pipe.inpaint(PROMPTS, image, mask, num_inference_steps=4, output_type="pt",
                       num_images_per_prompt=2)  # fmt: skip
    assert out.shape == (4, 3, SIZE, SIZE)
    kept = image[..., SIZE // 2 :].expand(4, -1, -1, -1)
    assert torch.equal(out[..., SIZE // 2 :], kept)
    assert (out[..., : SIZE // 2] - image[..., : SIZE // 2]).abs().max() > 0.01
    white_left = Image.new("L", (SIZE, SIZE))
    white_left.paste(255, (0, 0, SIZE // 2, SIZE))
    options = dict(output_type="pt", num_inference_steps=4)
    from_pil = pipe.inpaint(PROMPTS[0], to_pil(image)[0], white_left, **options,
                            generator=torch.Generator().manual_seed(0))  # fmt: skip
    from_tensor = pipe.inpaint(PROMPTS[0], image, mask, **options,
                               generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert (from_pil - from_tensor).abs().max() < 0.01  # PIL rounds to 8 bits


IMAGE = torch.zeros(1, 3, SIZE, SIZE)
BAD_CALLS = {
    "empty prompt list": (lambda p: p([]), "non-empty list"),
    "prompt not text": (lambda p: p(3), "prompt must be a string"),
    "negative prompts miscounted": (
        lambda p: p(PROMPTS, negative_prompt=["x"]), "1 negative prompts for 2"),
    "steps < 1": (lambda p: p("a", num_inference_steps=0), "1 or more, got 0"),
    "steps not a whole number": (
        lambda p: p("a", num_inference_steps=2.5), "num_inference_steps"),
    "guidance < 0": (lambda p: p("a", guidance_scale=-1), "0 or more, got -1"),
    "guidance not a number": (
        lambda p: p("a", guidance_scale=float("nan")), "guidance_scale"),
    "unknown sampler": (lambda p: p("a", sampler="plms"), "Unknown sampler 'plms'"),
    "karras with ddim": (lambda p: p("a", karras=True), "Karras sigmas need"),
    "no images": (lambda p: p("a", num_images_per_prompt=0), "num_images_per_prompt"),
    "unknown output type": (lambda p: p("a", output_type="np"), "output_type"),
    "guidance_rescale > 1": (
        lambda p: p("a", guidance_rescale=1.5), "guidance_rescale must be between 0"),
    "guidance_rescale not a number": (
        lambda p: p("a", guidance_rescale="0.7"), "guidance_rescale must be between 0"),
    "strength > 1": (lambda p: p.img2img("a", IMAGE, strength=1.5), "between 0 and 1"),
    "strength < 0": (lambda p: p.img2img("a", IMAGE, strength=-0.1), "between 0 and 1"),
    "image not an image": (lambda p: p.img2img("a", "x.png"), "image must be a PIL"),
    "image of odd size": (
        lambda p: p.img2img("a", torch.zeros(1, 3, 10, 10)), "divisible by 4"),
    "mask and image sizes differ": (
        lambda p: p.inpaint("a", IMAGE, torch.ones(1, 1, 8, 8)), "the same size"),
    "images miscounted": (
        lambda p: p.img2img(["a", "b", "c"], IMAGE.repeat(2, 1, 1, 1)), "2 images for"),
}  # fmt: skip


@pytest.mark.parametrize("case", BAD_CALLS)
def test_bad_input_is_one_clear_sentence(pipe, case):
    call, message = BAD_CALLS[case]
    with pytest.raises(ValueError, match=message) as error:
        call(pipe)
    text = str(error.value)
    assert "\n" not in text and text.endswith(".")
