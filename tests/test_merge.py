"""Checkpoint merging: the two recipes, integer tensors kept, and a LoRA merged into
a model as the add-difference it is."""

import copy

import pytest
import torch
from torch import nn

from sdscratch.lora import inject_lora
from sdscratch.merge import (
    add_difference,
    merge_models,
    merge_pipelines,
    merge_state_dicts,
    weighted_sum,
)
from sdscratch.unet import UNet, UNetConfig

PROMPTS = ["a small red circle on the left", "a big blue star above a green cross"]
OPTIONS = dict(num_inference_steps=4, guidance_scale=7.5, output_type="pt")


def tiny_unet(seed, width=16):
    torch.manual_seed(seed)
    config = UNetConfig(block_out_channels=(width, 2 * width), layers_per_block=1,
                        attention_levels=(False, True), cross_attention_dim=32,
                        num_heads=2, norm_num_groups=8, sample_size=8)  # fmt: skip
    return UNet(config).eval()


def test_weighted_sum_and_add_difference_are_their_formulas():
    a, b, c = (tiny_unet(seed).state_dict() for seed in range(3))
    merged = weighted_sum(a, b, alpha=0.3)
    assert merged.keys() == a.keys()
    for key in a:
        assert torch.allclose(merged[key], torch.lerp(a[key], b[key], 0.3), atol=1e-6)
    assert all(torch.equal(weighted_sum(a, b, 0)[k], a[k]) for k in a)
    assert all(torch.equal(weighted_sum(a, b, 1)[k], b[k]) for k in a)
    merged = add_difference(a, b, c, alpha=0.7)
    for key in a:
        expected = torch.addcmul(a[key], b[key] - c[key], torch.tensor(0.7))
        assert torch.allclose(merged[key], expected, atol=1e-6), key
    same = add_difference(a, b, a, 1)  # A + (B - A) = B, up to rounding
    assert all(torch.allclose(same[k], b[k], atol=1e-6) for k in a)


def test_integer_tensors_are_never_averaged():
    def model(seed, batches):
        torch.manual_seed(seed)
        net = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
        net[1].num_batches_tracked.fill_(batches)
        net.register_buffer("position_ids", torch.arange(6)[None] + seed)
        return net

    a, b = model(0, batches=3), model(1, batches=10)
    merged = merge_models(a, b, alpha=0.5)
    state = merged.state_dict()
    assert state["1.num_batches_tracked"].dtype == torch.long
    assert state["1.num_batches_tracked"] == 3  # A's, not 6 (nor 6.5)
    assert torch.equal(state["position_ids"], torch.arange(6)[None])
    assert torch.allclose(state["0.weight"], (a[0].weight + b[0].weight) / 2)
    half = {
        k: v.half() if v.is_floating_point() else v for k, v in a.state_dict().items()
    }
    merged = merge_state_dicts(half, b.state_dict(), alpha=0.5)
    assert merged["0.weight"].dtype == torch.float16  # A's dtype


def images(pipe, seed=5):
    return pipe(PROMPTS, generator=torch.Generator().manual_seed(seed), **OPTIONS)


@pytest.mark.parametrize("method", ["weighted_sum", "add_difference"])
def test_merging_with_a_lora_merged_model_is_the_lora_at_that_scale(bundled, method):
    """W + α·ΔW both ways: (1 - α)·W + α·(W + ΔW) and W + α·((W + ΔW) - W)."""
    base, tuned = bundled, copy.deepcopy(bundled)
    lora = inject_lora(tuned, rank=4, alpha=8, text_encoder=True)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in lora.layers.values():
            layer.lora_B.weight.normal_(0, 0.05, generator=generator)
    lora.merge()
    third = base if method == "add_difference" else None
    merged = merge_pipelines(base, tuned, third, alpha=0.4, method=method)
    assert not any(m._forward_hooks for m in merged.unet.modules())
    lora.unmerge()
    lora.scale = 0.4
    expected = images(tuned)  # the LoRA at scale 0.4, not merged
    assert (images(merged) - expected).abs().max() <= 1e-4
    assert (images(base) - expected).abs().max() > 0.01


def test_models_that_do_not_match_are_one_sentence(bundled):
    a, other = tiny_unet(0).state_dict(), tiny_unet(1, width=32).state_dict()
    cases = [
        lambda: weighted_sum(a, other),
        lambda: weighted_sum(a, {k: v for k, v in a.items() if "conv_in" not in k}),
        lambda: merge_state_dicts(a, a, method="average"),
        lambda: merge_state_dicts(a, a, method="add_difference"),
        lambda: merge_pipelines(bundled, bundled, components=("unet",), method="sum"),
    ]
    for case in cases:
        with pytest.raises(ValueError) as error:
            case()
        message = str(error.value)
        assert "\n" not in message and message.endswith(".")
        assert message.count(". ") == 0, message
