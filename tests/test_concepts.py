"""The Shapes world's support for fine-tuning: concept examples, class images, and
the two measurements (concept accuracy, drift), checked with painters whose
answers are known; and the heart-lora recipe on a short run."""

import pytest
import torch

from sdscratch.recipes import run_recipe
from sdscratch.shapes.concepts import Drift, concept_set, prior_images, with_token
from sdscratch.shapes.data import parse_caption, render_batch
from sdscratch.shapes.judge import check


class Painter:
    """A stand-in pipeline that draws each prompt's scene exactly (with `shape`
    instead of the heart, if given): a model whose answers we know."""

    def __init__(self, shape=None):
        self.shape, self.calls = shape, []

    def __call__(self, captions, generator=None, output_type="pt", **settings):
        self.calls.append(settings)
        scenes = [parse_caption(text.replace("<heart>", "heart")) for text in captions]
        for scene in scenes:
            for obj in scene["objects"]:
                if obj["shape"] == "heart" and self.shape:
                    obj["shape"] = self.shape
        return render_batch(scenes)


def test_concept_set_draws_hearts_the_judge_reads():
    images, captions, scenes = concept_set(12, seed=0)
    assert images.shape == (12, 3, 32, 32)
    assert all(" heart " in f"{text} " for text in captions)
    assert check(images, scenes)["scene"].all()
    assert with_token(captions, "heart", "<heart>")[0] == captions[0].replace(
        "heart", "<heart>"
    )


def test_drift_measures_what_a_painter_draws():
    drift = Drift(concept_n=12, drift_n=40)
    right = drift(Painter())
    assert right["concept"] == 1.0 and right["base_accuracy"] == 1.0
    circles = drift(Painter(shape="circle"))  # never a heart: the concept fails
    assert circles["concept_shape"] == 0.0 and circles["concept_colour"] == 1.0
    assert circles["base_accuracy"] == 1.0  # the base prompts hold no heart
    painter = Painter()
    assert drift.concept_accuracy(painter, "heart", "<heart>")["concept"] == 1.0
    assert painter.calls == [dict(num_inference_steps=20, guidance_scale=7.5)]


def test_prior_images_are_the_models_own_pictures_of_base_captions():
    images, captions = prior_images(Painter(), 6)
    assert len(captions) == 6 and images.shape == (6, 3, 32, 32)
    assert torch.equal(images, render_batch([parse_caption(c) for c in captions]))
    assert not any("heart" in text for text in captions)


def test_heart_lora_recipe_runs_briefly(tmp_path, monkeypatch, bundled):
    import sdscratch.recipes.finetune as recipe

    for name, value in dict(LORA_PRIOR=4, LORA_CONCEPT_N=4, LORA_DRIFT_N=8).items():
        monkeypatch.setattr(recipe, name, value)
    manifest = run_recipe("heart-lora", out=tmp_path, steps=3)
    quality = manifest["quality"]
    assert quality["steps"] == 3 and quality["base"] == "shapes-ldm"
    assert quality["parameters"] > 0 and "concept_accuracy_before" in quality
    assert set(manifest["sha256"]) == {recipe.LORA_FILE}
    pipe = bundled
    before = pipe("a large red heart", generator=torch.Generator().manual_seed(0),
                  output_type="pt", num_inference_steps=2)  # fmt: skip
    lora = pipe.load_lora_weights(tmp_path / recipe.LORA_FILE)
    after = pipe("a large red heart", generator=torch.Generator().manual_seed(0),
                 output_type="pt", num_inference_steps=2)  # fmt: skip
    pipe.unload_lora_weights()
    assert len(lora.layers) > 0 and not torch.equal(before, after)


@pytest.mark.parametrize("shape", ["hearts", "blob"])
def test_unknown_concepts_are_one_sentence(shape):
    with pytest.raises(ValueError, match=f"Unknown shape {shape!r}"):
        concept_set(2, shape=shape)
