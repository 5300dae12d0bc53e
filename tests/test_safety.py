"""The safety checker: SD's decision rule (against diffusers' own checker), black
images where it flags, concepts from words and from images, and bad requests."""

import numpy as np
import pytest
import torch
from diffusers.pipelines.stable_diffusion.safety_checker import (
    StableDiffusionSafetyChecker,
)
from PIL import Image
from torch import nn
from transformers import CLIPConfig

from sdscratch.clip import ImageEncoder, ImageEncoderConfig
from sdscratch.metrics import bundled_clip
from sdscratch.safety import (
    SafetyChecker,
    SafetyError,
    concept_embeddings,
    precision_recall,
)
from sdscratch.shapes.data import Shapes, render_batch


class Encoded(nn.Module):
    """Stands in for diffusers' CLIP vision model: our image encoder's embedding
    as the "pooled output" (the projection after it is made the identity)."""

    def __init__(self, encoder):
        super().__init__()
        self.encoder = encoder

    def forward(self, clip_input):
        return None, self.encoder(clip_input)


def reference_checker(encoder, concepts, thresholds, special, special_thresholds):
    """diffusers' StableDiffusionSafetyChecker seeing our encoder's embeddings and
    holding our concepts and thresholds."""
    e = encoder.config.projection_dim
    vision = dict(hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                  num_attention_heads=2, image_size=32, patch_size=16)  # fmt: skip
    text = dict(hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                num_attention_heads=2, vocab_size=10)  # fmt: skip
    config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=e)
    reference = StableDiffusionSafetyChecker(config).eval()
    reference.vision_model = Encoded(encoder)
    reference.visual_projection = nn.Identity()
    reference.concept_embeds = nn.Parameter(concepts.clone(), requires_grad=False)
    reference.concept_embeds_weights = nn.Parameter(thresholds.clone(),
                                                    requires_grad=False)  # fmt: skip
    reference.special_care_embeds = nn.Parameter(special.clone(), requires_grad=False)
    reference.special_care_embeds_weights = nn.Parameter(
        special_thresholds.clone(), requires_grad=False
    )
    return reference


@pytest.fixture(scope="module")
def setting():
    """A random encoder, 64 images, 5 concepts and 2 special-care concepts whose
    thresholds make some images flag and others not."""
    torch.manual_seed(0)
    encoder = ImageEncoder(ImageEncoderConfig(channels=(8, 16), projection_dim=12))
    images = torch.rand(64, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        embeds = encoder(images)
    concepts, special = embeds[:5] + 0.3 * torch.randn(5, 12), torch.randn(2, 12)
    unit = nn.functional.normalize
    cos = unit(embeds) @ unit(concepts).T  # (64, 5)
    thresholds = cos.quantile(0.93, dim=0)  # a few images above each
    special_thresholds = (unit(embeds) @ unit(special).T).quantile(0.8, dim=0)
    return encoder.eval(), images, concepts, thresholds, special, special_thresholds


def test_the_decision_rule_is_diffusers(setting):
    encoder, images, concepts, thresholds, special, special_thr = setting
    ours = SafetyChecker(encoder, concepts, thresholds, None, special, special_thr)
    reference = reference_checker(encoder, concepts, thresholds, special, special_thr)
    pixels = (images + 1) / 2  # diffusers checks images in [0, 1]
    expected_images, expected = reference(clip_input=images, images=pixels.clone())
    checked, flagged = ours(images)
    assert flagged.tolist() == expected
    assert 3 < sum(expected) < 60  # the thresholds test both outcomes
    assert torch.equal((checked + 1) / 2, expected_images)  # black is black
    _, onnx_flags = reference.forward_onnx(images, pixels.clone())
    assert flagged.tolist() == onnx_flags.tolist()


def test_special_care_makes_the_checker_stricter(setting):
    encoder, images, concepts, thresholds, special, special_thr = setting
    plain = SafetyChecker(encoder, concepts, thresholds)
    strict = SafetyChecker(encoder, concepts, thresholds, None, special, special_thr)
    raised = strict.scores(images) - plain.scores(images)  # (64, 5)
    assert torch.allclose(raised.max(1).values, raised.min(1).values, atol=2e-3)
    assert {round(x, 2) for x in raised[:, 0].tolist()} == {0.0, 0.01}


def test_black_out_keeps_the_unflagged_and_the_type(setting):
    encoder, images, concepts, thresholds, *_ = setting
    checker = SafetyChecker(encoder, concepts, thresholds)
    checked, flagged = checker(images)
    assert torch.equal(checked[~flagged], images[~flagged])
    assert (checked[flagged] == -1).all() and flagged.any()
    same, flags = checker(images, black_out=False)
    assert same is images and torch.equal(flags, flagged)
    pictures = [Image.fromarray(np.full((32, 32, 3), 128, np.uint8))] * 2
    embeds = checker.embed(pictures[:1])
    flag_all = SafetyChecker(encoder, embeds, -1.0)  # every image scores > 0
    out, flags = flag_all(pictures)
    assert flags.all() and isinstance(out[0], Image.Image)
    assert np.asarray(out[0]).max() == 0


def test_bundled_clip_tells_red_triangles_apart():
    """Words ("a red triangle") and examples both rank real red triangles above
    other scenes."""
    clip = bundled_clip()
    data = Shapes("val")
    scenes = [data.scene(i)[1] for i in range(300)]
    positive = torch.tensor([any(o["shape"] == "triangle" and o["colour"] == "red"
                                 for o in s["objects"]) for s in scenes])  # fmt: skip
    one = {"shape": "triangle", "colour": "red", "size": "large", "position": "center"}
    examples = render_batch([{"objects": [one], "relation": None}])
    images = render_batch(scenes)
    for source in ("text", "images"):
        checker = SafetyChecker.from_clip(clip, ["a red triangle"], 0.0, source,
                                          [examples])  # fmt: skip
        cos = checker.scores(images)[:, 0]  # the threshold is 0
        # AUROC: the share of (positive, negative) pairs ranked the right way
        auroc = (cos[positive][:, None] > cos[~positive][None, :]).float().mean()
        assert auroc > 0.8, source


def test_precision_recall_by_hand():
    cosines = torch.tensor([0.9, 0.8, 0.3, 0.7, 0.1])
    truth = torch.tensor([True, False, True, True, False])
    curve = precision_recall(cosines, truth, [0.75, 0.5, 0.95])
    assert curve["precision"].tolist() == pytest.approx([1 / 2, 2 / 3, 1.0])
    assert curve["recall"].tolist() == pytest.approx([1 / 3, 2 / 3, 0.0])
    assert curve["flagged"].tolist() == [2, 3, 0]


@pytest.mark.parametrize(
    "request_, words",
    [
        (dict(concepts=[]), "at least one concept"),
        (dict(concepts=["a pink triangle"]), "'pink'"),
        (dict(concepts=["a red triangle"], source="photos"), "Unknown source"),
        (dict(concepts=["a red triangle"], source="images"), "example images"),
    ],
)
def test_bad_concepts_are_one_sentence(request_, words):
    with pytest.raises(SafetyError, match=words) as error:
        concept_embeddings(bundled_clip(), **request_)
    message = str(error.value)
    assert message.count(". ") == 0 and message.endswith(".")


def test_bad_checkers_are_one_sentence(setting):
    encoder, _, concepts, thresholds, *_ = setting
    with pytest.raises(SafetyError, match="at least one concept"):
        SafetyChecker(encoder, concepts[:0], [])
    with pytest.raises(SafetyError, match="3 thresholds for 5 concepts"):
        SafetyChecker(encoder, concepts, thresholds[:3])
    with pytest.raises(SafetyError, match="2 names for 5 concepts"):
        SafetyChecker(encoder, concepts, thresholds, ["a", "b"])
