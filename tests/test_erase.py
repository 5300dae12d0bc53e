"""Concept erasure (ESD): the target by hand, what trains, that it learns, and bad
requests."""

import copy

import pytest
import torch

from sdscratch.erase import (
    ErasureError,
    anchor_prompts,
    erase,
    esd_loss,
    esd_target,
    noised,
)

PROMPTS = ["a small red triangle on the left", "a large red triangle at the top"]


def contexts(pipe, prompts):
    with torch.no_grad():
        return pipe.text_encoder(pipe.tokenizer(prompts))  # (B, L, D)


@pytest.fixture(scope="module")
def batch(bundled):
    """x_t at two timesteps, the prompts' and their anchors' hidden states."""
    g = torch.Generator().manual_seed(0)
    x_t = torch.randn(2, *bundled.latent_shape, generator=g)
    t = torch.tensor([700, 150])
    anchors = ["a small triangle on the left", ""]
    return x_t, t, contexts(bundled, PROMPTS), contexts(bundled, anchors)


@pytest.mark.parametrize("eta", [1.0, 0.5])
def test_esd_target_by_hand(bundled, batch, eta):
    x_t, t, context, anchor = batch

    def one_by_one(states):  # ε*(x_t, ·, t), one UNet call per row
        with torch.no_grad():
            rows = [bundled.unet(x_t[i, None], t[i, None], states[i, None])
                    for i in range(len(x_t))]  # fmt: skip
        return torch.cat(rows)

    eps_c, eps_a = one_by_one(context), one_by_one(anchor)
    target = esd_target(bundled.unet, x_t, t, context, anchor, eta)
    assert torch.allclose(target, eps_a - eta * (eps_c - eps_a), atol=1e-5)
    assert not torch.allclose(eps_c, eps_a, atol=1e-3)  # the prompts matter


def test_the_loss_of_an_unchanged_copy(bundled, batch):
    """Before training, θ = θ*: the loss is (1 + η)² ‖ε*(c) − ε*(a)‖²."""
    x_t, t, context, anchor = batch
    edited = copy.deepcopy(bundled.unet)
    with torch.no_grad():
        gap = bundled.unet(x_t, t, context) - bundled.unet(x_t, t, anchor)
        loss = esd_loss(edited, bundled.unet, x_t, t, context, anchor, eta=0.5)
    assert torch.allclose(loss, 1.5**2 * gap.pow(2).mean(), rtol=1e-4)


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("method", ["xattn", "noxattn"])
def test_only_the_chosen_weights_change(bundled, method):
    """ESD-x changes the cross-attention (attn2) alone; ESD-u everything else."""
    before = state(bundled.unet)
    erased, losses = erase(bundled, PROMPTS, method=method, steps=3, lr=1e-3,
                           batch_size=2, images_per_prompt=1)  # fmt: skip
    assert len(losses) == 3
    changed = {k for k, v in erased.unet.state_dict().items()
               if not torch.equal(v, before[k])}  # fmt: skip
    cross = {k for k, _ in erased.unet.named_parameters() if ".attn2." in k}
    allowed = cross if method == "xattn" else set(before) - cross
    assert changed and changed <= allowed
    assert len(changed) > len(allowed) / 2  # most of them moved
    assert all(torch.equal(v, before[k]) for k, v in bundled.unet.state_dict().items())
    assert erased.unet is not bundled.unet and erased.vae is bundled.vae
    assert not any(p.requires_grad for p in erased.unet.parameters())


@pytest.mark.parametrize("x_t", ["noised", "sampled"])
def test_erasure_moves_the_prediction_to_the_target(bundled, x_t):
    anchors = anchor_prompts(PROMPTS, "red")
    g = torch.Generator().manual_seed(3)
    latents = bundled(PROMPTS * 4, generator=g, num_inference_steps=5,
                      output_type="latent")  # fmt: skip
    xs, t = noised(latents, bundled.schedule, g)
    c, a = contexts(bundled, PROMPTS * 4), contexts(bundled, anchors * 4)

    def loss(pipe):
        with torch.no_grad():
            return esd_loss(pipe.unet, bundled.unet, xs, t, c, a).item()

    erased, _ = erase(bundled, PROMPTS, anchors, steps=25, lr=1e-3, batch_size=4,
                      x_t=x_t, images_per_prompt=2, sampled_steps=10)  # fmt: skip
    assert loss(erased) < 0.6 * loss(bundled)


def test_preservation_keeps_other_prompts(bundled):
    """With preservation, the prompts to keep move less than without it."""
    anchors, kept = anchor_prompts(PROMPTS, "red"), ["a small red circle on the left"]
    g = torch.Generator().manual_seed(4)
    latents = bundled(kept * 8, generator=g, num_inference_steps=5,
                      output_type="latent")  # fmt: skip
    xs, t = noised(latents, bundled.schedule, g)
    c = contexts(bundled, kept * 8)

    def drift(pipe):
        with torch.no_grad():
            return (pipe.unet(xs, t, c) - bundled.unet(xs, t, c)).pow(2).mean()

    options = dict(steps=12, lr=1e-3, batch_size=4, images_per_prompt=1)
    free, _ = erase(bundled, PROMPTS, anchors, **options)
    kept_model, _ = erase(bundled, PROMPTS, anchors, preserve=kept,
                          preserve_weight=10.0, **options)  # fmt: skip
    assert drift(kept_model) < 0.5 * drift(free)


def test_anchor_prompts():
    assert anchor_prompts(PROMPTS, "red") == [
        "a small triangle on the left",
        "a large triangle at the top",
    ]
    assert anchor_prompts(["red circle"], "red", "blue") == ["blue circle"]
    assert anchor_prompts(["a reddish red star"], "red") == ["a reddish star"]


@pytest.mark.parametrize(
    "call, words",
    [
        (lambda p: erase(p, []), "at least one prompt"),
        (lambda p: erase(p, PROMPTS, ["a triangle"]), "1 anchors for 2 prompts"),
        (lambda p: erase(p, PROMPTS, PROMPTS), "its own anchor"),
        (lambda p: erase(p, PROMPTS, method="lora"), "Unknown train method"),
        (lambda p: erase(p, PROMPTS, x_t="drawn"), "Unknown x_t source"),
        (lambda p: anchor_prompts(PROMPTS, "pink", tokenizer=p.tokenizer), "'pink'"),
        (lambda p: anchor_prompts(PROMPTS, " ", tokenizer=p.tokenizer), "empty"),
        (lambda p: anchor_prompts(PROMPTS + ["a blue star"], "red"), "'a blue star'"),
    ],
)
def test_bad_requests_are_one_sentence(bundled, call, words):
    with pytest.raises(ErasureError, match=words) as error:
        call(bundled)
    message = str(error.value)
    assert message.endswith(".") and ". " not in message.replace("e.g. ", "")
