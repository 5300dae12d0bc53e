"""clip: the tiny CLIP on Shapes (tokenizer/, text_encoder/, image_encoder/).

Its text encoder is the conditioning of every text-to-image model of the course, and
the whole CLIP is the CLIP-score judge.
"""

import random

import torch

from sdscratch.clip import (
    CLIP,
    ImageEncoder,
    ImageEncoderConfig,
    TextEncoder,
    TextEncoderConfig,
    contrastive_loss,
)
from sdscratch.pipeline_inputs import check_choice
from sdscratch.recipes.common import (
    mean_of_last,
    recipe,
    saving,
    scenes_seed,
    seeded,
)
from sdscratch.shapes.data import (
    Shapes,
    asked_codes,
    codes_satisfy,
    describe,
    parse_caption,
    satisfies,
    scene_codes,
    vocabulary,
)
from sdscratch.shapes.zero_shot import scene_edits, zero_shot_accuracy
from sdscratch.tokenizer import train_bpe
from sdscratch.train import fit, rank_generator

CLIP_STEPS = 1200  # AdamW steps of CLIP_BATCH image-caption pairs (8 CPU minutes)
CLIP_BATCH = 128
CLIP_POOL = 20_000  # training scenes drawn once, then sampled from
CLIP_CONTEXT = 32  # tokens per prompt; Shapes captions need at most 16
CLIP_TEST_SCENES = 1000  # held-out scenes (test split) for the zero-shot accuracy
# How a hard negative is phrased: "independent" (its own random draws: the bundled
# CLIP's, on template captions) or "paired" (its caption's draws). See `_pairs`.
CLIP_NEGATIVES = "independent"
NEGATIVE_PHRASINGS = ("independent", "paired")


def clip_configs(vocab_size, eos_token_id):
    """The tiny CLIP's text and image encoder configs."""
    text = TextEncoderConfig(
        vocab_size=vocab_size,
        max_position_embeddings=CLIP_CONTEXT,
        hidden_size=96,
        intermediate_size=384,
        num_hidden_layers=3,
        num_attention_heads=3,
        eos_token_id=eos_token_id,
        projection_dim=64,
    )
    return text, ImageEncoderConfig(image_size=32, channels=(32, 64, 128))


def _scene_key(attrs) -> tuple:
    """What a caption says, so that "A above B" and "B below A" get one key."""
    objects = [(o["shape"], o["colour"], o["size"]) for o in attrs["objects"]]
    relation = attrs["relation"]
    if relation is None:
        return (*objects, attrs["objects"][0]["position"])
    mirrored = {"below": "above", "right of": "left of"}
    if relation in mirrored:
        objects, relation = objects[::-1], mirrored[relation]
    return (*objects, relation)


def _hard_negative(attrs, rng) -> dict:
    """A scene one change away from `attrs`: a new attribute, or for two objects
    also another relation, the objects swapped, or their colours swapped."""
    edits = scene_edits(attrs)
    while True:
        edit = rng.choice(edits[rng.choice(sorted(edits))])
        if _scene_key(edit) != _scene_key(attrs):
            return edit


@recipe("clip", default_out="shapes-clip")
def train_clip(
    out, seed, steps, checkpoint=None, captions=None, negatives=CLIP_NEGATIVES
):
    """A byte-level BPE vocabulary and a tiny CLIP, trained on Shapes captions.

    Every caption in a batch comes with a hard negative, the caption of a scene one
    change away ("a blue circle above a red square" for "a red circle above a blue
    square"): random batches seldom hold such pairs, and without them CLIP learns
    a bag of words that ignores order (Yuksekgonul et al. 2023, NegCLIP).

    captions: the training captions' grammar (default `CAPTIONS`).
    negatives: how each negative is phrased, "independent" or "paired" (`_pairs`).
    """
    steps = steps or CLIP_STEPS
    train = Shapes("train", seed=scenes_seed("clip", seed), captions=captions)
    tokenizer = _train_tokenizer(train)
    with seeded(seed):  # the initial weights
        text_config, image_config = clip_configs(len(tokenizer), tokenizer.eos_id)
        clip = CLIP(TextEncoder(text_config), ImageEncoder(image_config), tokenizer)

    pool = min(CLIP_POOL, steps * CLIP_BATCH)
    images, ids, negative_ids, shown, asked = _pairs(
        train, pool, tokenizer, seed, negatives
    )
    generator = rank_generator(seed)  # each process its own batches

    def batches():
        for _ in range(steps):
            i = torch.randint(0, pool, (CLIP_BATCH,), generator=generator)
            texts = torch.cat([ids[i], negative_ids[i]])  # (2B, L)
            yield images[i], texts, shown[i], asked[:, i].flatten(0, 1)

    def loss_fn(model, batch):
        x, texts, image_codes, text_codes = batch
        same = codes_satisfy(image_codes, text_codes)  # (B, 2B)
        return contrastive_loss(model(x, texts), same)

    losses = fit(clip, loss_fn, batches(), steps, lr=2e-3, warmup=100, desc="clip",
                 generators=[generator], **saving(checkpoint))  # fmt: skip
    temperature = 1 / clip.logit_scale.exp().item()
    clip.save_pretrained(out, dtype=torch.float16)
    return _zero_shot(clip, out, seed, steps) | {
        "final_loss": round(mean_of_last(losses, 50), 4),
        "temperature": round(temperature, 4),
        "vocab_size": len(tokenizer),
        "steps": steps,
        "batch_size": CLIP_BATCH,
    }


def _train_tokenizer(train):
    """A byte-level BPE vocabulary of the first 5,000 training captions, which
    must keep every caption word whole."""
    sample = [train.scene(i)[0] for i in range(5000)]
    tokenizer = train_bpe(sample, vocab_size=1000, context_length=CLIP_CONTEXT)
    split = [word for word in vocabulary() if len(tokenizer.tokenize(word)) > 1]
    if split:
        raise ValueError(f"The trained vocabulary splits caption words {split}.")
    return tokenizer


def _pairs(train, pool, tokenizer, seed, negatives=CLIP_NEGATIVES):
    """The first `pool` training scenes, their captions (drawn again when paired)
    and hard negatives.

    negatives: "independent" phrases each negative with its own random draws.
    Template captions vary little, and name every attribute, so any phrasing of
    the changed scene contradicts the image. Natural captions vary in synonyms,
    word order and what they leave out: phrased independently, a negative differs
    from its caption in many words besides the changed ones (and now and then
    leaves out the changed attribute, and says nothing false). "paired" phrases
    the caption and its negative with the same draws and changes only what the
    caption names: they differ in the changed words alone (when two objects swap
    places, also in the words that go with each place: a size one names and the
    other leaves out), the minimal pairs of NegCLIP's swapped captions.
    `benchmarks/clip_captions.py` measures both.

    Returns:
        images (N, 3, 32, 32); ids and negative_ids (N, L), token ids of the
        captions and of their hard negatives (captioned in the training grammar);
        shown (N, 19), the scenes' codes, and asked (2, N, 19), the codes of what
        captions and negatives ask, so that an image matches every caption in its
        batch it satisfies ("a red circle" matches every red circle; a negative
        that leaves out the changed attribute matches too).
    """
    check_choice(negatives, NEGATIVE_PHRASINGS, "negatives")
    images, captions, scenes = train.batch(range(pool))
    rng = random.Random(seed)
    if negatives == "paired":
        pairs = [_paired_captions(scene, rng, train.captions) for scene in scenes]
        captions, negative_captions = (list(texts) for texts in zip(*pairs))
    else:
        changed = [_hard_negative(scene, rng) for scene in scenes]
        negative_captions = [describe(scene, rng, train.captions) for scene in changed]
    ids = tokenizer(captions)  # (N, L)
    negative_ids = tokenizer(negative_captions)  # (N, L)
    said = [parse_caption(text) for text in captions + negative_captions]
    asked = asked_codes(said).reshape(2, pool, -1)  # (2, N, 19)
    return images, ids, negative_ids, scene_codes(scenes), asked


def _paired_captions(scene, rng, grammar) -> tuple[str, str]:
    """A caption of `scene` and a hard negative phrased with the same draws, one
    change away in something the caption names (a change to an attribute it leaves
    out would give the same words)."""
    draw = rng.getrandbits(32)
    caption = describe(scene, random.Random(draw), grammar)
    while True:  # ends: every caption names colours, and a colour change is drawable
        negative = describe(_hard_negative(scene, rng), random.Random(draw), grammar)
        if not satisfies(scene, parse_caption(negative)):
            return caption, negative


def _zero_shot(clip, out, seed, steps) -> dict:
    """Zero-shot accuracy of the CLIP saved in `out` (float16) on held-out test
    scenes, and how much float16 changed it."""
    test_seed = scenes_seed("clip", seed, "eval")
    length = min(CLIP_TEST_SCENES, 100 * steps)  # short runs: fewer
    test = Shapes("test", seed=test_seed, length=length)
    test_images, _, test_scenes = test.batch(range(len(test)))
    saved = CLIP.from_pretrained(out, verify=False)  # as stored, in float16
    accuracy = zero_shot_accuracy(saved, test_images, test_scenes)
    before = zero_shot_accuracy(clip, test_images, test_scenes)  # float32
    change = max(abs(accuracy[q]["accuracy"] - before[q]["accuracy"]) for q in before)
    return {"zero_shot": accuracy, "float16_changes_accuracy_by": round(change, 4)}
