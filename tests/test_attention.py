"""Attention blocks equal diffusers' blocks; attention maps can be recorded."""

import pytest
import torch
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.attention_processor import Attention as ReferenceAttention
from diffusers.models.transformers.transformer_2d import Transformer2DModel
from test_layers import ported, randomize

from sdscratch.attention import (
    Attention,
    SpatialTransformer,
    TransformerBlock,
    attention_probs,
    record_attention,
)


def test_attention_is_softmax_qk_over_sqrt_d_times_v():
    attention = randomize(Attention(16, heads=2, context_dim=12))
    x, context = torch.randn(2, 5, 16), torch.randn(2, 7, 12)
    q = attention.to_q(x).view(2, 5, 2, 8).transpose(1, 2)  # (B, h, N, d)
    k = attention.to_k(context).view(2, 7, 2, 8).transpose(1, 2)  # (B, h, L, d)
    v = attention.to_v(context).view(2, 7, 2, 8).transpose(1, 2)
    weights = torch.softmax(q @ k.transpose(-1, -2) / 8**0.5, dim=-1)
    expected = attention.to_out((weights @ v).transpose(1, 2).reshape(2, 5, 16))
    assert torch.allclose(attention(x, context), expected, atol=1e-5)
    assert torch.allclose(attention_probs(q, k), weights, atol=1e-6)


@pytest.mark.parametrize("context_dim", [None, 12])
def test_attention_equals_diffusers(context_dim):
    reference = randomize(
        ReferenceAttention(16, cross_attention_dim=context_dim, heads=4, dim_head=4)
    )
    ours = ported(Attention(16, heads=4, context_dim=context_dim), reference)
    x = torch.randn(2, 9, 16)
    context = None if context_dim is None else torch.randn(2, 5, context_dim)
    with torch.no_grad():
        expected = reference(x, encoder_hidden_states=context)
        assert torch.allclose(ours(x, context), expected, atol=1e-5)


@pytest.mark.parametrize("context_dim", [None, 12])
def test_transformer_block_equals_diffusers(context_dim):
    reference = randomize(
        BasicTransformerBlock(
            16, 2, 8, cross_attention_dim=context_dim, activation_fn="geglu"
        )
    )
    ours = ported(TransformerBlock(16, 2, context_dim), reference)
    x = torch.randn(2, 9, 16)
    context = None if context_dim is None else torch.randn(2, 5, context_dim)
    with torch.no_grad():
        expected = reference(x, encoder_hidden_states=context)
        assert torch.allclose(ours(x, context), expected, atol=1e-5)


@pytest.mark.parametrize("projection", ["conv", "linear"])
@pytest.mark.parametrize("context_dim", [None, 12])
def test_spatial_transformer_equals_diffusers(projection, context_dim):
    reference = randomize(
        Transformer2DModel(
            num_attention_heads=4,
            attention_head_dim=4,
            in_channels=16,
            cross_attention_dim=context_dim,
            norm_num_groups=8,
            use_linear_projection=projection == "linear",
        )
    )
    ours = ported(SpatialTransformer(16, 4, context_dim, 8, projection), reference)
    x = torch.randn(2, 16, 6, 5)
    context = None if context_dim is None else torch.randn(2, 3, context_dim)
    with torch.no_grad():
        expected = reference(x, encoder_hidden_states=context).sample
        assert torch.allclose(ours(x, context), expected, atol=1e-5)


def test_record_attention_keeps_cross_attention_maps_and_same_output():
    block = randomize(SpatialTransformer(16, 4, context_dim=12, groups=8))
    x, context = torch.randn(2, 16, 6, 5), torch.randn(2, 3, 12)
    with torch.no_grad():
        plain = block(x, context)
        with record_attention(block) as maps:
            recorded = block(x, context)
            block(x, context)
    assert list(maps) == ["transformer_blocks.0.attn2"]
    assert len(maps["transformer_blocks.0.attn2"]) == 2
    probs = maps["transformer_blocks.0.attn2"][0]
    assert probs.shape == (2, 4, 30, 3)  # (B, heads, H·W, tokens)
    assert torch.allclose(probs.sum(-1), torch.ones(2, 4, 30), atol=1e-5)
    assert torch.allclose(recorded, plain, atol=1e-5)
    assert block.transformer_blocks[0].attn2.recorder is None  # off after `with`
    with record_attention(block, "self") as maps:
        block(x, context)
    assert maps["transformer_blocks.0.attn1"][0].shape == (2, 4, 30, 30)


def test_record_attention_all_is_self_and_cross_together():
    """kind="all" records every attention layer of a UNet: the self-attention maps
    (B, heads, H·W, H·W) and the cross-attention maps (B, heads, H·W, L), the same
    maps "self" and "cross" record apart, each row a softmax."""
    from sdscratch.unet import UNet, UNetConfig

    torch.manual_seed(0)
    unet = UNet(UNetConfig(in_channels=3, out_channels=3, sample_size=8,
                           block_out_channels=(8, 16), layers_per_block=1,
                           attention_levels=(False, True), cross_attention_dim=12,
                           num_heads=2, norm_num_groups=4)).eval()  # fmt: skip
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([10, 500])
    context = torch.randn(2, 5, 12)
    layers = [name for name, module in unet.named_modules()
              if isinstance(module, Attention)]  # fmt: skip
    recorded = {}
    with torch.no_grad():
        plain = unet(x, t, context)
        for kind in ("self", "cross", "all"):
            with record_attention(unet, kind) as maps:
                output = unet(x, t, context)
            torch.testing.assert_close(output, plain, atol=1e-5, rtol=0)
            recorded[kind] = maps
    assert sorted(recorded["all"]) == sorted(layers)
    assert sorted([*recorded["self"], *recorded["cross"]]) == sorted(layers)
    assert all(name.endswith("attn1") for name in recorded["self"])
    assert all(name.endswith("attn2") for name in recorded["cross"])
    for kind in ("self", "cross"):
        for name, (probs,) in recorded[kind].items():
            # close, not equal: unrecorded layers take the fused attention kernel
            torch.testing.assert_close(recorded["all"][name][0], probs, atol=1e-6,
                                       rtol=0)  # fmt: skip
            tokens = probs.shape[-2] if kind == "self" else 5
            assert probs.shape == (2, 2, probs.shape[-2], tokens)
            torch.testing.assert_close(probs.sum(-1), torch.ones(probs.shape[:-1]))
    assert all(layer.recorder is None for layer in unet.modules()
               if isinstance(layer, Attention))  # fmt: skip
