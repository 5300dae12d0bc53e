"""The text encoder against transformers' CLIPTextModel; the tiny CLIP's parts."""

import pytest
import torch
import torch.nn.functional as F
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
)

from sdscratch.clip import (
    CLIP,
    ImageEncoder,
    ImageEncoderConfig,
    TextEncoder,
    TextEncoderConfig,
    contrastive_loss,
)
from sdscratch.port import text_encoder_from_transformers
from sdscratch.recipes import run_recipe
from sdscratch.recipes.clip import _pairs
from sdscratch.shapes.data import Shapes, codes_satisfy
from sdscratch.shapes.zero_shot import caption_choices
from sdscratch.tokenizer import train_bpe

TINY_CONFIGS = {
    "quick_gelu": dict(
        vocab_size=99,
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=16,
        hidden_act="quick_gelu",
        bos_token_id=97,
        eos_token_id=98,
    ),
    "gelu_eos_2": dict(  # eos_token_id=2: pooled at the highest id, as SD v1.5's
        vocab_size=50,
        hidden_size=24,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=2,
        max_position_embeddings=20,
        hidden_act="gelu",
        layer_norm_eps=1e-6,
        bos_token_id=0,
        eos_token_id=2,
    ),
}


def random_reference(cls, name, **extra):
    torch.manual_seed(0)
    model = cls(CLIPTextConfig(**TINY_CONFIGS[name], **extra)).eval()
    with torch.no_grad():  # LayerNorms start at 1 and 0: make them random too
        for param in model.parameters():
            param.add_(0.1 * torch.randn_like(param))
    return model


def prompts(config, batch=4, length=None):
    """Token ids framed like the tokenizer's: start, words, end, padding."""
    generator = torch.Generator().manual_seed(1)
    length = length or config.max_position_embeddings
    ids = torch.randint(3, config.vocab_size - 3, (batch, length), generator=generator)
    ids[:, 0] = config.bos_token_id
    for row, end in enumerate(range(3, 3 + batch)):
        ids[row, end:] = config.eos_token_id if config.eos_token_id != 2 else 0
        ids[row, end] = config.eos_token_id if config.eos_token_id != 2 else 49
    return ids


@pytest.mark.parametrize("name", TINY_CONFIGS)
def test_text_encoder_equals_clip_text_model(name):
    reference = random_reference(CLIPTextModel, name)
    ours = text_encoder_from_transformers(reference)
    ids = prompts(reference.config)
    with torch.no_grad():
        expected = reference(input_ids=ids)
        hidden = ours(ids)
        pooled = ours.pool(hidden, ids)
    assert hidden.shape == expected.last_hidden_state.shape
    assert (hidden - expected.last_hidden_state).abs().max() <= 1e-5
    assert (pooled - expected.pooler_output).abs().max() <= 1e-5


@pytest.mark.parametrize("name", TINY_CONFIGS)
def test_text_encoder_with_projection_equals_transformers(name):
    reference = random_reference(CLIPTextModelWithProjection, name, projection_dim=8)
    ours = text_encoder_from_transformers(reference)
    ids = prompts(reference.config, length=7)  # shorter than the context
    with torch.no_grad():
        expected = F.normalize(reference(input_ids=ids).text_embeds, dim=-1)
        assert (ours.embed(ids) - expected).abs().max() <= 1e-5


def test_port_is_strict_and_refuses_other_activations():
    reference = random_reference(CLIPTextModel, "quick_gelu")
    reference.config.hidden_act = "relu"
    with pytest.raises(ValueError, match="cannot port a text encoder with relu"):
        text_encoder_from_transformers(reference)


def test_sd_v1_text_encoder_has_123_060_480_parameters():
    with torch.device("meta"):
        ours = TextEncoder(TextEncoderConfig())
        theirs = CLIPTextModel(  # SD v1's: openai/clip-vit-large-patch14's text
            CLIPTextConfig(
                hidden_size=768, intermediate_size=3072, num_attention_heads=12
            )
        )
    count = sum(p.numel() for p in ours.parameters())
    assert count == sum(p.numel() for p in theirs.parameters())
    assert count == 123_060_480


def test_the_causal_mask_hides_later_tokens():
    torch.manual_seed(0)
    config = TextEncoderConfig(
        vocab_size=30,
        max_position_embeddings=8,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        eos_token_id=29,
    )
    encoder = TextEncoder(config).eval()
    a = torch.tensor([[28, 5, 6, 7, 29, 29]])
    b = torch.tensor([[28, 5, 6, 9, 29, 29]])
    with torch.no_grad():
        ha, hb = encoder(a), encoder(b)
    torch.testing.assert_close(ha[:, :3], hb[:, :3])  # before the change: equal
    assert (ha[:, 3:] - hb[:, 3:]).abs().amax(dim=-1).min() > 1e-3  # after: differ
    with pytest.raises(ValueError, match="do not fit the text encoder's 8 positions"):
        encoder(torch.zeros(1, 9, dtype=torch.long))


def tiny_clip():
    torch.manual_seed(0)
    text = TextEncoder(
        TextEncoderConfig(
            vocab_size=40,
            max_position_embeddings=10,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            eos_token_id=39,
            projection_dim=8,
        )
    )
    image = ImageEncoder(ImageEncoderConfig(16, channels=(8, 16), projection_dim=8))
    return CLIP(text, image)


def test_image_encoder_gives_unit_vectors():
    encoder = ImageEncoder(ImageEncoderConfig(image_size=32, channels=(8, 16, 16)))
    embeddings = encoder(torch.rand(5, 3, 32, 32) * 2 - 1)
    assert embeddings.shape == (5, 64)
    torch.testing.assert_close(embeddings.norm(dim=-1), torch.ones(5))


def test_contrastive_loss_equals_transformers():
    from transformers.models.clip.modeling_clip import image_text_contrastive_loss

    logits = torch.randn(6, 6, generator=torch.Generator().manual_seed(0)) * 5
    torch.testing.assert_close(
        contrastive_loss(logits), image_text_contrastive_loss(logits.T)
    )
    perfect = torch.eye(6) * 100
    assert contrastive_loss(perfect) < 1e-6


def test_clip_logits_are_scaled_cosines_and_the_temperature_learns():
    clip = tiny_clip()
    images = torch.rand(3, 3, 16, 16) * 2 - 1
    ids = torch.randint(0, 39, (3, 10))
    ids[:, 5] = 39
    logits = clip(images, ids)
    cosines = clip.image_encoder(images) @ clip.text_encoder.embed(ids).T
    torch.testing.assert_close(logits, cosines / 0.07)
    contrastive_loss(logits).backward()
    assert clip.logit_scale.grad is not None and clip.logit_scale.grad != 0


def test_contrastive_loss_does_not_push_apart_captions_of_one_scene():
    logits = torch.randn(4, 4, generator=torch.Generator().manual_seed(0))
    eye = torch.eye(4, dtype=torch.bool)
    torch.testing.assert_close(contrastive_loss(logits, eye), contrastive_loss(logits))
    same = eye.clone()
    same[0, 1] = same[1, 0] = True  # scenes 0 and 1 show the same picture
    logits = (20.0 * same).requires_grad_()  # each image matches both its captions
    contrastive_loss(logits, same).backward()
    assert logits.grad.abs().max() < 1e-6  # nothing to learn: already right
    logits.grad = None
    contrastive_loss(logits).backward()  # plain CLIP would pull 0 and 1 apart
    assert logits.grad[0, 1] > 0.1 and logits.grad[1, 0] > 0.1


def test_zero_shot_questions_name_the_right_distractors():
    one = {
        "objects": [
            {"shape": "circle", "colour": "red", "size": "small", "position": "left"}
        ],
        "relation": None,
    }
    questions = caption_choices(one)
    assert questions["colour"][0] == "a small red circle on the left"
    assert len(questions["colour"]) == 6 and len(questions["position"]) == 5
    assert len(questions["size"]) == 2 and len(questions["one_object_caption"]) == 360
    two = {
        "objects": [
            {"shape": "circle", "colour": "red", "size": "small", "position": "top"},
            {
                "shape": "square",
                "colour": "blue",
                "size": "large",
                "position": "bottom",
            },
        ],
        "relation": "above",
    }
    questions = caption_choices(two)
    truth = "a small red circle above a large blue square"
    assert questions["order"] == [truth, "a large blue square above a small red circle"]
    assert questions["binding"] == [
        truth,
        "a small blue circle above a large red square",
    ]
    assert len(questions["relation"]) == 4
    assert len(questions["two_object_caption"]) == 1 + 22 + 3 + 2
    assert len(set(questions["two_object_caption"])) == 28


def test_clip_recipe_runs_and_its_checkpoint_loads(tmp_path):
    manifest = run_recipe("clip", out=tmp_path, steps=2)
    assert {"tokenizer", "text_encoder", "image_encoder"} <= {
        p.name for p in tmp_path.iterdir()
    }
    accuracy = manifest["quality"]["zero_shot"]
    assert {"shape", "colour", "size", "position", "relation", "binding"} <= set(
        accuracy
    )
    clip = CLIP.from_pretrained(tmp_path)  # checks the manifest's sha256 too
    ids = clip.tokenizer(["a small red circle on the left"])
    assert ids.shape == (1, clip.text_encoder.config.max_position_embeddings)
    width = clip.text_encoder.config.hidden_size
    assert clip.text_encoder(ids).shape == (1, ids.shape[1], width)
    images, _, _ = Shapes("test", length=2).batch([0, 1])
    similarity = clip.similarity(images, ["a red circle", "a blue square", "x"])
    assert similarity.shape == (2, 3) and similarity.abs().max() <= 1 + 1e-5


@pytest.mark.parametrize("captions", ["templates", "natural"])
def test_paired_negatives_contradict_their_image(captions):
    """A hard negative phrased with its caption's draws always says something false
    of the caption's image; phrased independently, some natural negatives do not
    (they leave out the attribute that was changed), template ones always do."""
    train = Shapes("train", seed=3, captions=captions)
    tokenizer = train_bpe([train.scene(i)[0] for i in range(300)], vocab_size=400)
    true_negatives = {}
    for negatives in ("independent", "paired"):
        *_, shown, asked = _pairs(train, 400, tokenizer, 0, negatives)
        caption_true = codes_satisfy(shown, asked[0]).diagonal()  # (N,)
        negative_true = codes_satisfy(shown, asked[1]).diagonal()
        assert caption_true.all()  # a caption describes its own image
        true_negatives[negatives] = 1 - negative_true.float().mean().item()
    assert true_negatives["paired"] == 1.0
    if captions == "templates":
        assert true_negatives["independent"] == 1.0
    else:
        assert true_negatives["independent"] < 0.97
