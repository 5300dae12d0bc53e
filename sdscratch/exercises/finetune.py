"""Checks for the fine-tuning exercises (lesson 12): textual inversion's embedding
swap, a LoRA layer's forward pass and its merge into the weight, and DreamBooth's
prior-preservation loss."""

import types

import torch
import torch.nn.functional as F
from torch import nn

from sdscratch.exercises.compare import call, check, generator, same
from sdscratch.lora import LoRALayer
from sdscratch.textual_inversion import NewTokens


def reference_swap_embeddings(embeddings, ids, new_ids, vectors):
    """The package's swap (`NewTokens`' hook): (B, L, D) table rows for the token
    ids (B, L), each new token's row (new_ids[j]) replaced by vectors[j]."""
    hook = types.SimpleNamespace(ids=list(new_ids), vectors=vectors)
    return NewTokens._put_in(hook, None, (ids,), embeddings)


def check_swap_embeddings(fn) -> None:
    """`fn(embeddings, ids, new_ids, vectors) -> (B, L, D)`: the token embedding
    table's output `embeddings` (B, L, D) for the token ids `ids` (B, L), with the
    row of every place holding the new token `new_ids[j]` replaced by `vectors[j]`
    (vectors (n, D), trainable: the result must pass their gradient on)."""
    g = generator(12)

    def case(vocab, count):
        ids = torch.randint(vocab, (3, 7), generator=g)  # (B, L)
        new_ids = list(range(vocab - count, vocab))
        ids[:, 2], ids[0, 5] = new_ids[0], new_ids[-1]  # every new token appears
        embeddings = torch.randn(3, 7, 6, generator=g)  # (B, L, D)
        vectors = torch.randn(count, 6, generator=g)
        want = reference_swap_embeddings(embeddings, ids, new_ids, vectors)
        is_new = torch.isin(ids, torch.tensor(new_ids))[..., None]  # (B, L, 1)
        mistakes = {
            "replace the new tokens' rows by their vectors; do not add them.":
                want + torch.where(is_new, embeddings, 0),
            "token new_ids[j] takes vectors[j]: each new token its own vector.":
                torch.where(is_new, vectors[0], embeddings),
            "keep the rows of every other token as the table gave them.":
                torch.where(is_new, want, 0),
        }  # fmt: skip
        mine = vectors.clone().requires_grad_(True)
        got, error = call(fn, embeddings.clone(), ids, new_ids, mine)
        if error is None and isinstance(got, torch.Tensor) and same(got.detach(), want):
            error = _no_gradient(got, mine)  # right values: do they train?
        if isinstance(got, torch.Tensor):
            got = got.detach()
        return got, error, want, mistakes

    check("swap_embeddings", [case(20, 1), case(30, 3), case(12, 2)])


def _no_gradient(result, vectors) -> str | None:
    """A sentence if the vectors get no gradient through `result`, else None."""
    if not result.requires_grad:
        return (
            "Not yet: the vectors are what trains, so the result must carry "
            "their gradient: build it from `vectors`, not from a detached copy."
        )
    try:
        result.sum().backward()
    except RuntimeError as error:
        return f"Not yet: backward through your result failed: {error}"
    if vectors.grad is None or vectors.grad.abs().sum() == 0:
        return "Not yet: the vectors get no gradient: build the result from them."
    return None


def _random_lora(g, features_in, features_out, rank, alpha):
    """A `LoRALayer` on a random linear layer, with A and B both random."""
    with torch.random.fork_rng():  # the default inits leave the global RNG as it was
        base = nn.Linear(features_in, features_out)
        layer = LoRALayer(base, rank, alpha)
    with torch.no_grad():
        for p in [*base.parameters(), *layer.parameters()]:
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return base, layer


def _lora_on(base, lora_A, lora_B, alpha) -> LoRALayer:
    """The package's `LoRALayer` on `base`, with the given A (r, in) and B (out, r)."""
    with torch.random.fork_rng():
        layer = LoRALayer(base, lora_A.shape[0], alpha)
    with torch.no_grad():
        layer.lora_A.weight.copy_(lora_A)
        layer.lora_B.weight.copy_(lora_B)
    return layer


def reference_lora_forward(x, base, lora_A, lora_B, alpha):
    """The package's LoRA layer output, base(x) + (α / r) · B A x."""
    return base(x) + _lora_on(base, lora_A, lora_B, alpha)(x)


def reference_merge_lora(weight, lora_A, lora_B, alpha):
    """The package's merged weight, W + ΔW (`LoRALayer.delta_weight`)."""
    with torch.random.fork_rng():
        base = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    return weight + _lora_on(base, lora_A, lora_B, alpha).delta_weight()


def check_lora_forward(fn) -> None:
    """`fn(x, base, lora_A, lora_B, alpha) -> (..., out)`: a LoRA layer's output,
    base(x) + (α / r) · B A x, for x (..., in), base an `nn.Linear(in, out)`,
    lora_A (r, in), lora_B (out, r) (Hu et al. 2021, §4.1)."""
    g = generator(13)

    def case(features_in, features_out, rank, alpha):
        base, layer = _random_lora(g, features_in, features_out, rank, alpha)
        x = torch.randn(2, 5, features_in, generator=g)
        a, b = layer.lora_A.weight.detach(), layer.lora_B.weight.detach()
        with torch.no_grad():
            want = base(x) + layer(x)
            change = x @ a.T @ b.T  # B A x, unscaled
            mistakes = {
                "scale the change by α / r.": base(x) + change,
                "the scale is α / r: divide α by the rank.": base(x) + alpha * change,
                "the scale is α / r, not r / α.": base(x) + rank / alpha * change,
                "add the change to the base layer's output W x + b.": want - base(x),
            }
            got, error = call(fn, x, base, a, b, alpha)
        return got, error, want, mistakes

    check("lora_forward", [case(8, 6, 2, 4.0), case(5, 5, 4, 1.0),
                           case(7, 3, 3, 6.0)])  # fmt: skip


def check_merge_lora(fn) -> None:
    """`fn(weight, lora_A, lora_B, alpha) -> (out, in)`: the weight with the LoRA
    merged in, W + (α / r) · B A, for weight (out, in), lora_A (r, in) and lora_B
    (out, r): a layer with it computes what base(x) + (α / r) · B A x did."""
    g = generator(14)

    def case(features_in, features_out, rank, alpha):
        base, layer = _random_lora(g, features_in, features_out, rank, alpha)
        a, b = layer.lora_A.weight.detach(), layer.lora_B.weight.detach()
        weight = base.weight.detach().clone()
        layer.merge()  # the package's merge, into base.weight
        want = base.weight.detach().clone()
        scale = alpha / rank
        mistakes = {
            "scale ΔW by α / r before adding it.": weight + b @ a,
            "merging adds ΔW to W: W + (α / r) B A.": weight - scale * b @ a,
            "the merged weight is W + ΔW, not ΔW alone.": scale * b @ a,
        }  # fmt: skip
        if features_in == features_out:  # (in, out) then looks like (out, in)
            hint = "ΔW = B A, (out, r) @ (r, in); Aᵀ Bᵀ is its transpose."
            mistakes[hint] = weight + scale * a.T @ b.T
        got, error = call(fn, weight.clone(), a, b, alpha)
        return got, error, want, mistakes

    check("merge_lora", [case(6, 6, 2, 4.0), case(5, 7, 3, 1.0),
                         case(4, 4, 4, 8.0)])  # fmt: skip


def reference_prior_preservation_loss(eps, noise, prior_eps, prior_noise, weight):
    """Ruiz et al. 2023, eq. 2: the denoising loss on the concept's examples plus
    λ times the one on the class images (as `sdscratch.finetune`'s loss)."""
    return F.mse_loss(eps, noise) + weight * F.mse_loss(prior_eps, prior_noise)


def check_prior_preservation_loss(fn) -> None:
    """`fn(eps, noise, prior_eps, prior_noise, prior_weight) -> ()`: DreamBooth's
    loss L = L_concept + λ · L_prior, each the mean squared error of the UNet's
    predicted noise (B, C, h, w) against the noise added, on the concept's
    examples and on the class images (Ruiz et al. 2023, eq. 2)."""
    g = generator(15)

    def case(weight, prior_batch):
        eps, noise = torch.randn(2, 4, 4, 8, 8, generator=g)
        prior_eps, prior_noise = torch.randn(2, prior_batch, 4, 8, 8, generator=g)
        concept = F.mse_loss(eps, noise)
        prior = F.mse_loss(prior_eps, prior_noise)
        want = reference_prior_preservation_loss(eps, noise, prior_eps, prior_noise,
                                                 weight)  # fmt: skip
        mistakes = {
            "λ weighs the prior term, L_concept + λ · L_prior.":
                weight * concept + prior,
            "multiply the prior term by λ (prior_weight).": concept + prior,
            "add the two losses; one mean over both batches weighs them by "
            "their sizes.": F.mse_loss(torch.cat([eps, prior_eps]),
                                       torch.cat([noise, prior_noise])),
            "each term is a mean over its elements, not a sum.":
                ((eps - noise) ** 2).sum() + weight * ((prior_eps - prior_noise)
                                                       ** 2).sum(),
        }  # fmt: skip
        got, error = call(fn, eps, noise, prior_eps, prior_noise, weight)
        return got, error, want, mistakes

    check("prior_preservation_loss", [case(1.0, 4), case(0.5, 4), case(2.0, 2)])
