"""Checks for the network exercises: the UNet's parts (its ResBlock, GEGLU), BPE,
CLIP's loss, attention, the autoencoder's posterior and FID's matrix square root
(lessons 03, 05, 06, 08, 11)."""

import math

import torch
import torch.nn.functional as F

from sdscratch.attention import attention_probs
from sdscratch.clip import contrastive_loss
from sdscratch.exercises.compare import call, check, generator
from sdscratch.layers import GEGLU, ResBlock, timestep_embedding
from sdscratch.metrics import _sqrt_psd
from sdscratch.tokenizer import merge_pair
from sdscratch.vae import DiagonalGaussian


def reference_timestep_embedding(t, dim):
    """The solution of the `timestep_embedding` exercise: the package's."""
    return timestep_embedding(t, dim)


def check_timestep_embedding(fn) -> None:
    """`fn(t, dim) -> features`: (B,) timesteps -> (B, dim), [cos(t ω), sin(t ω)]
    with ω_i = 10000^(-i / (dim/2)), i = 0 … dim/2 - 1 (SD's order: cos first)."""

    def case(t, dim):
        want = timestep_embedding(t, dim)
        half = dim // 2
        i = torch.arange(half, dtype=torch.float32)
        shifted = t[:, None].float() * torch.exp(-math.log(10000.0) * i / (half - 1))
        sin_first = torch.cat([want[:, half:], want[:, :half]], dim=-1)
        mistakes = {
            "Stable Diffusion puts the cosines first: cat([cos, sin]).": sin_first,
            "divide the exponent by dim/2, not dim/2 - 1 (SD's freq_shift = 0).":
                torch.cat([shifted.cos(), shifted.sin()], dim=-1),
        }  # fmt: skip
        got, error = call(fn, t, dim)
        return got, error, want, mistakes

    t = torch.tensor([0, 1, 10, 500, 999])
    # cos(t ω) at t ≈ 1000 in float32: the ways of writing ω differ by ~1e-4
    return check("timestep_embedding", [case(t, 32), case(t.flip(0), 320)], atol=1e-3)


def reference_resblock(block, x, time):
    """The solution of the `resblock` exercise: the package's `ResBlock.forward`,
    which reads only the block's parts, so it serves any block that has them."""
    return ResBlock.forward(block, x, time)


def check_resblock(fn) -> None:
    """`fn(block, x, time) -> h`: the forward pass of the package's `ResBlock`
    `block`, using its parts (norm1, conv1, time_emb_proj, norm2, conv2,
    conv_shortcut): GroupNorm → SiLU → conv, + projected SiLU(time), GroupNorm →
    SiLU → conv, plus the skip (through conv_shortcut when it is not None)."""
    g = generator(4)

    def case(c_in, c_out):
        block = ResBlock(c_in, c_out, time_dim=16, groups=4).eval()
        with torch.no_grad():
            for parameter in block.parameters():  # seeded, not the global RNG
                parameter.copy_(torch.randn(parameter.shape, generator=g) * 0.3)
        x = torch.randn(2, c_in, 8, 8, generator=g)
        time = torch.randn(2, 16, generator=g)

        def forward(time_activation, skip_too=True):
            h = block.conv1(F.silu(block.norm1(x)))
            h = h + block.time_emb_proj(time_activation(time))[:, :, None, None]
            h = block.conv2(F.silu(block.norm2(h)))
            skip = x if block.conv_shortcut is None else block.conv_shortcut(x)
            return skip + h if skip_too else h

        with torch.no_grad():
            mistakes = {
                "add the skip connection: the block returns skip + h.":
                    forward(F.silu, skip_too=False),
                "the time vector goes through SiLU before time_emb_proj.":
                    forward(lambda time: time),
            }  # fmt: skip
            got, error = call(fn, block, x, time)
            want = block(x, time)
        return got, error, want, mistakes

    return check("resblock", [case(8, 8), case(8, 16)])


def reference_merge_pair(symbols, pair):
    """The solution of the `merge_pair` exercise: the package's."""
    return merge_pair(symbols, pair)


def check_merge_pair(fn) -> None:
    """`fn(symbols, pair) -> symbols`: one BPE merge, every occurrence of the
    adjacent `pair` (left to right, not overlapping) joined into one symbol."""

    def first_only(symbols, pair):
        for i in range(len(symbols) - 1):
            if (symbols[i], symbols[i + 1]) == pair:
                return symbols[:i] + [symbols[i] + symbols[i + 1]] + symbols[i + 2 :]
        return symbols

    def case(word, pair):
        symbols = list(word)
        mistakes = {
            "merge every occurrence of the pair, not only the first.":
                first_only(symbols, pair),
        }  # fmt: skip
        got, error = call(fn, list(symbols), pair)
        return got, error, merge_pair(symbols, pair), mistakes

    words = [("banana", ("a", "n")), ("aaaa", ("a", "a")), ("circle", ("x", "y")),
             ("cc", ("c", "c"))]  # fmt: skip
    return check("merge_pair", [case(word, pair) for word, pair in words])


def reference_contrastive_loss(logits):
    """The solution of the `contrastive_loss` exercise: the package's."""
    return contrastive_loss(logits)


def check_contrastive_loss(fn) -> None:
    """`fn(logits) -> loss`: CLIP's symmetric cross-entropy over a (B, B) matrix of
    scaled similarities, image i belonging with text i: the mean of the
    image→text and text→image cross-entropies (a 0-d tensor)."""
    g = generator(5)

    def case():
        logits = torch.randn(6, 6, generator=g) * 3
        target = torch.arange(6)
        image_to_text = F.cross_entropy(logits, target)
        wrong = target.flip(0)
        wrong_targets = (
            F.cross_entropy(logits, wrong) + F.cross_entropy(logits.T, wrong)
        ) / 2
        mistakes = {
            "CLIP's loss is symmetric: average the image→text and text→image "
            "cross-entropies (the second over logits.T).": image_to_text,
            "the right caption of image i is text i: targets are 0 … B-1.":
                wrong_targets,
        }  # fmt: skip
        got, error = call(fn, logits)
        return got, error, contrastive_loss(logits), mistakes

    return check("contrastive_loss", (case() for _ in range(3)))


def check_attention(fn) -> None:
    """`fn(q, k, v) -> out`: softmax(Q Kᵀ / √d) V for q (B, N, d), k and v
    (B, L, d): (B, N, d)."""
    g = generator(6)

    def case(d):
        q, k = torch.randn(2, 5, d, generator=g), torch.randn(2, 7, d, generator=g)
        v = torch.randn(2, 7, d, generator=g)
        scores = q @ k.transpose(-1, -2)  # (B, N, L)
        mistakes = {
            "scale the scores by 1/√d before the softmax.": scores.softmax(-1) @ v,
            "scale by 1/√d, not 1/d.": (scores / d).softmax(-1) @ v,
            "the softmax runs over the keys (the last axis), so each query's "
            "weights sum to 1.": (scores * d**-0.5).softmax(-2) @ v,
        }
        got, error = call(fn, q, k, v)
        return got, error, attention_probs(q, k) @ v, mistakes

    return check("attention", [case(16), case(64)])


def _posterior(g):
    """A random mean and log-variance (B, C, h, w), and the package's posterior."""
    mean, logvar = (
        torch.randn(3, 4, 4, 4, generator=g),
        torch.randn(3, 4, 4, 4, generator=g),
    )
    return mean, logvar, DiagonalGaussian(torch.cat([mean, logvar], dim=1))


def reference_reparameterize(mean, logvar, noise):
    """The solution of the `reparameterize` exercise: z = μ + exp(½ logvar) ε."""
    return mean + torch.exp(0.5 * logvar) * noise


def check_reparameterize(fn) -> None:
    """`fn(mean, logvar, noise) -> z`: the reparameterisation trick (Kingma &
    Welling 2014, §2.4), z = mean + σ ε with σ = exp(½ logvar)."""
    g = generator(8)

    def case():
        mean, logvar, posterior = _posterior(g)
        seed = int(torch.randint(0, 2**31, (1,), generator=g))
        noise = torch.randn(mean.shape, generator=generator(seed))
        mistakes = {
            "multiply the noise by the standard deviation exp(½ logvar), not the "
            "variance exp(logvar).": mean + logvar.exp() * noise,
            "logvar is a log: the standard deviation is exp(½ logvar).":
                mean + 0.5 * logvar * noise,
        }  # fmt: skip
        got, error = call(fn, mean, logvar, noise)
        return got, error, posterior.sample(generator(seed)), mistakes

    return check("reparameterize", (case() for _ in range(3)))


def reference_kl(mean, logvar):
    """The solution of the `kl` exercise: ½ Σ (μ² + σ² − 1 − log σ²) per image."""
    return 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).sum(dim=(1, 2, 3))


def check_kl(fn) -> None:
    """`fn(mean, logvar) -> kl`: KL(N(mean, exp(logvar)) ‖ N(0, I)) per image,
    ½ Σ (μ² + σ² − 1 − log σ²) summed over (C, h, w): shape (B,)."""
    g = generator(9)

    def case():
        mean, logvar, posterior = _posterior(g)
        terms = mean.pow(2) + logvar.exp() - 1 - logvar
        plus_logvar = mean.pow(2) + logvar.exp() - 1 + logvar
        mistakes = {
            "the KL has a factor ½ in front of the sum.": terms.sum(dim=(1, 2, 3)),
            "sum over the latent's (C, h, w), do not average.":
                0.5 * terms.mean(dim=(1, 2, 3)),
            "the last term is − log σ², minus logvar.":
                0.5 * plus_logvar.sum(dim=(1, 2, 3)),
        }  # fmt: skip
        got, error = call(fn, mean, logvar)
        return got, error, posterior.kl(), mistakes

    return check("kl", (case() for _ in range(3)))


def reference_matrix_sqrt(matrix):
    """The solution of the `matrix_sqrt` exercise: V Λ^½ Vᵀ."""
    eigenvalues, eigenvectors = torch.linalg.eigh(matrix)
    roots = eigenvalues.clamp(min=0).sqrt()  # rounding can make 0 slightly negative
    return eigenvectors @ torch.diag(roots) @ eigenvectors.T


def check_matrix_sqrt(fn) -> None:
    """`fn(matrix) -> root`: the symmetric square root of a (D, D) symmetric
    positive semi-definite matrix (root @ root = matrix), as FID needs it;
    through the eigendecomposition V Λ^½ Vᵀ."""
    g = generator(11)

    def case(d):
        a = torch.randn(d, 2 * d, generator=g, dtype=torch.float64)
        matrix = a @ a.T / (2 * d)  # a covariance: symmetric, positive definite
        entrywise = matrix.abs().sqrt() * matrix.sign()
        mistakes = {
            "that is the square root of each entry; the matrix square root "
            "satisfies root @ root = matrix (use torch.linalg.eigh).": entrywise,
            "that is the Cholesky factor L (L Lᵀ = matrix); FID needs the "
            "symmetric root, V Λ^½ Vᵀ.": torch.linalg.cholesky(matrix),
        }
        got, error = call(fn, matrix)
        return got, error, _sqrt_psd(matrix), mistakes

    return check("matrix_sqrt", [case(3), case(8)])


def check_geglu(fn) -> None:
    """`fn(layer, x) -> h`: the forward pass of the package's `GEGLU` `layer` from
    its projection `layer.proj` (dim -> 2·hidden): split the projection into a
    value and a gate (in that order, on the last axis), value · GELU(gate)."""
    g = generator(23)

    def case(dim, hidden):
        with torch.random.fork_rng():  # the default init leaves the global RNG as is
            layer = GEGLU(dim, hidden)
        with torch.no_grad():
            for parameter in layer.parameters():  # seeded, not the global RNG
                parameter.copy_(torch.randn(parameter.shape, generator=g))
            x = torch.randn(2, 5, dim, generator=g)
            value, gate = layer.proj(x).chunk(2, dim=-1)
            mistakes = {
                "the GELU goes on the gate, the second half: value · GELU(gate).":
                    F.gelu(value) * gate,
                "gate the value: multiply it by GELU(gate), do not add.":
                    value + F.gelu(gate),
            }  # fmt: skip
            got, error = call(fn, layer, x)
            want = layer(x)
        return got, error, want, mistakes

    return check("geglu", [case(8, 16), case(6, 4)])
