"""The exercise checks: a right answer passes, the usual wrong answers fail with
their hint, an unfinished one says so, and none of them raises.

Every answer here is written as a learner would write it, from the formula, not by
calling the package: so these tests check the checks, and the package with them.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange

from sdscratch import exercises

# ----------------------------------------------------------------------------------
# Right answers, from the formulas


def add_noise(x0, noise, t, alphas_cumprod):
    abar = alphas_cumprod[t].reshape(-1, 1, 1, 1)
    return abar.sqrt() * x0 + (1 - abar).sqrt() * noise


def snr(alphas_cumprod):
    return alphas_cumprod / (1 - alphas_cumprod)


def noisy(x0, noise, t, alphas_cumprod):
    """x_t for x0 of any shape (B, ...)."""
    abar = alphas_cumprod[t].reshape(-1, *[1] * (x0.ndim - 1))
    return abar.sqrt() * x0 + (1 - abar).sqrt() * noise


def diffusion_loss(eps_model, x0, t, noise, alphas_cumprod):
    return ((eps_model(noisy(x0, noise, t, alphas_cumprod), t) - noise) ** 2).mean()


def ddpm_step(x, eps, abar, abar_prev, z):
    alpha = abar / abar_prev
    beta = 1 - alpha
    x0 = (x - math.sqrt(1 - abar) * eps) / math.sqrt(abar)
    mean = math.sqrt(abar_prev) * beta / (1 - abar) * x0
    mean = mean + math.sqrt(alpha) * (1 - abar_prev) / (1 - abar) * x
    return mean + math.sqrt((1 - abar_prev) / (1 - abar) * beta) * z


def ddim_step(x, eps, abar, abar_prev):
    x0 = (x - math.sqrt(1 - abar) * eps) / math.sqrt(abar)
    return math.sqrt(abar_prev) * x0 + math.sqrt(1 - abar_prev) * eps


def karras_sigmas(sigma_min, sigma_max, n, rho=7.0):
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    low, high = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (high + ramp * (low - high)) ** rho


def timestep_embedding(t, dim):
    half = dim // 2
    freqs = 10000.0 ** (-torch.arange(half) / half)
    angles = t[:, None].float() * freqs
    return torch.cat([angles.cos(), angles.sin()], dim=-1)


def resblock(block, x, time):
    h = block.conv1(F.silu(block.norm1(x)))
    h = h + block.time_emb_proj(F.silu(time))[:, :, None, None]
    h = block.conv2(F.silu(block.norm2(h)))
    return (x if block.conv_shortcut is None else block.conv_shortcut(x)) + h


def merge_pair(symbols, pair):
    out, i = [], 0
    while i < len(symbols):
        if tuple(symbols[i : i + 2]) == pair:
            out.append(symbols[i] + symbols[i + 1])
            i += 2
        else:
            out.append(symbols[i])
            i += 1
    return out


def contrastive_loss(logits):
    target = torch.arange(len(logits))
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def attention(q, k, v):
    weights = (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).softmax(dim=-1)
    return weights @ v


def guidance(eps_uncond, eps_text, w):
    return eps_uncond + w * (eps_text - eps_uncond)


def reparameterize(mean, logvar, noise):
    return mean + torch.exp(0.5 * logvar) * noise


def kl(mean, logvar):
    return 0.5 * (mean**2 + logvar.exp() - 1 - logvar).sum(dim=(1, 2, 3))


def img2img_start(steps, strength):
    return steps - min(int(steps * strength), steps)


def inpaint_blend(latents, known, mask):
    return mask * latents + (1 - mask) * known


def matrix_sqrt(matrix):
    values, vectors = torch.linalg.eigh(matrix)
    return vectors @ torch.diag(values.clamp(min=0).sqrt()) @ vectors.T


def encode_latents(vae, images, generator):
    return vae.encode(images).sample(generator) * vae.config.scaling_factor


def min_snr_weight(snr, gamma):
    return torch.minimum(snr, torch.full_like(snr, gamma)) / snr


def ema_update(average, weight, decay):
    return decay * average + (1 - decay) * weight


def split_heads(x, heads):
    return rearrange(x, "b n (h d) -> b h n d", h=heads)


def merged_heads(layer, x, context):
    q = split_heads(layer.to_q(x), layer.heads)
    k = split_heads(layer.to_k(context), layer.heads)
    v = split_heads(layer.to_v(context), layer.heads)
    return rearrange(attention(q, k, v), "b h n d -> b n (h d)")


def cross_attention(layer, x, context):
    return layer.to_out(merged_heads(layer, x, context))


def guided_noise(unet, x, t, context, uncond_context, w):
    both = unet(torch.cat([x, x]), torch.cat([t, t]),
                torch.cat([uncond_context, context]))  # fmt: skip
    eps_uncond, eps_text = both.chunk(2)
    return guidance(eps_uncond, eps_text, w)


def rescale_guidance(guided, eps_text, phi):
    dims = (1, 2, 3)
    ratio = eps_text.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True)
    return phi * guided * ratio + (1 - phi) * guided


def frechet_from_stats(mu_a, cov_a, mu_b, cov_b):
    root_a = matrix_sqrt(cov_a)
    values = torch.linalg.eigvalsh(root_a @ cov_b @ root_a)
    means = ((mu_a - mu_b) ** 2).sum()
    return means + cov_a.trace() + cov_b.trace() - 2 * values.clamp(min=0).sqrt().sum()


def clip_scores(image_embeds, text_embeds):
    image_embeds = image_embeds / image_embeds.norm(dim=-1, keepdim=True)
    text_embeds = text_embeds / text_embeds.norm(dim=-1, keepdim=True)
    return 100 * (image_embeds * text_embeds).sum(-1).clamp(min=0)


def inception_score(probs):
    marginal = probs.mean(0, keepdim=True)  # (1, K)
    kl = (torch.xlogy(probs, probs) - torch.xlogy(probs, marginal)).sum(1)
    return kl.mean().exp()


def scaled_linear_betas(beta_start, beta_end, num_timesteps):
    return torch.linspace(beta_start**0.5, beta_end**0.5, num_timesteps) ** 2


def predict_x0(x, eps, abar):
    return (x - math.sqrt(1 - abar) * eps) / math.sqrt(abar)


def sigmas(alphas_cumprod):
    return ((1 - alphas_cumprod) / alphas_cumprod).sqrt()


def geglu(layer, x):
    value, gate = layer.proj(x).chunk(2, dim=-1)
    return value * F.gelu(gate)


def causal_softmax(scores):
    length = scores.shape[-1]
    later = torch.ones(length, length, dtype=torch.bool).triu(1)
    return scores.masked_fill(later, float("-inf")).softmax(dim=-1)


def psnr_db(images, reconstructions):
    mse = ((reconstructions.clamp(-1, 1) - images) ** 2).mean()
    return 10 * math.log10(4 / mse.item())


def downsample_mask(mask, factor):
    return F.max_pool2d(mask, factor)


def rank_batch(order, step, rank, processes, batch_size):
    start = (step * processes + rank) * batch_size
    return order[start : start + batch_size]


def shard_split(shards, rank, processes, worker, workers):
    mine = [s for i, s in enumerate(shards) if i % processes == rank]
    return [s for i, s in enumerate(mine) if i % workers == worker]


def mean_gradient(grads, counts):
    return (grads * counts[:, None]).sum(0) / counts.sum()


def weighted_sum(a, b, alpha):
    return {
        key: ((1 - alpha) * x + alpha * b[key]).to(x.dtype)
        if x.is_floating_point()
        else x.clone()
        for key, x in a.items()
    }


def add_difference(a, b, c, alpha):
    return {
        key: (x + alpha * (b[key] - c[key])).to(x.dtype)
        if x.is_floating_point()
        else x.clone()
        for key, x in a.items()
    }


def mix_everything(a, b, alpha):  # integer position ids averaged, then truncated
    return {key: ((1 - alpha) * x + alpha * b[key]).to(x.dtype) for key, x in a.items()}


def esd_target(frozen, x_t, t, context, anchor_context, eta):
    eps_anchor = frozen(x_t, t, anchor_context)
    return eps_anchor - eta * (frozen(x_t, t, context) - eps_anchor)


def decide(image_embeds, concept_embeds, thresholds):
    cos = F.normalize(image_embeds, dim=-1) @ F.normalize(concept_embeds, dim=-1).T
    scores = (cos - thresholds).round(decimals=3)
    return scores, (scores > 0).any(1)


def resblock_parameters(in_channels, out_channels, time_dim):
    convs = 9 * in_channels * out_channels + 9 * out_channels * out_channels
    count = convs + 2 * out_channels  # two 3×3 convolutions, with their biases
    count += 2 * in_channels + 2 * out_channels  # two GroupNorms: scale and shift
    count += time_dim * out_channels + out_channels  # the time projection
    if in_channels != out_channels:
        count += in_channels * out_channels + out_channels  # the 1×1 shortcut
    return count


def bytes_in(model, dtype):
    return sum(p.numel() for p in model.parameters()) * torch.finfo(dtype).bits // 8


def compvis_name(key, layers_per_block, renames, first=1):
    side, level, _, index, rest = key.split(".", 4)
    part, end = rest.rsplit(".", 1)
    slots = layers_per_block + 1
    if side == "down_blocks":
        row = f"input_blocks.{first + int(level) * slots + int(index)}"
    else:
        row = f"output_blocks.{int(level) * slots + int(index)}"
    return f"model.diffusion_model.{row}.0.{renames[part]}.{end}"


def zero_conv(in_channels, out_channels):
    conv = torch.nn.Conv2d(in_channels, out_channels, 1)
    torch.nn.init.zeros_(conv.weight)
    torch.nn.init.zeros_(conv.bias)
    return conv


def add_control_residuals(skips, mid, down_residuals, mid_residual, scale):
    skips = [skip + scale * residual for skip, residual in zip(skips, down_residuals)]
    return skips, mid + scale * mid_residual


def guidance_window(num_steps, start, end):
    i = torch.arange(num_steps)
    return ((i / num_steps >= start) & ((i + 1) / num_steps <= end)).float()


def random_conv(in_channels, out_channels):
    conv = torch.nn.Conv2d(in_channels, out_channels, 1)
    torch.nn.init.zeros_(conv.bias)
    return conv


def zero_weight_only(in_channels, out_channels):
    conv = torch.nn.Conv2d(in_channels, out_channels, 1)
    torch.nn.init.zeros_(conv.weight)
    return conv


def swap_embeddings(embeddings, ids, new_ids, vectors):
    out = embeddings.clone()
    for j, i in enumerate(new_ids):
        out = torch.where((ids == i)[..., None], vectors[j], out)
    return out


def lora_forward(x, base, lora_A, lora_B, alpha):
    return base(x) + alpha / lora_A.shape[0] * (x @ lora_A.T @ lora_B.T)


def merge_lora(weight, lora_A, lora_B, alpha):
    return weight + alpha / lora_A.shape[0] * lora_B @ lora_A


def prior_preservation_loss(eps, noise, prior_eps, prior_noise, prior_weight):
    return F.mse_loss(eps, noise) + prior_weight * F.mse_loss(prior_eps, prior_noise)


def swap_in_place(embeddings, ids, new_ids, vectors):
    for j, i in enumerate(new_ids):
        embeddings[ids == i] = vectors[j].detach()
    return embeddings


RIGHT = {
    "weighted_sum": weighted_sum, "add_difference": add_difference,
    "esd_target": esd_target, "decide": decide,
    "add_noise": add_noise, "snr": snr, "diffusion_loss": diffusion_loss,
    "ddpm_step": ddpm_step, "ddim_step": ddim_step, "karras_sigmas": karras_sigmas,
    "timestep_embedding": timestep_embedding, "resblock": resblock,
    "merge_pair": merge_pair, "contrastive_loss": contrastive_loss,
    "attention": attention, "guidance": guidance, "reparameterize": reparameterize,
    "kl": kl, "img2img_start": img2img_start, "inpaint_blend": inpaint_blend,
    "matrix_sqrt": matrix_sqrt, "encode_latents": encode_latents,
    "min_snr_weight": min_snr_weight, "ema_update": ema_update,
    "split_heads": split_heads, "cross_attention": cross_attention,
    "guided_noise": guided_noise, "rescale_guidance": rescale_guidance,
    "frechet_from_stats": frechet_from_stats, "clip_scores": clip_scores,
    "inception_score": inception_score,
    "scaled_linear_betas": scaled_linear_betas, "predict_x0": predict_x0,
    "sigmas": sigmas, "geglu": geglu, "causal_softmax": causal_softmax,
    "psnr_db": psnr_db, "downsample_mask": downsample_mask,
    "rank_batch": rank_batch, "shard_split": shard_split,
    "mean_gradient": mean_gradient,
    "resblock_parameters": resblock_parameters, "bytes_in": bytes_in,
    "compvis_name": compvis_name, "zero_conv": zero_conv,
    "add_control_residuals": add_control_residuals,
    "guidance_window": guidance_window, "swap_embeddings": swap_embeddings,
    "lora_forward": lora_forward, "merge_lora": merge_lora,
    "prior_preservation_loss": prior_preservation_loss,
}  # fmt: skip

# ----------------------------------------------------------------------------------
# Wrong answers a learner writes, and a word of the hint each must get

WRONG = [
    ("weighted_sum", mix_everything, "never mix"),
    ("weighted_sum", lambda a, b, al: {k: (1 - al) * x + al * b[k]
                                      for k, x in a.items()}, "indices"),
    ("weighted_sum", lambda a, b, al: weighted_sum(a, b, 1 - al), "B's share"),
    ("weighted_sum", lambda a, b, al: add_difference(a, b, {k: 0 * x for k, x in
                                                            b.items()}, al), "add up"),
    ("add_difference", lambda a, b, c, al: add_difference(a, c, b, al), "B − C"),
    ("add_difference", lambda a, b, c, al: add_difference(a, b, c, 1.0), "by α"),
    ("add_difference", lambda a, b, c, al: {k: (x + al * (b[k] - c[k])).to(x.dtype)
                                            for k, x in a.items()}, "never mix"),
    ("esd_target", lambda f, x, t, c, a, e: esd_target(f, x, t, c, a, -e),
     "do not add"),
    ("esd_target", lambda f, x, t, c, a, e: f(x, t, c) - e * (f(x, t, c)
                                                        - f(x, t, a)), "anchor's"),
    ("esd_target", lambda f, x, t, c, a, e: esd_target(f, x, t, c, a, 1.0), "by η"),
    ("decide", lambda i, c, th: (decide(i, c, th)[0], (decide(i, c, th)[0] >= 0)
                                 .any(1)), "exactly 0"),
    ("decide", lambda i, c, th: (decide(i, c, th)[0], (decide(i, c, th)[0] > 0)
                                 .all(1)), "*any*"),
    ("decide", lambda i, c, th: ((i @ c.T - th).round(decimals=3), None),
     "dot product"),
    ("decide", lambda i, c, th: ((F.normalize(i, dim=-1) @ F.normalize(c, dim=-1).T)
                                 .round(decimals=3), None), "each concept's own"),
    ("add_noise", lambda x0, n, t, ac: ac[t].reshape(-1, 1, 1, 1) * x0
     + (1 - ac[t].reshape(-1, 1, 1, 1)) * n, "square roots"),
    ("add_noise", lambda x0, n, t, ac: add_noise(x0, n, t - 1, ac), "[t - 1]"),
    ("snr", lambda ac: (1 - ac) / ac, "noise-to-signal"),
    ("snr", lambda ac: (ac / (1 - ac)).sqrt(), "square root"),
    ("diffusion_loss", lambda m, x0, t, n, ac: ((m(noisy(x0, n, t, ac), t) - x0)
                                                ** 2).mean(), "target"),
    ("diffusion_loss", lambda m, x0, t, n, ac: diffusion_loss(m, x0, t, n, ac)
     * x0.numel(), "sum"),
    ("ddpm_step", lambda x, e, a, ap, z: ddpm_step(x, e, a, ap, 0 * z)
     + math.sqrt(1 - a / ap) * z, "β̃"),
    ("ddpm_step", lambda x, e, a, ap, z: ddpm_step(x, e, a, ap, 0 * z), "fresh noise"),
    ("ddim_step", lambda x, e, a, ap: math.sqrt(ap) * (x - math.sqrt(1 - a) * e)
     / math.sqrt(a) + math.sqrt(1 - a) * e, "next level"),
    ("karras_sigmas", lambda lo, hi, n, rho=7.0: karras_sigmas(lo, hi, n).flip(0),
     "σ_max down"),
    ("karras_sigmas", lambda lo, hi, n, rho=7.0: torch.linspace(
        hi, lo, n, dtype=torch.float64), "evenly in σ^(1/ρ)"),
    ("timestep_embedding", lambda t, d: timestep_embedding(t, d).roll(d // 2, -1),
     "cosines first"),
    ("resblock", lambda b, x, tm: resblock(b, x, tm) - (
        x if b.conv_shortcut is None else b.conv_shortcut(x)), "skip"),
    ("merge_pair", lambda s, p: merge_pair(s[:3], p) + s[3:] if len(s) > 3 else
     merge_pair(s, p), "every occurrence"),
    ("contrastive_loss", lambda lg: F.cross_entropy(lg, torch.arange(len(lg))),
     "symmetric"),
    ("attention", lambda q, k, v: (q @ k.transpose(-1, -2)).softmax(-1) @ v, "1/√d"),
    ("attention", lambda q, k, v: (q @ k.transpose(-1, -2) / q.shape[-1]).softmax(-1)
     @ v, "not 1/d"),
    ("guidance", lambda u, c, w: w * (c - u), "starts from ε_∅"),
    ("guidance", lambda u, c, w: c + w * (u - c), "push towards"),
    ("reparameterize", lambda m, lv, n: m + lv.exp() * n, "not the variance"),
    ("kl", lambda m, lv: (m**2 + lv.exp() - 1 - lv).sum(dim=(1, 2, 3)), "½"),
    ("kl", lambda m, lv: 0.5 * (m**2 + lv.exp() - 1 - lv).mean(dim=(1, 2, 3)),
     "do not average"),
    ("img2img_start", lambda s, st: min(int(s * st), s), "where the run starts"),
    ("img2img_start", lambda s, st: s - min(round(s * st), s), "round down"),
    ("inpaint_blend", lambda lat, known, m: m * known + (1 - m) * lat, "repaint"),
    ("matrix_sqrt", lambda a: a.abs().sqrt() * a.sign(), "each entry"),
    ("matrix_sqrt", lambda a: torch.linalg.cholesky(a), "Cholesky"),
    ("encode_latents", lambda vae, im, g: vae.encode(im).sample(g), "scaling_factor"),
    ("encode_latents", lambda vae, im, g: vae.encode(im).mean
     * vae.config.scaling_factor, "not its mean"),
    ("encode_latents", lambda vae, im, g: vae.encode(im).sample(g)
     / vae.config.scaling_factor, "decoder's side"),
    ("min_snr_weight", lambda snr, gamma: snr.clamp(max=gamma), "divide by SNR_t"),
    ("min_snr_weight", lambda snr, gamma: snr.clamp(max=gamma) / (snr + 1),
     "v-prediction"),
    ("min_snr_weight", lambda snr, gamma: snr / snr.clamp(max=gamma), "on top"),
    ("ema_update", lambda avg, w, decay: decay * w + (1 - decay) * avg,
     "keeps `decay` of itself"),
    ("ema_update", lambda avg, w, decay: decay * avg + w, "add up to 1"),
    ("split_heads", lambda x, h: rearrange(x, "b n (d h) -> b h n d", h=h),
     "(h d), not (d h)"),
    ("split_heads", lambda x, h: x.reshape(len(x), h, x.shape[1], -1),
     "plain reshape"),
    ("cross_attention", lambda layer, x, c: merged_heads(layer, x, c), "to_out"),
    ("cross_attention", lambda layer, x, c: layer.to_out(attention(
        layer.to_q(x), layer.to_k(c), layer.to_v(c))), "layer.heads heads"),
    ("guided_noise", lambda unet, x, t, c, u, w: guided_noise(unet, x, t, u, c, w),
     "order they were stacked"),
    ("guided_noise", lambda unet, x, t, c, u, w: guidance(
        unet(x, t, u), unet(x, t, c), w), "call the UNet once"),
    ("rescale_guidance", lambda g, e, phi: phi * g * e.std() / g.std()
     + (1 - phi) * g, "per sample"),
    ("rescale_guidance", lambda g, e, phi: rescale_guidance(g, e, 1.0),
     "blend the two"),
    ("frechet_from_stats", lambda ma, ca, mb, cb: ((ma - mb) ** 2).sum() + ca.trace()
     + cb.trace() - 2 * (ca @ cb).trace(), "not of the product"),
    ("frechet_from_stats", lambda ma, ca, mb, cb: ((ma - mb) ** 2).sum() + ca.trace()
     + cb.trace() - 2 * (matrix_sqrt(ca) @ matrix_sqrt(cb)).trace(), "commute"),
    ("clip_scores", lambda i, t: 100 * F.cosine_similarity(i, t, dim=-1), "clamp"),
    ("clip_scores", lambda i, t: 100 * (i * t).sum(-1).clamp(min=0), "both norms"),
    ("inception_score", lambda p: (torch.xlogy(p, p) - torch.xlogy(p, p.mean(
        0, keepdim=True))).sum(1).exp().mean(), "exponentiate the mean"),
    ("inception_score", lambda p: (p.mean(0) * (p.mean(0).log() - p.log())).sum(
        1).mean().exp(), "not the other way round"),
    ("inception_score", lambda p: inception_score(p).log(), "its log"),
    ("inception_score", lambda p: (torch.xlogy(p, p) - torch.xlogy(p, p.mean(
        1, keepdim=True))).sum(1).mean().exp(), "over the images"),
    ("scaled_linear_betas", lambda b0, b1, n: torch.linspace(b0, b1, n), "linear"),
    ("scaled_linear_betas", lambda b0, b1, n: torch.linspace(b0**0.5, b1**0.5, n),
     "square the linspace"),
    ("predict_x0", lambda x, e, a: x / math.sqrt(a) - math.sqrt(1 - a) * e,
     "subtract the noise before dividing"),
    ("predict_x0", lambda x, e, a: (x - (1 - a) * e) / a, "square roots"),
    ("sigmas", lambda ac: (1 - ac).sqrt(), "lesson 01's σ"),
    ("sigmas", lambda ac: (1 - ac) / ac, "standard deviation"),
    ("geglu", lambda layer, x: F.gelu(layer.proj(x).chunk(2, -1)[0])
     * layer.proj(x).chunk(2, -1)[1], "GELU goes on the gate"),
    ("causal_softmax", lambda s: s.softmax(-1), "without the mask"),
    ("causal_softmax", lambda s: s.masked_fill(torch.ones_like(s, dtype=torch.bool)
     .tril(-1), float("-inf")).softmax(-1), "upper triangle"),
    ("psnr_db", lambda im, rec: 10 * math.log10(4 / ((rec - im) ** 2).mean().item()),
     "clamp"),
    ("psnr_db", lambda im, rec: 10 * math.log10(1 / ((rec.clamp(-1, 1) - im) ** 2)
     .mean().item()), "range of the pixel values"),
    ("downsample_mask", lambda m, f: F.avg_pool2d(m, f), "not the mean"),
    ("downsample_mask", lambda m, f: m[..., ::f, ::f], "every pixel of the block"),
    ("rank_batch", lambda o, s, r, p, b: o[s * b:(s + 1) * b], "its own examples"),
    ("rank_batch", lambda o, s, r, p, b: o[r::p][s * b:(s + 1) * b],
     "whole batches"),
    ("shard_split", lambda sh, r, p, w, ws: sh[r::p], "split the process's share"),
    ("shard_split", lambda sh, r, p, w, ws: sh[r * ws + w::p * ws],
     "another order"),
    ("mean_gradient", lambda g, c: g.mean(0), "weight each process's gradient"),
    ("mean_gradient", lambda g, c: (g * c[:, None]).sum(0) / len(c),
     "not of processes"),
    ("resblock_parameters", lambda i, o, t: resblock_parameters(i, o, t)
     - (i * o + o if i != o else 0), "1×1 convolution"),
    ("resblock_parameters", lambda i, o, t: resblock_parameters(i, o, t)
     - t * o - o, "time vector"),
    ("bytes_in", lambda m, d: sum(p.numel() for p in m.parameters())
     * torch.finfo(d).bits, "bytes, not bits"),
    ("bytes_in", lambda m, d: sum(p.numel() * p.element_size()
                                  for p in m.parameters()), "not of the model's"),
    ("compvis_name", lambda k, n, r: compvis_name(k, n, r).removeprefix(
        "model.diffusion_model."), "UNet's prefix"),
    ("compvis_name", lambda k, n, r: compvis_name(k, n - 1, r) if k.startswith(
        "down") else compvis_name(k, n, r), "layers_per_block + 1 slots"),
    ("compvis_name", lambda k, n, r: compvis_name(k, n, r, first=0), "conv_in"),
    ("zero_conv", random_conv, "not at a random draw"),
    ("zero_conv", zero_weight_only, "zero the bias too"),
    ("zero_conv", lambda i, o: torch.nn.Conv2d(i, o, 3), "1×1 convolution"),
    ("add_control_residuals", lambda s, m, d, mr, k: add_control_residuals(
        s, m, d, mr, 1.0), "multiply the residuals by scale"),
    ("add_control_residuals", lambda s, m, d, mr, k: (
        add_control_residuals(s, m, d, mr, k)[0], m), "mid block's output"),
    ("add_control_residuals", lambda s, m, d, mr, k: ([k * r for r in d], k * mr),
     "do not replace them"),
    ("guidance_window", lambda n, a, b: ((torch.arange(n) / n >= a)
     & (torch.arange(n) / n <= b)).float(), "(i + 1)/n"),
    ("guidance_window", lambda n, a, b: guidance_window(n, a, b).flip(0),
     "noisiest step"),
    ("swap_embeddings", lambda e, ids, n, v: e + torch.where(torch.isin(
        ids, torch.tensor(n))[..., None], swap_embeddings(e, ids, n, v), 0), "not add"),
    ("swap_embeddings", lambda e, ids, n, v: swap_embeddings(e, ids, n, v[:1].expand(
        len(n), -1)), "its own vector"),
    ("swap_embeddings", lambda e, ids, n, v: torch.where(torch.isin(
        ids, torch.tensor(n))[..., None], swap_embeddings(e, ids, n, v), 0),
     "every other token"),
    ("swap_embeddings", swap_in_place, "gradient"),
    ("lora_forward", lambda x, b, la, lb, a: b(x) + x @ la.T @ lb.T, "α / r."),
    ("lora_forward", lambda x, b, la, lb, a: b(x) + la.shape[0] / a * (
        x @ la.T @ lb.T), "not r / α"),
    ("lora_forward", lambda x, b, la, lb, a: lora_forward(x, b, la, lb, a) - b(x),
     "base layer's output"),
    ("merge_lora", lambda w, la, lb, a: w + a / la.shape[0] * (la.T @ lb.T),
     "its transpose"),
    ("merge_lora", lambda w, la, lb, a: w + lb @ la, "scale ΔW"),
    ("merge_lora", lambda w, la, lb, a: a / la.shape[0] * lb @ la, "ΔW alone"),
    ("prior_preservation_loss", lambda e, n, pe, pn, w: w * F.mse_loss(e, n)
     + F.mse_loss(pe, pn), "weighs the prior"),
    ("prior_preservation_loss", lambda e, n, pe, pn, w: F.mse_loss(
        torch.cat([e, pe]), torch.cat([n, pn])), "sizes"),
    ("prior_preservation_loss", lambda e, n, pe, pn, w: ((e - n) ** 2).sum()
     + w * ((pe - pn) ** 2).sum(), "not a sum"),
]  # fmt: skip


def check(name):
    return getattr(exercises, f"check_{name}")


def test_every_check_has_a_right_answer_here():
    names = {
        name.removeprefix("check_")
        for name in dir(exercises)
        if name.startswith("check_")
    }
    assert names == set(RIGHT)  # a right answer for every check
    assert {name for name, _, _ in WRONG} == names  # and a mistake


@pytest.mark.parametrize("name", sorted(RIGHT))
def test_a_right_answer_passes(name, capsys):
    check(name)(RIGHT[name])
    assert capsys.readouterr().out.startswith(f"{name}: right on all")


@pytest.mark.parametrize(
    "name, wrong, hint", WRONG, ids=[f"{n}-{i}" for i, (n, _, _) in enumerate(WRONG)]
)
def test_a_plausible_mistake_fails_with_its_hint(name, wrong, hint, capsys):
    check(name)(wrong)
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and out.startswith(f"{name}: Not yet:")
    assert hint in out


@pytest.mark.parametrize("name", sorted(RIGHT))
def test_an_unfinished_exercise_says_so(name, capsys):
    def unfinished(*args):
        raise NotImplementedError

    check(name)(unfinished)
    assert capsys.readouterr().out == f"{name}: {exercises.NOT_DONE}\n"


def test_an_error_is_one_sentence_not_a_traceback(capsys):
    def broken(x0, noise, t, alphas_cumprod):
        return x0 + noise[:2]  # shapes that do not broadcast

    exercises.check_add_noise(broken)
    out = capsys.readouterr().out
    assert out.startswith("add_noise: Your function raised RuntimeError:")
    assert out.count("\n") == 1


def test_a_wrong_shape_is_named(capsys):
    def flat(x0, noise, t, alphas_cumprod):
        return add_noise(x0, noise, t, alphas_cumprod).flatten(1)

    exercises.check_add_noise(flat)
    assert "shape (4, 192), expected (4, 3, 8, 8)" in capsys.readouterr().out


def test_an_unknown_mistake_says_how_far_off(capsys):
    exercises.check_snr(lambda ac: snr(ac) * 1.01)
    assert "off by up to" in capsys.readouterr().out


@pytest.mark.parametrize("name", sorted(exercises.REFERENCES))
def test_yours_or_ours_takes_a_right_answer_and_falls_back_otherwise(name, capsys):
    reference, _ = exercises.REFERENCES[name]
    check(name)(reference)  # the package's version passes its own check
    assert capsys.readouterr().out.startswith(f"{name}: right on all")
    assert exercises.yours_or_ours(RIGHT[name]) is RIGHT[name]
    assert capsys.readouterr().out == ""

    def unfinished(*args):
        raise NotImplementedError

    unfinished.__name__ = name
    assert exercises.yours_or_ours(unfinished) is reference
    assert "the cells below use the package's" in capsys.readouterr().out


def test_a_number_where_a_0d_tensor_is_expected_is_compared_not_refused(capsys):
    exercises.check_psnr_db(psnr_db)  # returns a float
    assert capsys.readouterr().out.startswith("psnr_db: right on all")
    exercises.check_psnr_db(lambda images, rebuilt: psnr_db(images, rebuilt) + 0.5)
    assert "off by up to 0.5" in capsys.readouterr().out
