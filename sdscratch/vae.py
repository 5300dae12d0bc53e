"""The autoencoder of Stable Diffusion (AutoencoderKL): pixels <-> a small latent.

Rombach et al. 2022 ("High-Resolution Image Synthesis with Latent Diffusion Models",
section 3.1) train the diffusion model not on pixels but on the latents of an
autoencoder: SD v1 maps a 3×512×512 image to a 4×64×64 latent, 48× fewer numbers.
The encoder predicts a diagonal Gaussian over the latent (a variational autoencoder,
Kingma & Welling 2014); a tiny KL weight keeps the latents close to N(0, I) without
blurring the reconstructions.

The layout and the parameter names are diffusers' `AutoencoderKL`'s (for example
"encoder.down_blocks.0.resnets.0.conv1.weight"), so real SD weights load into ours
without any renaming (`sdscratch.port.vae_from_diffusers`).
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from sdscratch.layers import Upsample  # nearest ×2 then a 3×3 conv, as the UNet's


@dataclass
class VAEConfig:
    """The knobs of the autoencoder. The defaults are the course's small model."""

    in_channels: int = 3  # image channels (RGB)
    latent_channels: int = 4  # channels of the latent; SD v1: 4
    block_out_channels: tuple = (32, 32, 64)  # width per resolution; SD v1: 128..512
    layers_per_block: int = 1  # ResNet blocks per resolution (decoder: one more)
    norm_num_groups: int = 16  # GroupNorm groups; SD v1: 32
    scaling_factor: float = 1.0  # latents × this have unit std; SD v1: 0.18215
    sample_size: int = 32  # the image size it was trained on; SD v1: 512

    @classmethod
    def stable_diffusion_v1(cls) -> "VAEConfig":
        """SD v1.x's autoencoder: 512×512×3 -> 64×64×4, 83,653,863 parameters."""
        return cls(
            block_out_channels=(128, 256, 512, 512),
            layers_per_block=2,
            norm_num_groups=32,
            scaling_factor=0.18215,
            sample_size=512,
        )

    @property
    def downsampling_factor(self) -> int:
        """How much smaller the latent is than the image per side (SD v1: 8)."""
        return 2 ** (len(self.block_out_channels) - 1)


def group_norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    """Two (GroupNorm, SiLU, 3×3 conv) layers plus a skip; no time embedding."""

    def __init__(self, in_channels: int, out_channels: int, groups: int):
        super().__init__()
        self.norm1 = group_norm(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = group_norm(out_channels, groups)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = None
        if in_channels != out_channels:  # a 1×1 conv makes the skip fit
            self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return x + h


class AttentionBlock(nn.Module):
    """Single-head self-attention over all pixels, with a residual connection.

    Every pixel attends to every other pixel (Vaswani et al. 2017, eq. 1):
    softmax(QKᵀ/√C) V, with one head as wide as the channels.
    """

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.group_norm = group_norm(channels, groups)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        # diffusers' to_out is a list [Linear, Dropout]; ours holds the Linear at the
        # same place, so its weights are "to_out.0.weight" in both.
        self.to_out = nn.Sequential(nn.Linear(channels, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = rearrange(self.group_norm(x), "b c h w -> b (h w) c")  # (B, HW, C)
        q, k, v = self.to_q(tokens), self.to_k(tokens), self.to_v(tokens)
        weights = torch.softmax(q @ k.transpose(1, 2) / c**0.5, dim=-1)  # (B, HW, HW)
        out = self.to_out(weights @ v)  # (B, HW, C)
        return x + rearrange(out, "b (h w) c -> b c h w", h=h, w=w)


class Downsample(nn.Module):
    """Halve height and width: pad right and bottom by one, then a stride-2 3×3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # SD's asymmetric padding


def resnet_blocks(in_channels, out_channels, layers, groups) -> nn.ModuleList:
    """`layers` ResNet blocks; the first changes the channel count."""
    return nn.ModuleList(
        ResnetBlock(in_channels if i == 0 else out_channels, out_channels, groups)
        for i in range(layers)
    )


class DownEncoderBlock(nn.Module):
    """One level of the encoder: ResNet blocks, then (except at the last level) a
    downsampler. diffusers' `DownEncoderBlock2D`, with its child names."""

    def __init__(self, in_channels, out_channels, layers, groups, downsample=True):
        super().__init__()
        self.resnets = resnet_blocks(in_channels, out_channels, layers, groups)
        # diffusers keeps its one downsampler in a list: "downsamplers.0"
        self.downsamplers = nn.ModuleList()
        if downsample:
            self.downsamplers.append(Downsample(out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)  # (B, C_out, H, W)
        for downsampler in self.downsamplers:
            x = downsampler(x)  # (B, C_out, H/2, W/2)
        return x


class UpDecoderBlock(nn.Module):
    """One level of the decoder: ResNet blocks, then (except at the last level) an
    upsampler. diffusers' `UpDecoderBlock2D`, with its child names."""

    def __init__(self, in_channels, out_channels, layers, groups, upsample=True):
        super().__init__()
        self.resnets = resnet_blocks(in_channels, out_channels, layers, groups)
        # diffusers keeps its one upsampler in a list: "upsamplers.0"
        self.upsamplers = nn.ModuleList()
        if upsample:
            self.upsamplers.append(Upsample(out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)  # (B, C_out, H, W)
        for upsampler in self.upsamplers:
            x = upsampler(x)  # (B, C_out, 2H, 2W)
        return x


class MidBlock(nn.Module):
    """At the lowest resolution: ResNet block, self-attention, ResNet block.

    diffusers' `UNetMidBlock2D`, whose lists give the names: resnets.0,
    attentions.0, resnets.1.
    """

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.attentions = nn.ModuleList([AttentionBlock(channels, groups)])
        self.resnets = resnet_blocks(channels, channels, 2, groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x)
        return self.resnets[1](self.attentions[0](x))


class Encoder(nn.Module):
    """Image (B, 3, H, W) -> mean and log-variance (B, 2·latent, H/f, W/f)."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        widths, groups = config.block_out_channels, config.norm_num_groups
        self.conv_in = nn.Conv2d(config.in_channels, widths[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            DownEncoderBlock(
                widths[max(i - 1, 0)],
                width,
                config.layers_per_block,
                groups,
                downsample=i < len(widths) - 1,
            )
            for i, width in enumerate(widths)
        )
        self.mid_block = MidBlock(widths[-1], groups)
        self.conv_norm_out = group_norm(widths[-1], groups)  # diffusers' name
        self.conv_out = nn.Conv2d(widths[-1], 2 * config.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)  # (B, C0, H, W)
        for block in self.down_blocks:
            h = block(h)  # halves H and W, except the last
        h = self.mid_block(h)  # (B, C_last, H/f, W/f)
        return self.conv_out(F.silu(self.conv_norm_out(h)))  # (B, 2·latent, H/f, W/f)


class Decoder(nn.Module):
    """Latent (B, latent, h, w) -> image (B, 3, h·f, w·f), the encoder mirrored."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        widths, groups = config.block_out_channels[::-1], config.norm_num_groups
        self.conv_in = nn.Conv2d(config.latent_channels, widths[0], 3, padding=1)
        self.mid_block = MidBlock(widths[0], groups)
        self.up_blocks = nn.ModuleList(
            UpDecoderBlock(
                widths[max(i - 1, 0)],
                width,
                config.layers_per_block + 1,
                groups,
                upsample=i < len(widths) - 1,
            )
            for i, width in enumerate(widths)
        )
        self.conv_norm_out = group_norm(widths[-1], groups)  # diffusers' name
        self.conv_out = nn.Conv2d(widths[-1], config.in_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid_block(self.conv_in(z))  # (B, C_last, h, w)
        for block in self.up_blocks:
            h = block(h)  # doubles H and W, except the last
        return self.conv_out(F.silu(self.conv_norm_out(h)))  # (B, 3, h·f, w·f)


class DiagonalGaussian:
    """The encoder's posterior q(z|x) = N(mean, diag(exp(logvar))).

    Args:
        parameters: (B, 2·C, h, w), the mean and the log-variance stacked on channels.
    """

    def __init__(self, parameters: torch.Tensor):
        self.parameters = parameters
        self.mean, logvar = torch.chunk(parameters, 2, dim=1)  # (B, C, h, w) each
        self.logvar = logvar.clamp(-30.0, 20.0)  # as SD: keeps exp() finite
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """z = mean + std · ε, ε ~ N(0, I) (the reparameterisation trick)."""
        noise = torch.randn(
            self.mean.shape, generator=generator, dtype=self.mean.dtype
        ).to(self.mean.device)
        return self.mean + self.std * noise

    def mode(self) -> torch.Tensor:
        """The most likely latent: the mean. SD encodes images with it (or a sample)."""
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(q(z|x) ‖ N(0, I)) per image, summed over the latent: shape (B,).

        Kingma & Welling 2014, appendix B: ½ Σ (μ² + σ² − 1 − log σ²).
        """
        terms = self.mean.pow(2) + self.var - 1.0 - self.logvar
        return 0.5 * terms.sum(dim=(1, 2, 3))


class VAE(nn.Module):
    """Stable Diffusion's autoencoder (diffusers' `AutoencoderKL` layout).

    `encode(x)` gives the posterior over latents, `decode(z)` the image. The latent
    diffusion model works on `posterior.sample() * config.scaling_factor`, and
    decodes `z / config.scaling_factor`.
    """

    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        latent = config.latent_channels
        self.encoder = Encoder(config)
        self.quant_conv = nn.Conv2d(2 * latent, 2 * latent, 1)
        self.post_quant_conv = nn.Conv2d(latent, latent, 1)
        self.decoder = Decoder(config)

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        """Images (B, 3, H, W) in [-1, 1] -> posterior over (B, latent, H/f, W/f)."""
        return DiagonalGaussian(self.quant_conv(self.encoder(x)))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latents (B, latent, h, w), unscaled -> images (B, 3, h·f, w·f), ≈[-1, 1]."""
        return self.decoder(self.post_quant_conv(z))

    def forward(self, x: torch.Tensor, generator=None, sample_posterior=False):
        """Reconstruct x through the mean latent (or a sample of the posterior)."""
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z)


# ---------------------------------------------------------------------------------
# Training and measuring


def vae_loss(vae: VAE, images: torch.Tensor, kl_weight=1e-6, generator=None):
    """The training objective: squared error of a decoded posterior sample, plus KL.

    A β-weighted evidence lower bound (Kingma & Welling 2014, eq. 10), per number:
    mean squared error over pixels + β · KL over latent numbers. SD's autoencoder
    uses L1 plus a perceptual and an adversarial term (Rombach et al. 2022, section
    3.1) for crisp textures; flat-coloured shapes need neither, and the squared error
    is what PSNR measures. β is so small that reconstructions stay sharp, yet the KL
    keeps the latents bounded and a little noisy, so that their neighbourhoods decode
    to similar images.

    Args:
        images: (B, 3, H, W) in [-1, 1].
        kl_weight: β, the weight of the KL per latent number.
        generator: draws the posterior sample.
    """
    posterior = vae.encode(images)
    reconstructions = vae.decode(posterior.sample(generator))
    reconstruction = (reconstructions - images).pow(2).mean()
    kl = posterior.kl().mean() / posterior.mean[0].numel()  # per latent number
    return reconstruction + kl_weight * kl


def psnr(images: torch.Tensor, reconstructions: torch.Tensor) -> float:
    """Peak signal-to-noise ratio in dB of images in [-1, 1], over the whole batch.

    10·log10(peak² / MSE) with the peak-to-peak range 2; reconstructions are clamped
    to [-1, 1] first, as they are when shown.
    """
    mse = (reconstructions.clamp(-1, 1) - images).pow(2).mean()
    return (10 * torch.log10(4.0 / mse)).item()


@torch.no_grad()
def measure_scaling_factor(vae: VAE, images: torch.Tensor, generator=None) -> float:
    """1 / std of posterior samples: the factor that gives the latents unit variance.

    SD v1's 0.18215 was estimated this way on its training images (Rombach et al.
    2022 rescale the latents by one such scalar); the diffusion model then sees
    latents of about the same scale as the noise it learns to remove.
    """
    latents = torch.cat([vae.encode(x).sample(generator) for x in images.split(256)])
    return 1.0 / latents.std().item()
