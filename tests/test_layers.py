"""The UNet's blocks equal diffusers' blocks, weights ported with the UNet table."""

import torch
from diffusers.models.embeddings import TimestepEmbedding as ReferenceMLP
from diffusers.models.embeddings import get_timestep_embedding
from diffusers.models.resnet import Downsample2D, ResnetBlock2D, Upsample2D

from sdscratch.layers import (
    Downsample,
    ResBlock,
    TimestepEmbedding,
    Upsample,
    timestep_embedding,
)
from sdscratch.port import unet_state_dict_from_diffusers


def ported(ours, reference):
    """Load the reference block's weights into ours (strict: every name maps)."""
    ours.load_state_dict(unet_state_dict_from_diffusers(reference.state_dict()))
    return ours


def randomize(module, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return module


def test_timestep_embedding_equals_stable_diffusion():
    t = torch.tensor([0, 1, 17, 500.5, 999])
    expected = get_timestep_embedding(
        t, 320, flip_sin_to_cos=True, downscale_freq_shift=0
    )
    assert torch.allclose(timestep_embedding(t, 320), expected, atol=1e-6)
    assert not torch.allclose(timestep_embedding(t, 320)[:, :160], expected[:, 160:])


def test_timestep_mlp_equals_diffusers():
    reference = randomize(ReferenceMLP(32, 128))
    ours = ported(TimestepEmbedding(32, 128), reference)
    features = torch.randn(3, 32)
    assert torch.allclose(ours(features), reference(features), atol=1e-6)


def test_resblock_equals_diffusers_with_and_without_shortcut():
    for c_in, c_out in [(16, 16), (16, 32)]:
        reference = randomize(
            ResnetBlock2D(
                in_channels=c_in,
                out_channels=c_out,
                temb_channels=64,
                groups=8,
                eps=1e-5,
            )
        )
        ours = ported(ResBlock(c_in, c_out, 64, groups=8), reference)
        assert (ours.conv_shortcut is None) == (c_in == c_out)
        x, time = torch.randn(2, c_in, 8, 8), torch.randn(2, 64)
        with torch.no_grad():
            assert torch.allclose(ours(x, time), reference(x, time), atol=1e-5)


def test_down_and_upsample_equal_diffusers():
    x = torch.randn(2, 8, 6, 6)
    down_ref = randomize(Downsample2D(8, use_conv=True, padding=1, name="op"))
    down = ported(Downsample(8), down_ref)
    assert down(x).shape == (2, 8, 3, 3)
    assert torch.allclose(down(x), down_ref(x), atol=1e-6)
    up_ref = randomize(Upsample2D(8, use_conv=True))
    up = ported(Upsample(8), up_ref)
    assert up(x).shape == (2, 8, 12, 12)
    assert torch.allclose(up(x), up_ref(x), atol=1e-6)
    assert torch.allclose(up(x, (11, 13)), up_ref(x, output_size=(11, 13)), atol=1e-6)
