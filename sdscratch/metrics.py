"""Measures of generated images that need no dataset of their own: FID, Inception
Score and CLIP score.

FID (Heusel et al. 2017) compares the distribution of generated images with real ones
through features of a trained network (Inception-v3's for photographs; on Shapes, the
judge's, `sdscratch.shapes.judge.image_features`). The Inception Score (Salimans et
al. 2016) looks at a classifier's class posteriors of the generated images alone (on
Shapes, the judge's: `sdscratch.shapes.evaluate.class_posteriors`). CLIP score
(Hessel et al. 2021) is the cosine similarity between an image and its prompt. What
needs the Shapes world (the judge, prompt accuracy, the evaluation prompts) is in
`sdscratch.shapes`.
"""

import functools

import torch
import torch.nn.functional as F

from sdscratch.clip import CLIP


def as_tensor(images) -> torch.Tensor:
    """A (B, 3, H, W) tensor in [-1, 1], or PIL images -> (B, 3, H, W) float."""
    if isinstance(images, torch.Tensor):
        return images.float()
    from sdscratch.viz import from_pil

    return from_pil(list(images))


# ----------------------------------------------------------------------------------
# FID: the Fréchet distance between Gaussians fitted to features


def frechet_distance(feats_a, feats_b) -> float:
    """FID: the Fréchet distance between Gaussians fitted to two sets of features.

    Heusel et al. 2017, eq. 6 (Dowson & Landau 1982):
        d² = ‖μ_a − μ_b‖² + tr(Σ_a) + tr(Σ_b) − 2 tr((Σ_a Σ_b)^½).
    Σ_a Σ_b is not symmetric, but it has the same eigenvalues as the symmetric
    positive semi-definite Σ_a^½ Σ_b Σ_a^½, so tr((Σ_a Σ_b)^½) is the sum of the
    square roots of that matrix's eigenvalues. All in float64; covariances are the
    unbiased ones (divided by N − 1), as in pytorch-fid and torchmetrics.

    Args:
        feats_a: (N, D) features of one set of images (tensor or array).
        feats_b: (M, D) features of the other.
    """
    a = torch.as_tensor(feats_a).to(torch.float64)
    b = torch.as_tensor(feats_b).to(torch.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(
            f"Features must be (N, D) and (M, D), got {a.shape} and {b.shape}."
        )
    if min(len(a), len(b)) < 2:
        raise ValueError("FID needs at least two images in each set.")
    mu_a, mu_b = a.mean(0), b.mean(0)  # (D,)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)  # (D, D)
    return frechet_distance_from_stats(mu_a, cov_a, mu_b, cov_b).item()


def frechet_distance_from_stats(mu_a, cov_a, mu_b, cov_b) -> torch.Tensor:
    """d² between N(mu_a, cov_a) and N(mu_b, cov_b), as `frechet_distance` says.

    Args:
        mu_a, mu_b: (D,) means.
        cov_a, cov_b: (D, D) covariances (symmetric, positive semi-definite).
    Returns:
        A 0-d tensor.
    """
    root_a = _sqrt_psd(cov_a)
    middle = root_a @ cov_b @ root_a
    eigenvalues = torch.linalg.eigvalsh((middle + middle.T) / 2)
    trace_root = eigenvalues.clamp(min=0).sqrt().sum()
    distance = (mu_a - mu_b).square().sum() + cov_a.trace() + cov_b.trace()
    return distance - 2 * trace_root


def _sqrt_psd(matrix: torch.Tensor) -> torch.Tensor:
    """The symmetric square root of a positive semi-definite matrix: V Λ^½ Vᵀ."""
    eigenvalues, eigenvectors = torch.linalg.eigh(matrix)
    roots = eigenvalues.clamp(min=0).sqrt()  # rounding can make 0 slightly negative
    return eigenvectors @ torch.diag(roots) @ eigenvectors.T


# ----------------------------------------------------------------------------------
# Inception Score: confident class posteriors, and many classes used


def inception_score(probs, splits=10) -> tuple[float, float]:
    """IS = exp(E_x KL(p(y|x) ‖ p(y))), its mean and standard deviation over splits.

    Salimans et al. 2016, section 4: high when each image's class posterior p(y|x)
    is confident (low entropy) and the marginal p(y) over the images is spread over
    many classes (high entropy); IS = exp(H(y) − E_x H(y|x)), between 1 (one class
    only, or no confident image) and K (K classes used equally, each image certain
    of its class). As the paper's code does, the images are cut into `splits`
    consecutive parts (the i-th from row i·N // splits), p(y) is each part's mean
    posterior, and the mean and the standard deviation (numpy's, ddof 0) of the
    parts' scores are returned. No real images enter: IS cannot see whether the
    images look like the data, only whether the classifier is sure of them and
    how evenly they cover the classes. All in float64; 0 · log 0 = 0.

    Args:
        probs: (N, K) class posteriors p(y|x), each row summing to 1 (tensor or
            array).
        splits: the number of parts (the paper's: 10), at most N.
    Returns:
        (mean, std) of the parts' scores.
    """
    p = torch.as_tensor(probs).to(torch.float64)
    if p.ndim != 2:
        raise ValueError(f"Class posteriors must be (N, K), got {tuple(p.shape)}.")
    if (p < 0).any() or not torch.allclose(p.sum(1), torch.ones(len(p)).double()):
        raise ValueError("Each row of class posteriors must be ≥ 0 and sum to 1.")
    if not 1 <= splits <= len(p):
        raise ValueError(f"splits must be from 1 to N = {len(p)}, got {splits}.")
    n, scores = len(p), []
    for i in range(splits):
        part = p[i * n // splits : (i + 1) * n // splits]  # (n / splits, K)
        marginal = part.mean(0, keepdim=True)  # (1, K): p(y)
        kl = (torch.xlogy(part, part) - torch.xlogy(part, marginal)).sum(1)  # (n/s,)
        scores.append(kl.mean().exp())
    scores = torch.stack(scores)
    return scores.mean().item(), scores.std(correction=0).item()


# ----------------------------------------------------------------------------------
# CLIP score


@functools.cache
def bundled_clip():
    """The bundled tiny CLIP (assets/models/shapes-clip), loaded once."""
    return CLIP.from_pretrained("shapes-clip")


@torch.no_grad()
def clip_score(images, texts, clip=None, batch_size=500) -> float:
    """CLIPScore: 100 · max(cos(image, text), 0), averaged over the pairs.

    Hessel et al. 2021, eq. 1, with w = 100 (as torchmetrics reports it, which
    clamps the average instead of each pair: the same while every cosine is
    positive). Reference-free: it needs no real images, only the prompts.

    Args:
        images: (B, 3, H, W) in [-1, 1], or B PIL images.
        texts: B prompts, text i for image i.
        clip: a `sdscratch.clip.CLIP` with its tokenizer (default: the bundled one).
    """
    clip = clip or bundled_clip()
    images = as_tensor(images)
    if len(images) != len(texts):
        raise ValueError(f"{len(images)} images but {len(texts)} texts.")
    device, size = clip.logit_scale.device, clip.image_encoder.config.image_size
    scores = []
    for i in range(0, len(images), batch_size):
        batch = images[i : i + batch_size].to(device)
        if batch.shape[-2:] != (size, size):
            batch = F.interpolate(batch, size=(size, size), mode="area")
        ids = clip.tokenizer(list(texts[i : i + batch_size])).to(device)
        embeds = clip.image_encoder(batch), clip.text_encoder.embed(ids)  # (b, E) each
        scores.append(clip_scores(*embeds))
    return torch.cat(scores).mean().item()


def clip_scores(image_embeds, text_embeds) -> torch.Tensor:
    """100 · max(cos(image i, text i), 0) for every pair (Hessel et al. 2021,
    eq. 1, with torchmetrics' w = 100).

    Args:
        image_embeds, text_embeds: (B, E) embeddings, of any length.
    Returns:
        (B,) scores in [0, 100].
    """
    cos = F.cosine_similarity(image_embeds, text_embeds, dim=-1)  # (B,)
    return 100 * cos.clamp(min=0)
