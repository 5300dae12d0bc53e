import pytest
import torch
from diffusers import UNet2DConditionModel

from sdscratch.port import (
    unet_config_from_diffusers,
    unet_from_diffusers,
    unet_state_dict_from_diffusers,
    vae_from_diffusers,
)

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


@pytest.mark.parametrize("name", TINY_VAES)
def test_vae_has_autoencoder_kls_parameter_names(name):
    """No renaming table: every key and shape of our state dict is diffusers'."""
    from sdscratch.port import vae_config_from_diffusers
    from sdscratch.vae import VAE

    settings = dict(TINY_VAES[name])
    settings.pop("size")
    reference = tiny_autoencoder_kl(**settings)
    with torch.device("meta"):
        ours = VAE(vae_config_from_diffusers(reference.config))
    expected = {key: value.shape for key, value in reference.state_dict().items()}
    assert {key: value.shape for key, value in ours.state_dict().items()} == expected


def test_vae_from_diffusers_refuses_another_layout():
    from diffusers import AutoencoderKL

    reference = AutoencoderKL(block_out_channels=(32,), act_fn="gelu")
    with pytest.raises(ValueError, match="act_fn='gelu' is not SD's layout"):
        vae_from_diffusers(reference)


# ---------------------------------------------------------------------------------
# The UNet
# ---------------------------------------------------------------------------------

TINY_UNETS = {
    "text, 1 layer, conv proj_in": dict(
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=24,
        attention_head_dim=4,
    ),
    "text, 2 layers, linear proj_in, attention at low resolution": dict(
        block_out_channels=(16, 32, 48),
        layers_per_block=2,
        down_block_types=(
            "DownBlock2D",
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
        ),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=20,
        attention_head_dim=2,
        use_linear_projection=True,
    ),
    "unconditional, 2 layers, no attention": dict(
        block_out_channels=(16, 32),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        mid_block_type="UNetMidBlock2D",
    ),
}


def tiny_diffusers_unet(seed=0, **config):
    torch.manual_seed(seed)
    model = UNet2DConditionModel(
        sample_size=16, in_channels=3, out_channels=3, norm_num_groups=8, **config
    )
    # Random (not default-initialised) norms and biases, so that every weight matters.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def max_abs_port_error(reference, size=(16, 16), t=None, batch=2):
    unet = unet_from_diffusers(reference)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 3, *size, generator=g)
    t = torch.tensor([10, 731])[:batch] if t is None else t
    config = reference.config
    context = None
    if unet.config.cross_attention_dim is not None:
        context = torch.randn(batch, 7, config.cross_attention_dim, generator=g)
    with torch.no_grad():
        expected = reference(x, t, encoder_hidden_states=context).sample
        actual = unet(x, t, context)
    assert actual.shape == expected.shape == x.shape
    return (actual - expected).abs().max().item()


@pytest.mark.parametrize("name", TINY_UNETS)
def test_unet_port_equals_diffusers(name):
    error = max_abs_port_error(tiny_diffusers_unet(**TINY_UNETS[name]))
    print(f"{name}: max abs error {error:.2e}")
    assert error <= 1e-5


def test_unet_port_single_and_fractional_timesteps_and_odd_size():
    reference = tiny_diffusers_unet(**TINY_UNETS["text, 1 layer, conv proj_in"])
    assert max_abs_port_error(reference, t=417) <= 1e-5
    assert max_abs_port_error(reference, t=torch.tensor(3)) <= 1e-5
    assert max_abs_port_error(reference, t=torch.tensor([2.5, 911.25])) <= 1e-5
    assert max_abs_port_error(reference, size=(10, 14)) <= 1e-5  # upsample to 5 -> 10
    three = tiny_diffusers_unet(**TINY_UNETS[next(iter(list(TINY_UNETS)[1:]))])
    assert max_abs_port_error(three, size=(9, 11)) <= 1e-5  # 9 -> 5 -> 3 and back


def test_unet_port_can_fail():
    """A wrong weight gives a large error: the comparison would catch a bad port."""
    reference = tiny_diffusers_unet(**TINY_UNETS["text, 1 layer, conv proj_in"])
    unet = unet_from_diffusers(reference)
    with torch.no_grad():
        unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2.to_k.weight.mul_(
            2
        )
    x, context = torch.randn(1, 3, 16, 16), torch.randn(1, 7, 24)
    with torch.no_grad():
        error = (unet(x, 5, context) - reference(x, 5, context).sample).abs().max()
    assert error > 1e-3


def test_unet_port_copies_the_weights():
    reference = tiny_diffusers_unet(
        **TINY_UNETS["unconditional, 2 layers, no attention"]
    )
    unet = unet_from_diffusers(reference)
    with torch.no_grad():
        unet.conv_in.weight.zero_()
    assert reference.conv_in.weight.abs().sum() > 0


def test_sd15_config_maps_to_the_default_unet_config():
    from sdscratch.unet import UNetConfig

    sd15 = dict(  # stable-diffusion-v1-5/unet/config.json
        sample_size=64,
        in_channels=4,
        out_channels=4,
        down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
        up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
        block_out_channels=[320, 640, 1280, 1280],
        layers_per_block=2,
        cross_attention_dim=768,
        attention_head_dim=8,
        norm_num_groups=32,
    )
    with torch.device("meta"):
        reference = UNet2DConditionModel(**sd15)
    assert unet_config_from_diffusers(reference.config) == UNetConfig()


def test_unet_port_refuses_what_it_cannot_build():
    config = dict(TINY_UNETS["text, 1 layer, conv proj_in"])
    with torch.device("meta"):
        reference = UNet2DConditionModel(
            norm_num_groups=8, class_embed_type="timestep", **config
        )
    with pytest.raises(ValueError, match="class_embed_type"):
        unet_config_from_diffusers(reference.config)


def test_unet_renames_whole_parts_only():
    state = {"a.to_out.0.weight": 1, "to_out.0.bias": 2, "a.to_out.01.weight": 3}
    assert unet_state_dict_from_diffusers(state) == {
        "a.to_out.weight": 1,
        "to_out.bias": 2,
        "a.to_out.01.weight": 3,
    }
