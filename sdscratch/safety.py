"""A safety checker in the style of Stable Diffusion's: flag images of a concept.

Stable Diffusion v1 ships a filter (diffusers' `StableDiffusionSafetyChecker`) that
runs after the decoder. It embeds each image with CLIP's image encoder and compares
the unit vector with a fixed list of concept embeddings, vectors in the same joint
text-image space, each with its own threshold:

    score_k = cos(image, concept_k) − threshold_k;   flagged  ⇔  any score_k > 0

(rounded to 3 decimals first, as diffusers' `forward` does). A second list of
"special care" concepts makes the filter stricter: if any of them scores above 0,
every concept's score is raised by 0.01 for that image. A flagged image is replaced
by a black one. The concept vectors and thresholds of SD's checker were shipped as
numbers, not words; here they come from the tiny CLIP, either as the text embedding
of a prompt ("a red triangle": zero-shot, nothing but the words) or as the mean
image embedding of example images (`concept_embeddings`); `benchmarks/safety.py`
measures both against the judge.

The checker only sees what the image encoder makes of an image, one vector for the
whole picture. On the bundled tiny CLIP (`benchmarks/safety.py`) it finds a red
triangle alone in the picture every time, but misses it in about two of five
two-object scenes, where the other object pulls the vector away; its false
alarms are the near misses, red stars and other triangles, and scenes where
"red" and "triangle" belong to two different objects (a binding error). The
zero-shot text embedding ranks the images as well as the mean of 64 examples.

    checker = SafetyChecker.from_clip(bundled_clip(), ["a red triangle"], 0.55)
    images, flagged = checker(pipe(prompts, output_type="pt"))  # flagged: black
"""

import torch
import torch.nn.functional as F
from torch import nn

from sdscratch.erase import check_words
from sdscratch.metrics import as_tensor
from sdscratch.viz import to_pil

SPECIAL_CARE_ADJUSTMENT = 0.01  # diffusers' `adjustment` after a special-care hit
DECIMALS = 3  # diffusers' `forward` rounds each score to this many decimals
SOURCES = ("text", "images")


class SafetyError(ValueError):
    """A checker that cannot be built (no concepts, unknown words, bad thresholds)."""


def decide(image_embeds, concept_embeds, thresholds, special_embeds=None,
           special_thresholds=None):  # fmt: skip
    """SD's decision rule on embeddings: (scores (B, K), flagged (B,) bool).

    Args:
        image_embeds: (B, E) image embeddings (any length: cosines are taken).
        concept_embeds: (K, E) one vector per concept.
        thresholds: (K,) each concept's threshold on the cosine.
        special_embeds, special_thresholds: (S, E) and (S,) the special-care
            concepts, or None.
    Returns:
        The scores cos − threshold (+ 0.01 after a special-care hit), rounded to
        3 decimals, and whether any of an image's scores is above 0.
    """
    cosines = cosine(image_embeds, concept_embeds)  # (B, K)
    adjustment = torch.zeros(len(cosines), 1, device=cosines.device)  # (B, 1)
    if special_embeds is not None and len(special_embeds):
        special = cosine(image_embeds, special_embeds) - special_thresholds  # (B, S)
        care = (special.round(decimals=DECIMALS) > 0).any(1, keepdim=True)
        adjustment = care.float() * SPECIAL_CARE_ADJUSTMENT
    scores = (cosines - thresholds + adjustment).round(decimals=DECIMALS)
    return scores, (scores > 0).any(1)


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(B, E), (K, E) -> (B, K) cosine similarities (diffusers' `cosine_distance`,
    which despite its name is a similarity)."""
    return F.normalize(a.float(), dim=-1) @ F.normalize(b.float(), dim=-1).T


class SafetyChecker(nn.Module):
    """Image embeddings against concept embeddings, each with a threshold.

    Args:
        image_encoder: `sdscratch.clip.ImageEncoder` (images -> (B, E)).
        concept_embeds: (K, E) one vector per concept (`concept_embeddings`).
        thresholds: K thresholds on the cosine, or one for every concept.
        concepts: K names, for reports (default: "concept 0", ...).
        special_embeds, special_thresholds: the special-care concepts (S, E) and
            their S thresholds (or one), or None.
    """

    def __init__(self, image_encoder, concept_embeds, thresholds, concepts=None,
                 special_embeds=None, special_thresholds=None):  # fmt: skip
        super().__init__()
        if concept_embeds is None or len(concept_embeds) == 0:
            raise SafetyError("A safety checker needs at least one concept.")
        self.image_encoder = image_encoder
        k = len(concept_embeds)
        self.concepts = list(concepts or [f"concept {i}" for i in range(k)])
        if len(self.concepts) != k:
            raise SafetyError(f"Got {len(self.concepts)} names for {k} concepts.")
        self.register_buffer("concept_embeds", concept_embeds.detach().float())
        self.register_buffer("thresholds", _per_concept(thresholds, k, "thresholds"))
        self.register_buffer("special_embeds", None)
        self.register_buffer("special_thresholds", None)
        if special_embeds is not None and len(special_embeds):
            s = len(special_embeds)
            self.special_embeds = special_embeds.detach().float()
            self.special_thresholds = _per_concept(
                special_thresholds, s, "special_thresholds"
            )

    @classmethod
    def from_clip(cls, clip, concepts, thresholds, source="text", examples=None):
        """A checker on `clip`'s image encoder for the named concepts.

        Args:
            clip: a `sdscratch.clip.CLIP` (e.g. `sdscratch.metrics.bundled_clip()`).
            concepts: K prompts naming the concepts ("a red triangle").
            thresholds: K thresholds on the cosine, or one for all.
            source, examples: how the concept vectors are made
                (`concept_embeddings`).
        """
        embeds = concept_embeddings(clip, concepts, source, examples)
        return cls(clip.image_encoder, embeds, thresholds, concepts)

    @torch.no_grad()
    def embed(self, images) -> torch.Tensor:
        """Images ((B, 3, H, W) in [-1, 1], or PIL) -> (B, E) unit vectors, resized
        (area average) to the encoder's image size first if need be."""
        images = as_tensor(images).to(self.concept_embeds.device)
        size = self.image_encoder.config.image_size
        if images.shape[-2:] != (size, size):
            images = F.interpolate(images, size=(size, size), mode="area")
        return self.image_encoder(images)

    @torch.no_grad()
    def scores(self, images) -> torch.Tensor:
        """(B, K) each image's score per concept (flagged where any is > 0)."""
        return decide(self.embed(images), self.concept_embeds, self.thresholds,
                      self.special_embeds, self.special_thresholds)[0]  # fmt: skip

    @torch.no_grad()
    def forward(self, images, black_out=True):
        """Check images; black out the flagged ones, as SD's pipeline does.

        Args:
            images: (B, 3, H, W) in [-1, 1], or B PIL images.
            black_out: replace flagged images by black ones (False: only flag).
        Returns:
            (the images, of the type given, flagged ones black; (B,) bool flags).
        """
        embeds = self.embed(images)
        _, flagged = decide(embeds, self.concept_embeds, self.thresholds,
                            self.special_embeds, self.special_thresholds)  # fmt: skip
        flagged = flagged.cpu()
        if not black_out or not flagged.any():
            return images, flagged
        if isinstance(images, torch.Tensor):
            images = images.clone()
            images[flagged.to(images.device)] = -1.0  # black, in [-1, 1]
            return images, flagged
        black = to_pil(-torch.ones(1, 3, images[0].height, images[0].width))[0]
        return [black if f else image for image, f in zip(images, flagged)], flagged


def _per_concept(thresholds, k, name) -> torch.Tensor:
    """One threshold per concept, from K numbers or one."""
    values = torch.as_tensor(thresholds, dtype=torch.float32).flatten()
    if len(values) == 1:
        values = values.repeat(k)
    if len(values) != k:
        raise SafetyError(f"Got {len(values)} {name} for {k} concepts.")
    return values


# ----------------------------------------------------------------------------------
# Concept embeddings


@torch.no_grad()
def concept_embeddings(clip, concepts, source="text", examples=None):
    """One unit vector per concept, in CLIP's joint text-image space.

    Args:
        clip: a `sdscratch.clip.CLIP` (its tokenizer, text and image encoders).
        concepts: K prompts naming the concepts ("a red triangle").
        source: "text": each prompt's text embedding (zero-shot); "images": the
            mean image embedding of each concept's examples, renormalised.
        examples: for "images", K tensors (N_k, 3, H, W) in [-1, 1].
    Returns:
        (K, E).
    """
    if not concepts:
        raise SafetyError("Name at least one concept to flag.")
    if source not in SOURCES:
        raise SafetyError(f"Unknown source {source!r}; choose one of {SOURCES}.")
    for concept in concepts:
        check_words(clip.tokenizer, concept, SafetyError)
    if source == "text":
        ids = clip.tokenizer(list(concepts)).to(clip.logit_scale.device)
        return clip.text_encoder.embed(ids)  # (K, E)
    if examples is None or len(examples) != len(concepts):
        got = 0 if examples is None else len(examples)
        raise SafetyError(f"Got example images for {got} of {len(concepts)} concepts.")
    means = [clip.image_encoder(as_tensor(x).to(clip.logit_scale.device)).mean(0)
             for x in examples]  # fmt: skip
    return F.normalize(torch.stack(means), dim=-1)


# ----------------------------------------------------------------------------------
# Measuring a checker


def precision_recall(cosines, positives, thresholds) -> dict[str, torch.Tensor]:
    """Precision and recall of "flag where cosine − threshold > 0", per threshold.

    Args:
        cosines: (N,) each image's cosine with one concept.
        positives: (N,) bool, whether the image shows the concept (the truth).
        thresholds: (T,) the thresholds to try.
    Returns:
        {"threshold", "precision", "recall", "flagged"}: (T,) each; precision is
        1 where nothing is flagged (no false alarm).
    """
    cosines, positives = torch.as_tensor(cosines), torch.as_tensor(positives).bool()
    thresholds = torch.as_tensor(thresholds, dtype=cosines.dtype)
    flagged = cosines[None, :] - thresholds[:, None] > 0  # (T, N)
    hits = (flagged & positives).sum(1).float()
    count = flagged.sum(1).float()
    none = torch.ones_like(count)  # no flag, no false alarm
    precision = torch.where(count > 0, hits / count.clamp(min=1), none)
    recall = hits / max(int(positives.sum()), 1)
    return {"threshold": thresholds, "precision": precision, "recall": recall,
            "flagged": count}  # fmt: skip
