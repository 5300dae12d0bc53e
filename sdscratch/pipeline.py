"""The text-to-image pipeline: Stable Diffusion's parts put together.

Rombach et al. 2022 (latent diffusion, §3.3): a text encoder turns the prompt into
one vector per token; a UNet, cross-attending to those vectors, removes noise from a
small latent, one sampler step at a time; the autoencoder's decoder turns the final
latent into pixels. Six steps:

1. embed the prompt and the negative prompt (tokenizer + text encoder);
2. set the sampler's timesteps;
3. draw the initial latents (noise, or an image's latent noised part-way: img2img);
4. loop: the UNet predicts the noise for both prompts, classifier-free guidance
   combines the two predictions, the sampler takes a step;
5. decode the latents with the VAE;
6. show the images.

`StableDiffusion` is called like diffusers' `StableDiffusionPipeline`, so diffusers'
classic `pipe(prompt, guidance_scale=7.5, num_inference_steps=15, generator=g)`
works here too; it returns a list of PIL images (diffusers: `.images`). It loads the
bundled checkpoints, diffusers Stable Diffusion v1.x folders and Hub repositories
(`from_pretrained`) and CompVis/A1111 single files (`from_single_file`), in float32,
float16 or bfloat16, and hands its weights back to diffusers (`to_diffusers`).
"""

from pathlib import Path

import torch

from sdscratch.checkpoint import save_component
from sdscratch.controlnet import Control
from sdscratch.loading import (
    DEFAULT_REPO,
    SCHEDULER_CONFIG,
    as_dtype,
    check_fit,
    download,
    locate,
    read_diffusers_folder,
    read_our_folder,
    read_schedule,
    schedule_from_config,
    write_schedule,
)
from sdscratch.pipeline_inputs import (
    as_tensor,
    check_choice,
    check_fraction,
    check_numbers,
    check_prompts,
    latent_mask,
    mask_tensor,
    per_image,
)
from sdscratch.samplers import img2img_start, noise_levels, randn, sample
from sdscratch.schedules import NoiseSchedule
from sdscratch.viz import to_pil

__all__ = ["StableDiffusion", "DEFAULT_REPO", "read_schedule", "write_schedule"]
OUTPUT_TYPES = ("pil", "pt", "latent")


class StableDiffusion:
    """Text-to-image, img2img and inpainting with one set of trained parts.

    Args:
        unet: a text-conditioned `UNet` over latents.
        vae: the `VAE` whose latents (times `config.scaling_factor`) the UNet saw.
        text_encoder: the `TextEncoder` whose hidden states the UNet attends to.
        tokenizer: the text encoder's `Tokenizer`.
        schedule: the `NoiseSchedule` the UNet was trained with (default: SD v1's).
    """

    def __init__(self, unet, vae, text_encoder, tokenizer, schedule=None):
        self.unet, self.vae = unet.eval(), vae.eval()
        self.text_encoder, self.tokenizer = text_encoder.eval(), tokenizer
        self.schedule = schedule or NoiseSchedule.scaled_linear()

    # ------------------------------------------------------------------------------
    # Loading and saving

    @classmethod
    def from_pretrained(
        cls, name_or_path="shapes-ldm", torch_dtype=None, device=None, variant=None
    ):
        """Load a Stable Diffusion: a bundled name, a folder, a file or a Hub repo.

        Args:
            name_or_path: a bundled name ("shapes-ldm": always the bundled one,
                checked against its MANIFEST.json); a path to one of our folders
                (MANIFEST.json), to a diffusers SD v1.x folder (model_index.json)
                or to a single `.safetensors` file (see `from_single_file`); or a
                Hub repo id ("owner/name", e.g. DEFAULT_REPO), downloaded once.
            torch_dtype: torch.float32 (default), torch.float16 or torch.bfloat16.
            device: where the models go (default: the CPU).
            variant: "fp16" to read a diffusers folder's `*.fp16.safetensors`.
        Returns:
            A `StableDiffusion`; a folder that is incomplete, damaged or not SD v1
            is refused with one sentence (a `CheckpointError`).
        """
        dtype = as_dtype(torch_dtype)
        kind, where = locate(name_or_path)
        if kind == "single_file":
            return cls.from_single_file(where, torch_dtype=dtype, device=device)
        if kind == "hub":
            kind, where = "diffusers", download(where, variant)
        if kind == "diffusers":
            parts = read_diffusers_folder(where, dtype, variant)
            path = where / SCHEDULER_CONFIG
            schedule = schedule_from_config(parts.pop("scheduler_config"), path)
        else:
            parts, schedule = read_our_folder(where), read_schedule(where)
        check_fit(where, **parts)
        return cls(**parts, schedule=schedule).to(device or "cpu", dtype)

    @classmethod
    def from_single_file(
        cls, path, torch_dtype=None, device=None, config=None, extract_ema=False
    ):
        """Load a CompVis/A1111 single-file checkpoint (`v1-5-pruned-emaonly
        .safetensors`): see `sdscratch.single_file.read_single_file`.

        Args:
            path: the `.safetensors` file (pickles: `.ckpt`, `.pt`, are refused).
            torch_dtype, device: as for `from_pretrained`.
            config: a folder or repo id giving the configs, tokenizer and scheduler
                (default: those stored by `save_single_file`, else SD v1.5's).
            extract_ema: a full checkpoint's EMA weights (`model_ema.`) for the UNet
                instead of its training weights, as diffusers' `extract_ema`.
        """
        from sdscratch.single_file import read_single_file

        dtype = as_dtype(torch_dtype)
        parts, schedule = read_single_file(path, dtype, config, extract_ema)
        check_fit(path, **parts)
        return cls(**parts, schedule=schedule).to(device or "cpu", dtype)

    def save_single_file(self, path, dtype=None) -> Path:
        """Write the three models into one CompVis-layout `.safetensors` file, with
        the configs, tokenizer and schedule in its metadata (`from_single_file`
        reads them back; diffusers' single-file converter reads the weights)."""
        from sdscratch.single_file import write_single_file

        return write_single_file(self, path, dtype)

    def to_diffusers(self):
        """A diffusers `StableDiffusionPipeline` holding copies of these weights, a
        transformers `CLIPTokenizer` of the same vocabulary and a `DDIMScheduler`
        of the same schedule (no safety checker)."""
        from sdscratch.export import to_diffusers

        return to_diffusers(self)

    def load_lora_weights(self, path, scale=1.0):
        """Attach a LoRA file (diffusers' or kohya's format): see
        `sdscratch.lora_files.load_lora`. Returns the `LoRA` (`.merge()`, `.scale`,
        `.detach()`); `unload_lora_weights()` takes all of them off."""
        from sdscratch.lora_files import load_lora_weights

        return load_lora_weights(self, path, scale)

    def unload_lora_weights(self):
        from sdscratch.lora_files import unload_lora_weights

        unload_lora_weights(self)

    def load_textual_inversion(self, path, token=None) -> list:
        """Add an embedding file's token (diffusers' or A1111's layout): see
        `sdscratch.textual_inversion.load_textual_inversion`."""
        from sdscratch.textual_inversion import load_textual_inversion

        return load_textual_inversion(self, path, token)

    def unload_textual_inversion(self, tokens=None) -> list:
        """Remove added tokens (default: all) and their embedding rows, as
        diffusers' `unload_textual_inversion`; see
        `sdscratch.textual_inversion.unload_textual_inversion`."""
        from sdscratch.textual_inversion import unload_textual_inversion

        return unload_textual_inversion(self, tokens)

    def save_pretrained(self, root, dtype=None) -> Path:
        """Write unet/, vae/, text_encoder/, tokenizer/ and the scheduler's config.

        Args:
            dtype: store the weights in this dtype (e.g. torch.float16).
        """
        root = Path(root)
        for name in ("unet", "vae", "text_encoder"):
            model = getattr(self, name)
            save_component(model, root / name, model.config, dtype=dtype)
        self.tokenizer.save_pretrained(root / "tokenizer")
        write_schedule(root, self.schedule)
        return root

    def to(self, device=None, dtype=None):
        """Move the models to a device and/or dtype (float32, float16, bfloat16)."""
        dtype = None if dtype is None else as_dtype(dtype)
        for model in (self.unet, self.vae, self.text_encoder):
            model.to(device=device, dtype=dtype)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @property
    def latent_shape(self) -> tuple:
        """(C, h, w) of the latents the UNet was trained on (SD v1.5: (4, 64, 64))."""
        side = self.unet.config.sample_size
        return (self.unet.config.in_channels, side, side)

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent, per side (SD v1: 8)."""
        return self.vae.config.downsampling_factor

    # ------------------------------------------------------------------------------
    # The pieces

    @torch.no_grad()
    def encode_prompt(self, prompts: list, negative_prompts: list) -> tuple:
        """Step 1: prompts -> text hidden states, (B, L, D) each for both lists.

        The negative prompt takes the place of the empty prompt "", which is what
        the UNet learned to predict without a caption (caption dropout).
        """
        ids = self.tokenizer(prompts + negative_prompts).to(self.device)  # (2B, L)
        hidden = self.text_encoder(ids)  # (2B, L, D)
        return hidden[: len(prompts)], hidden[len(prompts) :]

    def guided_noise(
        self, context, uncond_context, guidance_scale, unet=None, guidance_rescale=0.0
    ):
        """Step 4's noise prediction with classifier-free guidance: this UNet's
        (or `unet`'s, e.g. a ControlNet-steered one) `classifier_free_guidance`,
        rescaled by `guidance_rescale` (φ of `rescale_guidance`).

        Returns:
            `eps_fn(x_t, t) -> ε̃` for `sample`.
        """
        unet = self.unet if unet is None else unet
        return classifier_free_guidance(
            unet, context, uncond_context, guidance_scale, guidance_rescale
        )

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor, generator=None) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> scaled latents (B, C, H/f, W/f): a sample of
        the VAE's posterior, drawn with `generator` (as diffusers' img2img does)."""
        posterior = self.vae.encode(images.to(self.device, self.dtype))
        return posterior.sample(generator) * self.vae.config.scaling_factor

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Step 5: scaled latents (B, C, h, w) -> images (B, 3, h·f, w·f) in [-1, 1]."""
        images = self.vae.decode(latents / self.vae.config.scaling_factor)
        return images.clamp(-1, 1)

    # ------------------------------------------------------------------------------
    # Text-to-image, img2img, inpainting

    def __call__(
        self,
        prompt,
        negative_prompt=None,
        num_inference_steps=20,
        guidance_scale=7.5,
        sampler="ddim",
        karras=False,
        generator=None,
        num_images_per_prompt=1,
        callback=None,
        output_type="pil",
        progress=False,
        guidance_rescale=0.0,
        image=None,
        controlnet=None,
        controlnet_conditioning_scale=1.0,
        guess_mode=False,
        control_guidance_start=0.0,
        control_guidance_end=1.0,
    ):
        """Text-to-image: images of `prompt`, from pure noise.

        Args:
            prompt: a string, or a list of B strings.
            negative_prompt: what to steer away from: a string or B strings (None:
                the empty prompt, plain classifier-free guidance).
            num_inference_steps: sampler steps, one UNet call each.
            guidance_scale: w of classifier-free guidance, 0 or more (SD: 7.5).
            sampler: a name in `sdscratch.samplers.SAMPLERS` ("ddim", "euler", …).
            karras: Karras et al. 2022's σ spacing (samplers that walk σ's).
            generator: a `torch.Generator`; the same seed gives the same images.
            num_images_per_prompt: images per prompt, next to each other (N = B·this).
            callback: `callback(i, t, latents, x0_pred)` after every step; if it
                returns a tensor, that replaces the latents.
            output_type: "pil" (a list of N PIL images), "pt" ((N, 3, H, W) in
                [-1, 1]) or "latent" (the final scaled latents, (N, C, h, w)).
            progress: show a progress bar over the steps.
            guidance_rescale: φ in [0, 1] of guidance rescale (Lin et al. 2023,
                `rescale_guidance`; 0: off, diffusers suggests 0.7 at large w).
            image: with `controlnet`, the control image(s) whose layout the images
                follow: PIL, 1 or B of them, or a tensor (B, 3, H, W) in [0, 1];
                resized (with a warning) to the images' size.
            controlnet: a `sdscratch.controlnet.ControlNet` made for this UNet.
            controlnet_conditioning_scale: how strongly it steers (0: not at all).
            guess_mode: the ControlNet steers the conditional half of guidance only
                (diffusers' `guess_mode`).
            control_guidance_start, control_guidance_end: the share of the steps
                before which, and after which, the ControlNet does not steer
                (`sdscratch.controlnet.guidance_window`).
        """
        control = None
        if controlnet is not None or image is not None:
            control = Control(controlnet, image, controlnet_conditioning_scale,
                              guess_mode, control_guidance_start,
                              control_guidance_end)  # fmt: skip
        return self._generate(
            prompt,
            negative_prompt=negative_prompt,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            sampler=sampler,
            karras=karras,
            generator=generator,
            num_images_per_prompt=num_images_per_prompt,
            callback=callback,
            output_type=output_type,
            progress=progress,
            guidance_rescale=guidance_rescale,
            control=control,
        )

    def img2img(self, prompt, image, strength=0.8, **options):
        """SDEdit (Meng et al. 2022): noise an image part-way, then denoise it
        towards the prompt.

        Args:
            prompt: as for `__call__`.
            image: a PIL image, a list of them, or (B, 3, H, W) in [-1, 1]; one
                image serves every prompt.
            strength: in [0, 1], the share of the steps that run: 0 keeps the image
                (as the VAE reconstructs it), 1 starts from noise and keeps little.
            options: any other argument of `__call__` (negative_prompt, generator…).
        """
        return self._generate(prompt, image=image, strength=strength, **options)

    def inpaint(self, prompt, image, mask, strength=1.0, **options):
        """Repaint the masked part of an image to match the prompt.

        After every step, the latent outside the mask is put back to the image's
        latent noised to that step's level (the blending of diffusers' inpainting
        with a plain text-to-image UNet), so the new part is made to fit the rest.
        At the end the pixels outside the mask are pasted back unchanged.

        Args:
            prompt: as for `__call__`.
            image: as for `img2img`.
            mask: a PIL image (white = repaint; read as greyscale), a list of them,
                or a tensor (B, 1, H, W) in [0, 1] (1 = repaint), as large as image.
            strength: as for `img2img`; 1 (default) repaints from pure noise.
            options: any other argument of `__call__`.
        """
        return self._generate(
            prompt, image=image, mask=mask, strength=strength, **options
        )

    def _generate(
        self,
        prompt,
        image=None,
        mask=None,
        strength=1.0,
        negative_prompt=None,
        num_inference_steps=20,
        guidance_scale=7.5,
        sampler="ddim",
        karras=False,
        generator=None,
        num_images_per_prompt=1,
        callback=None,
        output_type="pil",
        progress=False,
        guidance_rescale=0.0,
        control=None,
    ):
        """The six steps, for all three tasks (arguments as `__call__`'s; `control`
        a `sdscratch.controlnet.Control`)."""
        prompts, negatives = check_prompts(prompt, negative_prompt)
        check_numbers(num_inference_steps, guidance_scale, num_images_per_prompt)
        check_choice(output_type, OUTPUT_TYPES, "output_type")
        check_fraction(guidance_rescale, "guidance_rescale")
        levels = noise_levels(sampler, num_inference_steps, self.schedule, karras)
        if image is not None:
            img2img_start(num_inference_steps, strength)  # checks strength
        n = num_images_per_prompt
        images, mask = self._prepare_images(image, mask, len(prompts))
        # 1. prompt and negative prompt -> text hidden states, n per prompt
        context, uncond = self.encode_prompt(prompts, negatives)
        context = context.repeat_interleave(n, 0)  # (N, L, D), N = B · n
        uncond = uncond.repeat_interleave(n, 0)
        # 2.-3. (`sample` sets the timesteps) the initial noise, the image's latent
        init, shape = None, (len(context), *self.latent_shape)
        if images is not None:
            init = per_image(self.encode_images(images, generator), n, len(context))
            shape = init.shape
        noise = randn(shape, generator, self.device, self.dtype)
        unet = self.unet  # or, with a ControlNet, the UNet it steers
        if control is not None:
            unet = control.steer(
                self.unet, shape, self.vae_scale_factor, n, levels.timesteps
            )
        # 4. the denoising loop: the UNet with guidance, then a sampler step (none
        #    if the strength is too small for one: then the image's latent stays)
        latents = sample(
            self.guided_noise(context, uncond, guidance_scale, unet, guidance_rescale),
            noise,
            sampler,
            num_inference_steps,
            self.schedule,
            karras,
            generator=generator,
            callback=callback,
            init=init,
            strength=strength,
            mask=latent_mask(mask, n, len(context), self.vae_scale_factor, noise),
            progress=progress,
        )
        if not torch.isfinite(latents).all():
            raise ValueError(
                "Sampling produced non-finite latents (inf or NaN); lower "
                f"guidance_scale (got {guidance_scale!r}) or check the model."
            )
        if output_type == "latent":
            return latents
        # 5. decode; inpainting pastes the kept pixels back
        decoded = self.decode_latents(latents).float()
        if mask is not None:
            images = per_image(images.to(decoded), n, len(decoded))
            mask = per_image(mask.to(decoded), n, len(decoded))
            decoded = images * (1 - mask) + decoded * mask
        # 6. the images to show
        return decoded if output_type == "pt" else to_pil(decoded)

    def _prepare_images(self, image, mask, batch):
        """img2img's images and inpainting's mask, checked, as tensors of 1 or
        `batch` rows."""
        if image is None:
            return None, None
        images = as_tensor(image, "image")  # (B or 1, 3, H, W)
        f = self.vae_scale_factor
        if images.shape[1] != 3 or images.shape[-1] % f or images.shape[-2] % f:
            raise ValueError(
                f"image must be RGB with sides divisible by {f}, got shape "
                f"{tuple(images.shape)}."
            )
        if mask is not None:
            mask = mask_tensor(mask, images.shape)
        for name, tensor in (("images", images), ("masks", mask)):
            if tensor is not None and len(tensor) not in (1, batch):
                raise ValueError(f"Got {len(tensor)} {name} for {batch} prompts.")
        return images, mask


# ----------------------------------------------------------------------------------
# Classifier-free guidance


def classifier_free_guidance(
    unet, context, uncond_context, guidance_scale, guidance_rescale=0.0
):
    """The noise prediction with classifier-free guidance, as `eps_fn(x_t, t)`.

    Ho & Salimans 2022, eq. 6: ε̃ = ε(x, ∅) + w (ε(x, c) - ε(x, ∅)), with w the
    guidance scale; w = 0 ignores the prompt, w = 1 is the plain conditional
    model, w > 1 pushes further towards the prompt. Both predictions come from
    one UNet call on a doubled batch, as diffusers does.

    Args:
        unet: a text-conditioned UNet, `unet(x, t, context) -> ε`.
        context, uncond_context: (B, L, D) the prompts' and the negative (or empty)
            prompts' hidden states.
        guidance_scale: w, 0 or more.
        guidance_rescale: φ of `rescale_guidance` (0: plain guidance).
    Returns:
        `eps_fn(x_t, t) -> ε̃` for `sample`, x_t (B, C, H, W).
    """
    w = guidance_scale

    def eps_fn(x, t):
        if w == 0:  # the formula gives ε(x, ∅) alone: skip the other half
            return unet(x, t, uncond_context)
        if w == 1:  # the formula gives ε(x, c) alone
            return unet(x, t, context)
        contexts = torch.cat([uncond_context, context])  # (2B, L, D)
        both = unet(torch.cat([x, x]), torch.cat([t, t]), contexts)
        eps_uncond, eps_text = both.chunk(2)
        guided = eps_uncond + w * (eps_text - eps_uncond)
        if guidance_rescale:
            return rescale_guidance(guided, eps_text, guidance_rescale)
        return guided

    return eps_fn


def rescale_guidance(guided, eps_text, guidance_rescale):
    """Guidance rescale (Lin et al. 2023, §3.4; diffusers'
    `rescale_noise_cfg`): a large w inflates the guided prediction's standard
    deviation, and the images overexpose; scale each sample's ε̃ back to the
    standard deviation of ε(x, c), and blend by φ.

    ε̃' = φ · ε̃ σ(ε_c) / σ(ε̃) + (1 - φ) · ε̃, σ over each sample's (C, H, W).

    Args:
        guided: (B, C, H, W) the guided prediction ε̃.
        eps_text: (B, C, H, W) the conditional prediction ε(x, c).
        guidance_rescale: φ in [0, 1]; diffusers suggests 0.7.
    """
    dims = list(range(1, guided.ndim))
    std_text = eps_text.std(dim=dims, keepdim=True)  # (B, 1, 1, 1)
    std_guided = guided.std(dim=dims, keepdim=True)
    rescaled = guided * (std_text / std_guided)
    return guidance_rescale * rescaled + (1 - guidance_rescale) * guided
