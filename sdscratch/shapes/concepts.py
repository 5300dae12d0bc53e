"""A new concept for a trained model, and how to tell what fine-tuning did.

What `sdscratch.finetune` needs from the Shapes world: examples of a concept the base
model never saw (the novel heart, or pink: `concept_scenes`), DreamBooth's class
images (the base model's own pictures of base captions), and the two measurements of
a fine-tune: whether it learned the concept (concept accuracy, on held-out concept
prompts) and what it broke (drift: the change of prompt accuracy and FID on base
prompts). The bundled judge reads every image; it knows the novel shape and colour.
"""

import torch

from sdscratch.metrics import frechet_distance
from sdscratch.shapes.captions import canonical_caption
from sdscratch.shapes.data import concept_scenes, render_batch
from sdscratch.shapes.evaluate import evaluation_prompts, generate_images, real_features
from sdscratch.shapes.judge import attribute_accuracy, bundled_judge, image_features

SETTINGS = dict(num_inference_steps=20, guidance_scale=7.5)  # every measurement's


def concept_set(count, seed=0, shape="heart", colour=None, size=32) -> tuple:
    """`count` scenes of a concept: (images (count, 3, size, size) in [-1, 1], their
    canonical captions ("a large red heart at the top"), their attrs)."""
    scenes = concept_scenes(count, seed, shape=shape, colour=colour)
    captions = [canonical_caption(scene) for scene in scenes]
    return render_batch(scenes, size), captions, scenes


def with_token(captions: list, word: str, token: str) -> list:
    """The captions with a new token standing for `word` (textual inversion's)."""
    return [text.replace(word, token) for text in captions]


def generate(pipe, captions, seed=0, batch_size=100, progress=False) -> torch.Tensor:
    """(N, 3, H, W) images in [-1, 1], one per caption, at `SETTINGS`; all the noise
    from one generator seeded with `seed`."""
    generator = torch.Generator().manual_seed(seed)
    images, _, _ = generate_images(pipe, captions, generator, batch_size, progress,
                             **SETTINGS)  # fmt: skip
    return images


def prior_images(pipe, count, seed=0) -> tuple:
    """DreamBooth's class images for the Shapes world: (the model's own pictures of
    the first `count` training captions, those captions). The class of a heart is
    "a shape", and a shape is anything the base model draws."""
    captions, _ = evaluation_prompts(count, split="train")
    return generate(pipe, captions, seed), captions


class Drift:
    """Concept accuracy and drift of a pipeline, on fixed prompts and seeds.

    Args:
        concept_n: held-out concept prompts (`concept_scenes` with seed 1; the
            examples are seed 0's).
        drift_n: base test prompts (`evaluation_prompts`) for prompt accuracy and FID
            against as many real val images.
        shape, colour: the concept.
    """

    def __init__(self, concept_n=100, drift_n=500, shape="heart", colour=None):
        self.judge = bundled_judge()
        _, self.concept, self.concept_attrs = concept_set(concept_n, 1, shape, colour)
        self.base, self.base_attrs = evaluation_prompts(drift_n)
        self.reference = real_features(drift_n, "val", judge=self.judge)  # (N, D)

    def concept_accuracy(self, pipe, word=None, token=None) -> dict:
        """{"concept": every attribute right, "concept_shape", "concept_colour"}
        on the concept prompts (with `token` for `word`, for textual inversion)."""
        captions = self.concept
        if token:
            captions = with_token(captions, word, token)
        right = attribute_accuracy(generate(pipe, captions), self.concept_attrs,
                                   self.judge)  # fmt: skip
        return {"concept": right["scene"], "concept_shape": right["shape"],
                "concept_colour": right["colour"]}  # fmt: skip

    def base_figures(self, pipe) -> dict:
        """{"base_accuracy", "fid"} on the base prompts."""
        images = generate(pipe, self.base)
        right = attribute_accuracy(images, self.base_attrs, self.judge)
        features = image_features(images, self.judge)  # (N, D)
        return {"base_accuracy": right["scene"],
                "fid": frechet_distance(features, self.reference)}  # fmt: skip

    def __call__(self, pipe, word=None, token=None) -> dict:
        return self.concept_accuracy(pipe, word, token) | self.base_figures(pipe)
