"""Checks for the measuring exercises: an autoencoder's PSNR (lesson 08), the
Fréchet distance of two Gaussians, the CLIP score of embedding pairs and the
Inception Score of class posteriors (11)."""

import torch
import torch.nn.functional as F

from sdscratch.exercises.compare import call, check, generator
from sdscratch.metrics import (
    _sqrt_psd,
    clip_scores,
    frechet_distance_from_stats,
    inception_score,
)
from sdscratch.vae import psnr


def _gaussian(g, d):
    """A random mean (D,) and covariance (D, D), in float64."""
    a = torch.randn(d, 2 * d, generator=g, dtype=torch.float64)
    return torch.randn(d, generator=g, dtype=torch.float64), a @ a.T / (2 * d)


def check_frechet_from_stats(fn) -> None:
    """`fn(mu_a, cov_a, mu_b, cov_b) -> d2`: the Fréchet distance between
    N(mu_a, cov_a) and N(mu_b, cov_b), FID's formula: ‖μ_a − μ_b‖² + tr Σ_a +
    tr Σ_b − 2 tr((Σ_a Σ_b)^½). mu (D,), cov (D, D); a number or a 0-d tensor."""
    g = generator(19)

    def case(d):
        (mu_a, cov_a), (mu_b, cov_b) = _gaussian(g, d), _gaussian(g, d)
        want = frechet_distance_from_stats(mu_a, cov_a, mu_b, cov_b)
        traces = cov_a.trace() + cov_b.trace()
        product = torch.linalg.eigvals(cov_a @ cov_b).real  # the eigenvalues of Σ_a Σ_b
        cross = product.clamp(min=0).sqrt().sum()  # tr((Σ_a Σ_b)^½)
        squared = (mu_a - mu_b).square().sum()
        roots = (_sqrt_psd(cov_a) @ _sqrt_psd(cov_b)).trace()
        mistakes = {
            "the last term is −2 tr((Σ_a Σ_b)^½): the trace of the square root "
            "of the product, not of the product.":
                squared + traces - 2 * (cov_a @ cov_b).trace(),
            "the mean term is the squared distance ‖μ_a − μ_b‖².":
                squared.sqrt() + traces - 2 * cross,
            "the cross term has a factor 2: − 2 tr((Σ_a Σ_b)^½).":
                squared + traces - cross,
            "tr((Σ_a Σ_b)^½) is not tr(Σ_a^½ Σ_b^½) unless the covariances "
            "commute: take the eigenvalues of Σ_a^½ Σ_b Σ_a^½.":
                squared + traces - 2 * roots,
        }  # fmt: skip
        got, error = call(fn, mu_a, cov_a.clone(), mu_b, cov_b.clone())
        return got, error, want, mistakes

    return check("frechet_from_stats", [case(3), case(8)], atol=1e-8)


def check_clip_scores(fn) -> None:
    """`fn(image_embeds, text_embeds) -> scores`: the CLIP score of every pair
    (image i, text i), 100 · max(cos, 0) (Hessel et al. 2021, torchmetrics'
    scale); embeddings (B, E) of any length -> (B,)."""
    g = generator(20)

    def case():
        images = torch.randn(8, 16, generator=g) * 3
        sign = torch.tensor([1.0, -1.0]).repeat(4)[:, None]  # some pairs disagree
        texts = sign * images + torch.randn(8, 16, generator=g) * 2
        cos = F.cosine_similarity(images, texts, dim=-1)  # (B,)
        mistakes = {
            "the cosine divides the dot product by both norms (or normalise "
            "both embeddings first).":
                100 * (images * texts).sum(-1).clamp(min=0),
            "a negative cosine counts as 0: clamp each pair's cosine at 0.":
                100 * cos,
            "the score here is 100 · max(cos, 0), torchmetrics' scale.":
                cos.clamp(min=0),
        }  # fmt: skip
        got, error = call(fn, images.clone(), texts.clone())
        return got, error, clip_scores(images, texts), mistakes

    return check("clip_scores", [case(), case()], atol=1e-4)


def check_psnr_db(fn) -> None:
    """`fn(images, reconstructions) -> db`: the peak signal-to-noise ratio in dB
    of images in [-1, 1] over the whole batch, 10 · log10(range² / MSE) with the
    range 2, reconstructions clamped to [-1, 1] first (as they are shown)."""
    g = generator(24)

    def case(noise):
        images = torch.rand(4, 3, 8, 8, generator=g) * 2 - 1
        reconstructions = images + noise * torch.randn(4, 3, 8, 8, generator=g)
        mse = (reconstructions.clamp(-1, 1) - images).pow(2).mean()
        raw = (reconstructions - images).pow(2).mean()
        mistakes = {
            "the peak is the range of the pixel values, 2 for [-1, 1]: "
            "10 · log10(4 / MSE).": 10 * torch.log10(1 / mse),
            "clamp the reconstructions to [-1, 1] first, as they are shown.":
                10 * torch.log10(4 / raw),
            "20 · log10 goes with the RMS error: 20 · log10(2 / √MSE), which is "
            "10 · log10(4 / MSE).": 20 * torch.log10(2 / mse),
        }  # fmt: skip
        got, error = call(fn, images, reconstructions.clone())
        return got, error, torch.tensor(psnr(images, reconstructions)), mistakes

    return check("psnr_db", [case(0.05), case(0.3)], atol=1e-3)


def reference_inception_score(probs) -> torch.Tensor:
    """The package's Inception Score of (N, K) posteriors in one split, 0-d."""
    return torch.tensor(inception_score(probs, splits=1)[0], dtype=torch.float64)


def check_inception_score(fn) -> None:
    """`fn(probs) -> score`: the Inception Score of (N, K) class posteriors p(y|x)
    (rows sum to 1), in one split: exp(E_x KL(p(y|x) ‖ p(y))), p(y) the mean
    posterior; a number or a 0-d tensor. Rows may hold exact zeros (0 · log 0 = 0)."""
    g = generator(27)

    def case(n, k, sharpness, certain=False):
        logits = torch.randn(n, k, generator=g, dtype=torch.float64) * sharpness
        probs = logits.softmax(-1)
        if certain:  # one image sure of its class: zeros in its row
            probs[0] = F.one_hot(torch.tensor(1), k).double()
        marginal = probs.mean(0, keepdim=True)  # (1, K)
        kl = (torch.xlogy(probs, probs) - torch.xlogy(probs, marginal)).sum(1)  # (N,)
        reverse = (torch.xlogy(marginal, marginal) - marginal * probs.log()).sum(1)
        entropy = -torch.xlogy(probs, probs).sum(1)  # (N,) H(y|x)
        mistakes = {
            "the KL goes from each image's posterior to the marginal, "
            "KL(p(y|x) ‖ p(y)), not the other way round.": reverse.mean().exp(),
            "exponentiate the mean KL (exp of E_x), not average the "
            "exponentials.": kl.exp().mean(),
            "the score is exp(E_x KL): the mean KL alone is its log.": kl.mean(),
            "p(y) is the mean posterior over the images (dim 0), not over "
            "the classes.": (torch.xlogy(probs, probs) - torch.xlogy(
                probs, probs.mean(1, keepdim=True))).sum(1).mean().exp(),
            "IS = exp(H(y) − E_x H(y|x)): you returned the exp of the "
            "posteriors' mean entropy alone; subtract it from the marginal's "
            "entropy.": entropy.mean().exp(),
        }  # fmt: skip
        want = reference_inception_score(probs)
        got, error = call(fn, probs.clone())
        return got, error, want, mistakes

    return check(
        "inception_score",
        [case(64, 6, 3.0), case(40, 10, 1.0, certain=True)],
        atol=1e-6,
    )
