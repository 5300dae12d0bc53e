import pytest
import torch

from sdscratch.port import vae_from_diffusers

# ---------------------------------------------------------------------------------
# The autoencoder
# ---------------------------------------------------------------------------------

TINY_VAES = {
    "two-levels": dict(
        in_channels=3, latent_channels=4, block_out_channels=(32, 64),
        layers_per_block=1, norm_num_groups=8, size=16,
    ),
    "three-levels": dict(
        in_channels=1, latent_channels=2, block_out_channels=(16, 32, 32),
        layers_per_block=2, norm_num_groups=4, size=24,
    ),
}  # fmt: skip


def tiny_autoencoder_kl(in_channels, latent_channels, block_out_channels, **kwargs):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    reference = AutoencoderKL(
        in_channels=in_channels,
        out_channels=in_channels,
        latent_channels=latent_channels,
        block_out_channels=block_out_channels,
        down_block_types=("DownEncoderBlock2D",) * len(block_out_channels),
        up_block_types=("UpDecoderBlock2D",) * len(block_out_channels),
        scaling_factor=0.5,
        **kwargs,
    )
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # move norms and biases off their initial 1s and 0s
        for parameter in reference.parameters():
            if parameter.ndim == 1:
                parameter.add_(0.1 * torch.randn(parameter.shape, generator=g))
    return reference.eval()


@pytest.mark.parametrize("name", TINY_VAES)
def test_vae_from_diffusers_gives_the_same_latents_and_images(name):
    settings = dict(TINY_VAES[name])
    size = settings.pop("size")
    reference = tiny_autoencoder_kl(**settings)
    ours = vae_from_diffusers(reference)
    assert ours.config.scaling_factor == 0.5
    g = torch.Generator().manual_seed(2)
    x = torch.rand(2, settings["in_channels"], size, size, generator=g) * 2 - 1
    with torch.no_grad():
        expected = reference.encode(x).latent_dist
        posterior = ours.encode(x)
        z = torch.randn(posterior.mean.shape, generator=g)
        decoded, decoded_ref = ours.decode(z), reference.decode(z).sample
    assert posterior.mean.shape == expected.mean.shape
    assert (posterior.mean - expected.mean).abs().max() <= 1e-5
    assert (posterior.logvar - expected.logvar).abs().max() <= 1e-5
    assert (decoded - decoded_ref).abs().max() <= 1e-5
    assert decoded.shape == x.shape


def test_vae_from_diffusers_refuses_another_layout():
    from diffusers import AutoencoderKL

    reference = AutoencoderKL(block_out_channels=(32,), act_fn="gelu")
    with pytest.raises(ValueError, match="act_fn='gelu' is not SD's layout"):
        vae_from_diffusers(reference)
