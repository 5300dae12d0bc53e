import pytest
import torch

from sdscratch.shapes.data import Shapes
from sdscratch.vae import (
    VAE,
    DiagonalGaussian,
    VAEConfig,
    measure_scaling_factor,
    psnr,
    vae_loss,
)


def test_sd_v1_config_has_the_parameter_count_of_sd_v1():
    with torch.device("meta"):
        vae = VAE(VAEConfig.stable_diffusion_v1())
    assert sum(p.numel() for p in vae.parameters()) == 83_653_863
    assert VAEConfig.stable_diffusion_v1().downsampling_factor == 8


def test_sd_v1_count_agrees_with_diffusers():
    from diffusers import AutoencoderKL

    config = VAEConfig.stable_diffusion_v1()
    with torch.device("meta"):
        reference = AutoencoderKL(
            block_out_channels=config.block_out_channels,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            layers_per_block=2,
            latent_channels=4,
        )
    assert sum(p.numel() for p in reference.parameters()) == 83_653_863


def test_small_vae_maps_32x32x3_to_8x8x4_and_back():
    vae = VAE(VAEConfig())
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    posterior = vae.encode(x)
    assert posterior.mean.shape == (2, 4, 8, 8)
    assert posterior.sample(torch.Generator().manual_seed(1)).shape == (2, 4, 8, 8)
    assert vae.decode(posterior.mode()).shape == (2, 3, 32, 32)
    assert vae(x).shape == x.shape


def test_diagonal_gaussian_kl_matches_torch_distributions():
    g = torch.Generator().manual_seed(0)
    parameters = torch.randn(3, 8, 2, 2, generator=g)
    posterior = DiagonalGaussian(parameters)
    q = torch.distributions.Normal(posterior.mean, posterior.std)
    p = torch.distributions.Normal(torch.zeros(()), torch.ones(()))
    expected = torch.distributions.kl_divergence(q, p).sum(dim=(1, 2, 3))
    torch.testing.assert_close(posterior.kl(), expected)
    assert posterior.kl().shape == (3,)


def test_diagonal_gaussian_sample_mode_and_clamp():
    parameters = torch.zeros(1, 2, 1, 1)
    parameters[:, 1] = 100.0  # log-variance far beyond SD's clamp
    posterior = DiagonalGaussian(parameters)
    assert posterior.logvar.item() == 20.0
    assert torch.equal(posterior.mode(), posterior.mean)
    a = DiagonalGaussian(torch.randn(4, 8, 3, 3)).sample
    assert torch.equal(
        a(torch.Generator().manual_seed(5)), a(torch.Generator().manual_seed(5))
    )


def test_samples_spread_by_the_posterior_std():
    parameters = torch.zeros(1, 2, 64, 64)
    parameters[:, 1] = 2 * torch.log(torch.tensor(0.5))  # std 0.5
    z = DiagonalGaussian(parameters).sample(torch.Generator().manual_seed(0))
    assert z.std().item() == pytest.approx(0.5, rel=0.05)


def test_kl_weight_gradient_pushes_toward_the_prior():
    parameters = torch.full((1, 2, 1, 1), 1.0, requires_grad=True)
    DiagonalGaussian(parameters).kl().sum().backward()
    assert (parameters.grad > 0).all()  # both mean and log-variance shrink to 0


def test_vae_loss_trains_and_psnr_measures():
    g = torch.Generator().manual_seed(0)
    images = torch.rand(4, 3, 16, 16, generator=g) * 2 - 1
    assert psnr(images, images) == float("inf")
    assert psnr(images, torch.zeros_like(images)) == pytest.approx(
        10 * torch.log10(4 / images.pow(2).mean()).item()
    )
    torch.manual_seed(0)
    vae = VAE(VAEConfig(block_out_channels=(8, 16), norm_num_groups=4))
    loss = vae_loss(vae, images, kl_weight=1.0, generator=g)
    loss.backward()
    assert all(p.grad is not None for p in vae.parameters())
    scenes = Shapes("train", size=16).batch(range(4))[0]  # what it can learn
    optimizer = torch.optim.Adam(vae.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):  # the loss it returns is one a few steps of Adam lower
        optimizer.zero_grad()
        loss = vae_loss(vae, scenes, kl_weight=1e-3, generator=g)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5, losses
    factor = measure_scaling_factor(vae, images, torch.Generator().manual_seed(0))
    with torch.no_grad():
        z = vae.encode(images).sample(torch.Generator().manual_seed(0))
    assert (z * factor).std().item() == pytest.approx(1.0, rel=1e-4)


def test_vae_recipe_writes_a_loadable_checkpoint_and_manifest(tmp_path):
    from sdscratch.checkpoint import load_component, verify
    from sdscratch.recipes import run_recipe

    manifest = run_recipe("vae", out=tmp_path, seed=0, steps=2)
    assert set(manifest["quality"]) >= {"psnr_db_val", "scaling_factor"}
    assert verify(tmp_path)["command"].endswith(f"--steps 2 --out {tmp_path}")
    vae = load_component(tmp_path / "vae", VAE, VAEConfig)
    assert vae.config.scaling_factor == manifest["quality"]["scaling_factor"]
    assert vae.encode(torch.zeros(1, 3, 32, 32)).mean.shape == (1, 4, 8, 8)
