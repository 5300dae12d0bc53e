"""Attention: self- and cross-attention, the transformer block, SpatialTransformer.

Cross-attention is how text steers Stable Diffusion: the queries come from the image's
pixels, the keys and values from the prompt's tokens, so every pixel takes a weighted
mix of token vectors, weighted by how well it matches each token.

`record_attention(model)` makes the attention layers keep their softmax maps, for
pictures of which pixels listen to which word.
"""

import contextlib

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from sdscratch.layers import FeedForward


class Attention(nn.Module):
    """Multi-head scaled dot-product attention (Vaswani et al. 2017, §3.2).

    softmax(Q Kᵀ / √d) V per head, with Q from `x` and K, V from `context` (cross-
    attention) or from `x` itself (self-attention).

    Args:
        dim: width of the queries' input, and of the output.
        heads: number of heads; each has dim / heads channels.
        context_dim: width of the keys' and values' input (None: self-attention).
    """

    def __init__(self, dim, heads=8, context_dim=None):
        super().__init__()
        if dim % heads:
            raise ValueError(f"Width {dim} does not split into {heads} heads.")
        self.heads = heads
        self.is_cross = context_dim is not None
        context_dim = context_dim or dim
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim, dim, bias=False)
        self.to_out = nn.Linear(dim, dim)
        self.recorder = None  # a list while `record_attention` is active

    def forward(self, x, context=None):
        """x (B, N, dim), context (B, L, context_dim) or None -> (B, N, dim)."""
        context = x if context is None else context
        q = split_heads(self.to_q(x), self.heads)  # (B, h, N, d)
        k = split_heads(self.to_k(context), self.heads)  # (B, h, L, d)
        v = split_heads(self.to_v(context), self.heads)
        if self.recorder is None:
            out = F.scaled_dot_product_attention(q, k, v)  # (B, h, N, d)
        else:
            probs = attention_probs(q, k)  # (B, h, N, L)
            self.recorder.append(probs.detach())
            out = probs @ v  # (B, h, N, d)
        return self.to_out(rearrange(out, "b h n d -> b n (h d)"))


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, N, h·d) -> (B, h, N, d): head i takes channels i·d … (i+1)·d - 1."""
    return rearrange(x, "b n (h d) -> b h n d", h=heads)


def attention_probs(q, k) -> torch.Tensor:
    """softmax(Q Kᵀ / √d): q (B, h, N, d), k (B, h, L, d) -> (B, h, N, L)."""
    scores = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5  # (B, h, N, L)
    return scores.softmax(dim=-1)


class TransformerBlock(nn.Module):
    """Self-attention, cross-attention, feed-forward, each pre-LayerNorm + residual.

    Args:
        dim: token width.
        heads: attention heads.
        context_dim: width of the text tokens (None: no cross-attention).
    """

    def __init__(self, dim, heads, context_dim=None):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads)
        self.norm2 = self.attn2 = None
        if context_dim is not None:
            self.norm2 = nn.LayerNorm(dim)
            self.attn2 = Attention(dim, heads, context_dim)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, x, context=None):
        """x (B, N, dim), context (B, L, context_dim) -> (B, N, dim)."""
        x = x + self.attn1(self.norm1(x))
        if self.attn2 is not None:
            x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """A transformer over the pixels of a feature map (Rombach et al. 2022, §3.3).

    GroupNorm → proj_in → pixels become tokens → transformer block → tokens become
    pixels → proj_out, added to the input.

    Args:
        channels: feature-map channels, also the token width.
        heads: attention heads.
        context_dim: width of the text tokens (None: self-attention only).
        groups: GroupNorm groups.
        projection: "conv" (1×1 convolutions, SD v1) or "linear" (SD v2).
    """

    def __init__(self, channels, heads, context_dim=None, groups=32, projection="conv"):
        super().__init__()
        if projection not in ("conv", "linear"):
            raise ValueError(f"projection is 'conv' or 'linear', not {projection!r}.")
        self.projection = projection
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        if projection == "conv":
            self.proj_in = nn.Conv2d(channels, channels, 1)
            self.proj_out = nn.Conv2d(channels, channels, 1)
        else:
            self.proj_in = nn.Linear(channels, channels)
            self.proj_out = nn.Linear(channels, channels)
        self.transformer_blocks = nn.ModuleList(
            [TransformerBlock(channels, heads, context_dim)]
        )

    def forward(self, x, context=None):
        """x (B, C, H, W), context (B, L, context_dim) or None -> (B, C, H, W)."""
        h, w = x.shape[-2:]
        tokens = self.norm(x)
        if self.projection == "conv":
            tokens = rearrange(self.proj_in(tokens), "b c h w -> b (h w) c")
        else:
            tokens = self.proj_in(rearrange(tokens, "b c h w -> b (h w) c"))
        for block in self.transformer_blocks:
            tokens = block(tokens, context)  # (B, H·W, C)
        if self.projection == "conv":
            out = self.proj_out(rearrange(tokens, "b (h w) c -> b c h w", h=h, w=w))
        else:
            out = rearrange(self.proj_out(tokens), "b (h w) c -> b c h w", h=h, w=w)
        return x + out


@contextlib.contextmanager
def record_attention(model: nn.Module, kind="cross"):
    """Keep the softmax maps of `model`'s attention layers while inside `with`.

    The recording layers compute softmax(Q Kᵀ/√d) explicitly instead of calling
    `F.scaled_dot_product_attention` (same result, slower), and store it.

    Args:
        model: any module containing `Attention` layers (e.g. a `UNet`).
        kind: "cross" (text attention, attn2), "self" (attn1) or "all".
    Yields:
        A dict from layer name (e.g. "mid_block.attentions.0.transformer_blocks.0
        .attn2") to a list with one (B, heads, H·W, L) map per forward call.
    """
    if kind not in ("cross", "self", "all"):
        raise ValueError(f"kind is 'cross', 'self' or 'all', not {kind!r}.")
    layers = {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, Attention)
        and (kind == "all" or module.is_cross == (kind == "cross"))
    }
    maps = {name: [] for name in layers}
    for name, layer in layers.items():
        layer.recorder = maps[name]
    try:
        yield maps
    finally:
        for layer in layers.values():
            layer.recorder = None
