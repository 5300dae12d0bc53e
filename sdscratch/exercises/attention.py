"""Checks for the attention exercises beyond the formula: the text encoder's causal
mask (lesson 05); splitting the width into heads and a cross-attention layer's
forward pass from its parts (lesson 06)."""

import torch
import torch.nn.functional as F
from einops import rearrange

from sdscratch.attention import Attention, split_heads
from sdscratch.exercises.compare import call, check, generator


def check_split_heads(fn) -> None:
    """`fn(x, heads) -> x`: (B, N, h·d) -> (B, h, N, d), head i taking the i-th
    block of d channels (einops: "b n (h d) -> b h n d")."""
    g = generator(15)

    def case(heads, d):
        x = torch.randn(2, 5, heads * d, generator=g)
        b, n = x.shape[:2]
        mistakes = {
            "each head takes a block of d neighbouring channels: (h d), not "
            "(d h).": rearrange(x, "b n (d h) -> b h n d", h=heads),
            "a plain reshape mixes tokens into the heads: split the channels, "
            "then move the head axis before the tokens.":
                x.reshape(b, heads, n, d),
        }  # fmt: skip
        got, error = call(fn, x.clone(), heads)
        return got, error, split_heads(x, heads), mistakes

    return check("split_heads", [case(4, 8), case(2, 3)])


def _layer(g, dim, heads, context_dim):
    """A package `Attention` layer with seeded random weights."""
    with torch.random.fork_rng():  # the default init leaves the global RNG as it was
        layer = Attention(dim, heads, context_dim)
    with torch.no_grad():
        for parameter in layer.parameters():  # seeded, not the global RNG
            parameter.copy_(torch.randn(parameter.shape, generator=g) * 0.3)
    return layer


def reference_cross_attention(layer, x, context):
    """The solution of the `cross_attention` exercise: `Attention.forward`'s lines,
    reading only the layer's parts, so it serves any layer that has them."""
    q = split_heads(layer.to_q(x), layer.heads)  # (B, h, N, d)
    k = split_heads(layer.to_k(context), layer.heads)  # (B, h, L, d)
    v = split_heads(layer.to_v(context), layer.heads)
    out = F.scaled_dot_product_attention(q, k, v)  # (B, h, N, d)
    return layer.to_out(rearrange(out, "b h n d -> b n (h d)"))


def check_cross_attention(fn) -> None:
    """`fn(layer, x, context) -> out`: the forward pass of the package's
    `Attention` `layer` from its parts (to_q, to_k, to_v, to_out, heads): queries
    from the pixels x (B, N, dim), keys and values from the tokens context
    (B, L, context_dim), softmax(Q Kᵀ / √d) V in each head (d = dim / heads),
    heads merged back and projected by to_out: (B, N, dim)."""
    g = generator(16)

    def case(dim, heads, context_dim):
        layer = _layer(g, dim, heads, context_dim)
        x = torch.randn(2, 10, dim, generator=g)
        context = torch.randn(2, 7, context_dim, generator=g)

        def forward(scale_width=None, merge="b h n d -> b n (h d)", project=True):
            parts = (layer.to_q(x), layer.to_k(context), layer.to_v(context))
            q, k, v = (split_heads(part, heads) for part in parts)
            width = scale_width or q.shape[-1]
            weights = (q @ k.transpose(-1, -2) / width**0.5).softmax(dim=-1)
            out = rearrange(weights @ v, merge)  # (B, N, dim)
            return layer.to_out(out) if project else out

        with torch.no_grad():
            one_head = (layer.to_q(x) @ layer.to_k(context).transpose(-1, -2)
                        / dim**0.5).softmax(-1) @ layer.to_v(context)  # fmt: skip
            mistakes = {
                "project the merged heads back with layer.to_out.":
                    forward(project=False),
                "each head scales its scores by 1/√d, d = dim / heads, its own "
                "width, not the layer's.": forward(scale_width=dim),
                "merge the heads back as they were split: "
                "\"b h n d -> b n (h d)\".": forward(merge="b h n d -> b n (d h)"),
                "split q, k and v into layer.heads heads, and attend in each.":
                    layer.to_out(one_head),
            }  # fmt: skip
            got, error = call(fn, layer, x, context)
            want = Attention.forward(layer, x, context)
        return got, error, want, mistakes

    return check("cross_attention", [case(32, 4, 24), case(16, 2, 16)])


def reference_causal_softmax(scores):
    """The solution of the `causal_softmax` exercise, by PyTorch's causal attention
    (what the package's text encoder calls): with queries = the scores, keys =
    values = the identity and scale 1, its output is the attention weights."""
    eye = torch.eye(scores.shape[-1], dtype=scores.dtype).expand_as(scores)
    return F.scaled_dot_product_attention(scores, eye, eye, is_causal=True, scale=1.0)


def check_causal_softmax(fn) -> None:
    """`fn(scores) -> weights`: the causal attention weights of a text encoder, a
    softmax over the keys (the last axis) in which token i sees only tokens
    0 … i (the scores of later tokens set to −∞ first): (…, L, L) -> (…, L, L)."""
    g = generator(25)

    def case(length):
        scores = torch.randn(2, 3, length, length, generator=g) * 2  # (B, h, L, L)
        later = torch.ones(length, length, dtype=torch.bool).triu(1)
        earlier = torch.ones(length, length, dtype=torch.bool).tril(-1)
        diagonal = torch.eye(length, dtype=torch.bool)
        mistakes = {
            "mask the scores before the softmax, so that each row still sums "
            "to 1.": scores.softmax(-1).masked_fill(later, 0),
            "hide the later tokens, the upper triangle (torch.triu(…, 1)): token "
            "i sees 0 … i.": scores.masked_fill(earlier, float("-inf")).softmax(-1),
            "each token sees itself too: mask only j > i.":
                scores.masked_fill(later | diagonal, float("-inf")).softmax(-1)
                .nan_to_num(),
            "without the mask every token sees the whole prompt; in a causal "
            "encoder token i sees only tokens 0 … i.": scores.softmax(-1),
        }  # fmt: skip
        got, error = call(fn, scores.clone())
        return got, error, reference_causal_softmax(scores), mistakes

    return check("causal_softmax", [case(6), case(9)])
