import json
import random
import warnings

import numpy as np
import pytest
import scipy.linalg
import scipy.ndimage
import scipy.stats
import torch

from sdscratch import assets_dir
from sdscratch.metrics import clip_score, frechet_distance, inception_score
from sdscratch.recipes import run_recipe
from sdscratch.shapes.data import (
    COLOURS,
    RELATIONS,
    SHAPES,
    SIZES,
    Shapes,
    natural_caption,
    parse_caption,
    render,
    render_batch,
    satisfies,
    satisfies_matrix,
    strip_geometry,
)
from sdscratch.shapes.evaluate import (
    evaluate_samples,
    evaluation_prompts,
    fid_floor,
    real_features,
    real_images,
)
from sdscratch.shapes.judge import (
    SLOTS,
    Judge,
    JudgeConfig,
    attribute_accuracy,
    attributes,
    bundled_judge,
    canonical,
    check,
    degrade,
    gaussian_blur,
    image_features,
    prompt_accuracy,
    slot_targets,
)
from sdscratch.viz import to_pil

JUDGE = assets_dir() / "models" / "shapes-judge"


def scene(text: str) -> dict:
    """attrs with geometry at the positions' centres, from a caption."""
    return parse_caption(text)


# ----------------------------------------------------------------------------------
# FID against the formula with scipy.linalg.sqrtm (pytorch-fid's implementation)


def scipy_fid(a: np.ndarray, b: np.ndarray) -> float:
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    with warnings.catch_warnings():  # singular products: scipy warns, still answers
        warnings.simplefilter("ignore")
        root = scipy.linalg.sqrtm(cov_a @ cov_b)
    root = root.real if np.iscomplexobj(root) else root
    diff = mu_a - mu_b
    return diff @ diff + np.trace(cov_a) + np.trace(cov_b) - 2 * np.trace(root)


def feature_sets(seed, n, m, d, rank=None):
    """Two sets of correlated Gaussian features; `rank`: both live in a subspace."""
    rng = np.random.default_rng(seed)
    k = rank or d
    a = rng.normal(size=(n, k)) @ rng.normal(size=(k, d))
    b = 0.8 * rng.normal(size=(m, k)) @ rng.normal(size=(k, d)) + 0.3
    return a, b


@pytest.mark.parametrize(
    "n, m, d, rank",
    [
        (2000, 1500, 16, None),  # well conditioned
        (300, 500, 64, None),
        (50, 80, 64, None),  # N < D: singular covariances
        (30, 40, 128, None),
        (20, 20, 32, None),
        (500, 400, 64, 5),  # rank 5 in 64 dimensions
    ],
)
def test_frechet_distance_matches_scipy_sqrtm(n, m, d, rank):
    a, b = feature_sets(n + d, n, m, d, rank)
    expected = scipy_fid(a, b)
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-6)
    assert frechet_distance(torch.from_numpy(a).float(), b) == pytest.approx(
        scipy_fid(a.astype(np.float32).astype(np.float64), b), rel=1e-6
    )


def test_frechet_distance_of_a_set_with_itself_is_zero_and_is_symmetric():
    a, b = feature_sets(0, 200, 300, 24)
    assert abs(frechet_distance(a, a)) < 1e-8
    assert frechet_distance(a, b) == pytest.approx(frechet_distance(b, a), rel=1e-9)


def test_frechet_distance_of_known_gaussians():
    # Diagonal covariances commute: d² = ‖μ_a − μ_b‖² + Σ (σ_a − σ_b)².
    a = np.random.default_rng(1).normal(size=(400, 3))
    a -= a.mean(0)
    white = np.linalg.cholesky(np.cov(a, rowvar=False))
    a = a @ np.linalg.inv(white).T  # sample covariance exactly I
    b = a * np.array([2.0, 1.0, 0.5]) + np.array([1.0, 0.0, 0.0])
    assert frechet_distance(a, b) == pytest.approx(1.0 + 1.0 + 0.0 + 0.25, rel=1e-9)


def test_frechet_distance_rejects_bad_shapes():
    with pytest.raises(ValueError, match="must be"):
        frechet_distance(np.zeros((5, 3)), np.zeros((5, 4)))
    with pytest.raises(ValueError, match="at least two"):
        frechet_distance(np.zeros((1, 3)), np.zeros((5, 3)))


# ----------------------------------------------------------------------------------
# Inception Score against scipy's KL divergence (the paper's code, with scipy)


def scipy_inception_score(probs: np.ndarray, splits: int) -> tuple[float, float]:
    """Salimans et al. 2016's code: consecutive parts, exp of the mean KL."""
    n, scores = len(probs), []
    for i in range(splits):
        part = probs[i * n // splits : (i + 1) * n // splits]
        marginal = part.mean(0)
        kl = [scipy.stats.entropy(row, marginal) for row in part]
        scores.append(np.exp(np.mean(kl)))
    return float(np.mean(scores)), float(np.std(scores))


@pytest.mark.parametrize(
    "n, k, concentration, splits",
    [
        (1000, 36, 0.1, 10),  # confident posteriors
        (1000, 36, 5.0, 10),  # unsure ones
        (997, 7, 0.5, 10),  # N not a multiple of the splits
        (50, 100, 0.2, 1),  # more classes than images
        (64, 5, 1.0, 3),
    ],
)
def test_inception_score_matches_scipy(n, k, concentration, splits):
    rng = np.random.default_rng(n + k)
    probs = rng.dirichlet(np.full(k, concentration), size=n)  # (N, K)
    probs[: n // 4, : k // 2] = 0  # exact zeros: 0 · log 0 counts 0
    probs /= probs.sum(1, keepdims=True)
    mean, std = inception_score(probs, splits)
    expected = scipy_inception_score(probs, splits)
    assert mean == pytest.approx(expected[0], rel=1e-10)
    assert std == pytest.approx(expected[1], rel=1e-8, abs=1e-12)
    assert inception_score(torch.tensor(probs).float(), splits)[0] == pytest.approx(
        expected[0], rel=1e-5
    )


def test_inception_score_is_one_for_one_class_and_k_for_k_certain_classes():
    k, n = 12, 600
    one_class = torch.zeros(n, k)
    one_class[:, 3] = 1  # every image certainly of class 3
    assert inception_score(one_class) == (1.0, 0.0)
    certain = torch.eye(k).repeat(n // k, 1)  # each class 50 times, each certain
    mean, std = inception_score(certain, splits=1)
    assert mean == pytest.approx(k, rel=1e-12)
    unsure = torch.full((n, k), 1 / k)  # every class used, no image sure of one
    assert inception_score(unsure, splits=1)[0] == pytest.approx(1.0, rel=1e-12)
    # half as confident: each image torn between two classes
    torn = (torch.eye(k) + torch.eye(k).roll(1, 1)).repeat(n // k, 1) / 2
    assert inception_score(torn, splits=1)[0] == pytest.approx(k / 2, rel=1e-12)


def test_inception_score_rejects_bad_input():
    with pytest.raises(ValueError, match=r"must be \(N, K\)"):
        inception_score(np.ones(5) / 5)
    with pytest.raises(ValueError, match="sum to 1"):
        inception_score(np.ones((4, 3)))
    with pytest.raises(ValueError, match="sum to 1"):
        inception_score(np.array([[1.5, -0.5], [0.5, 0.5]]))
    with pytest.raises(ValueError, match="splits must be from 1 to N = 4"):
        inception_score(np.eye(4), splits=5)


# ----------------------------------------------------------------------------------
# What the judge is asked: slots, canonical attrs


def test_a_relation_and_its_reverse_ask_the_same_of_the_judge():
    above = scene("a large red circle above a small blue square")
    below = scene("a small blue square below a large red circle")
    for name, value in slot_targets([above]).items():
        assert torch.equal(value, slot_targets([below])[name])
    assert canonical(below) == canonical(above) == strip_geometry(above)
    right = scene("a small blue square right of a large red circle")
    assert canonical(right)["relation"] == "left of"
    assert canonical(right)["objects"][0]["shape"] == "circle"


def test_slot_targets_mark_the_occupied_positions():
    targets = slot_targets(
        ["a small red circle on the left", scene("a big blue star at the top")]
    )
    assert targets["present"].tolist() == [
        [int(slot == "left") for slot in SLOTS],
        [int(slot == "top") for slot in SLOTS],
    ]
    assert targets["shape"][0, SLOTS.index("right")] == -100  # empty: ignored


def test_gaussian_blur_matches_scipy():
    images = Shapes("val").batch(range(3))[0]
    sigma = torch.tensor([0.0, 0.5, 0.8])
    blurred = gaussian_blur(images, sigma)
    torch.testing.assert_close(blurred[0], images[0], rtol=0, atol=1e-6)
    for i in (1, 2):
        s = sigma[i].item()
        expected = scipy.ndimage.gaussian_filter(
            images[i].double().numpy(), (0, s, s), mode="nearest", truncate=2 / s
        )
        torch.testing.assert_close(
            blurred[i].double(), torch.from_numpy(expected), atol=1e-5, rtol=0
        )


def test_degrade_is_mild_and_seeded():
    images = Shapes("val").batch(range(16))[0]
    a = degrade(images, torch.Generator().manual_seed(0))
    b = degrade(images, torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and a.shape == images.shape
    assert 0 < (a - images).abs().mean() < 0.1 and a.abs().max() <= 1


# ----------------------------------------------------------------------------------
# Prompt accuracy: the logic, with an oracle that reads the true attributes


class Oracle(Judge):
    """A judge that reads, for image i, exactly the scene it was given for i."""

    def __init__(self, scenes):
        super().__init__(JudgeConfig())
        self.truth = slot_targets(scenes)

    def read(self, images):
        return {name: t[: len(images)] for name, t in self.truth.items()}


def test_prompt_accuracy_counts_every_wrong_attribute():
    truth = ["a large red circle above a small blue square"] * 6
    asked = [
        "a large red circle above a small blue square",  # right
        "a small blue square below a large red circle",  # the same picture
        "a large blue circle above a small red square",  # colours bound wrongly
        "a large red circle above a large blue square",  # wrong size
        "a large red circle left of a small blue square",  # wrong relation
        "a large red circle at the top",  # one object asked, two shown
    ]
    oracle = Oracle(truth)
    right = check(torch.zeros(6, 3, 32, 32), asked, oracle)
    assert right["scene"].tolist() == [True, True, False, False, False, False]
    assert right["colour"].tolist() == [True, True, False, True, False, True]
    assert right["size"].tolist() == [True, True, True, False, False, True]
    assert right["shape"].tolist() == [True, True, True, True, False, True]
    assert right["position"].tolist() == [True, True, True, True, False, False]
    assert prompt_accuracy(torch.zeros(6, 3, 32, 32), asked, oracle) == 2 / 6
    accuracy = attribute_accuracy(torch.zeros(6, 3, 32, 32), asked, oracle)
    assert accuracy["colour"] == pytest.approx(4 / 6)


def test_check_reads_a_left_out_attribute_as_any():
    truth = ["a large red circle on the left"] * 8 + [
        "a large red circle above a small blue square"
    ] * 5 + [{"objects": [], "relation": None}]  # fmt: skip
    asked = [
        ("a red circle", dict(scene=True)),
        ("red circle", dict(scene=True)),
        ("a circle that is red on the left", dict(scene=True)),
        ("a blue circle", dict(scene=False, colour=False)),
        ("a small red circle", dict(scene=False, size=False)),
        ("a red square", dict(scene=False, shape=False)),
        # a position named: read there, where nothing is
        ("red circle on the right", dict(scene=False, position=False, shape=False,
                                         colour=False, size=False)),
        ("a large red circle at the top", dict(scene=False, position=False,
                                               shape=False, colour=False,
                                               size=False)),
        # two objects where one was asked: the position is wrong, the rest is read
        # at the object that shows most of it (here the bottom one)
        ("a red circle", dict(scene=False, position=False)),
        ("a small blue square", dict(scene=False, position=False)),
        ("a small green square", dict(scene=False, position=False, colour=False)),
        ("a red circle above a blue square", dict(scene=True)),
        ("red circle above blue square that is large", dict(scene=False, size=False)),
        # an empty picture shows nothing that was asked
        ("a red circle", dict(scene=False, position=False, shape=False,
                              colour=False, size=False)),
    ]  # fmt: skip
    right = check(torch.zeros(len(truth), 3, 32, 32), [a for a, _ in asked],
                  Oracle(truth))  # fmt: skip
    for i, (text, wrong) in enumerate(asked):
        expected = {"position": True, "shape": True, "colour": True, "size": True}
        expected |= wrong
        got = {name: right[name][i].item() for name in expected}
        assert got == expected, (i, text)
    oracle, images = Oracle(truth[:8]), torch.zeros(8, 3, 32, 32)
    texts = [a for a, _ in asked[:8]]
    assert prompt_accuracy(images, texts, oracle) == 3 / 8
    accuracy = attribute_accuracy(images, texts, oracle)
    assert (accuracy["position"], accuracy["colour"]) == (6 / 8, 5 / 8)


def test_a_left_out_position_is_only_for_one_object():
    floating = {"shape": "circle", "colour": "red", "size": None, "position": None}
    with pytest.raises(ValueError, match="position"):
        slot_targets([{"objects": [floating], "relation": None}])
    pair = {"objects": [floating, floating], "relation": None}
    with pytest.raises(ValueError, match="one-object"):
        check(torch.zeros(1, 3, 32, 32), [pair], Oracle(["a red circle on the left"]))
    targets = slot_targets(["a red circle on the left"])
    assert targets["size"][0, SLOTS.index("left")] == -100  # left out: any size


def test_bundled_judge_checks_underspecified_prompts():
    truth = [
        "a large red circle on the left",
        "a large red circle above a small blue square",
        "a little blue star at the bottom",
        "a little blue star at the bottom",
    ]
    images = render_batch([scene(t) for t in truth])
    asked = ["a red circle", "a red circle", "blue star", "a big blue star"]
    assert check(images, asked)["scene"].tolist() == [True, False, True, False]


# ----------------------------------------------------------------------------------
# The bundled judge on real images it never saw


def test_bundled_judge_reads_held_out_images():
    images, _, scenes = real_images(2000, "test", offset=5000)
    accuracy = attribute_accuracy(images, scenes)
    assert min(accuracy.values()) >= 0.99, accuracy
    degraded = degrade(images, torch.Generator().manual_seed(5))
    assert attribute_accuracy(degraded, scenes)["scene"] >= 0.98
    manifest = json.loads((JUDGE / "MANIFEST.json").read_text())
    assert min(manifest["quality"]["heldout_accuracy"].values()) >= 0.99
    assert sum(p.stat().st_size for p in JUDGE.rglob("*")) <= 1_000_000


def test_bundled_judge_on_constructed_scenes_pil_and_64_pixels():
    truth = [
        "a large red circle above a small blue square",
        "a little green star on the right",
    ]
    images = render_batch([scene(t) for t in truth])
    asked = [
        "a small blue square below a large red circle",
        "a small green star at the left",
    ]
    assert check(images, asked)["scene"].tolist() == [True, False]
    assert check(to_pil(images), asked)["position"].tolist() == [True, False]
    big = torch.stack([render(scene(t), size=64) for t in truth])
    assert prompt_accuracy(big, truth) == 1.0
    predicted = bundled_judge().predict(images)
    assert predicted == [canonical(scene(t)) for t in truth]


def test_perfect_generator_scores_the_floor():
    captions, scenes = evaluation_prompts(64)
    images, _, _ = real_images(64, "test")  # what the prompts describe, drawn exactly
    clip = tiny_clip()
    result = evaluate_samples(images, captions, scenes, clip=clip)
    assert (
        result["prompt_accuracy_one_object"]
        == result["prompt_accuracy_two_objects"]
        == 1
    )
    assert result["fid"] == pytest.approx(fid_floor(64), rel=1e-9)
    cos = clip.similarity(images, captions).diagonal()  # the CLIP score by hand
    expected = (100 * cos.clamp(min=0)).mean().item()
    assert result["clip_score"] == pytest.approx(expected, rel=1e-5)
    features = image_features(images)
    assert features.shape == (64, JudgeConfig().hidden)
    torch.testing.assert_close(features, real_features(64, "test"))


# ----------------------------------------------------------------------------------
# Prompts


def test_evaluation_prompts_are_canonical_captions_of_the_split():
    captions, scenes = evaluation_prompts(20, objects=2)
    assert len(captions) == 20 and all(len(s["objects"]) == 2 for s in scenes)
    assert all(parse_caption(c) == s for c, s in zip(captions, scenes))
    captions, scenes = evaluation_prompts(10)
    assert scenes == [strip_geometry(Shapes("test").scene(i)[1]) for i in range(10)]
    with pytest.raises(ValueError, match="only"):
        evaluation_prompts(6000, objects=1)  # about half of 10,000


# ----------------------------------------------------------------------------------
# CLIP score


def tiny_clip():
    """A small randomly initialised CLIP with a tokenizer trained on captions."""
    from sdscratch.clip import (
        CLIP,
        ImageEncoder,
        ImageEncoderConfig,
        TextEncoder,
        TextEncoderConfig,
    )
    from sdscratch.tokenizer import train_bpe

    captions = [Shapes("train").scene(i)[0] for i in range(200)]
    tokenizer = train_bpe(captions, vocab_size=600, context_length=24)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        text = TextEncoder(
            TextEncoderConfig(
                vocab_size=len(tokenizer),
                max_position_embeddings=24,
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=1,
                num_attention_heads=2,
                eos_token_id=len(tokenizer) - 1,
                projection_dim=16,
            )
        )
        image = ImageEncoder(ImageEncoderConfig(channels=(8, 16), projection_dim=16))
    return CLIP(text, image, tokenizer).eval()


def test_clip_score_is_100_times_the_clamped_cosine_of_each_pair():
    clip = tiny_clip()
    images, captions, _ = real_images(12, "val")
    cos = clip.similarity(images, captions).diagonal()  # (12,)
    assert (cos < 0).any() and (cos > 0).any()  # so that clamping matters
    expected = (100 * cos.clamp(min=0)).mean().item()
    assert clip_score(images, captions, clip) == pytest.approx(expected, rel=1e-5)
    assert clip_score(images, captions, clip, batch_size=5) == pytest.approx(
        expected, rel=1e-5
    )
    big = torch.nn.functional.interpolate(images, scale_factor=2, mode="nearest")
    assert clip_score(big, captions, clip) == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match="texts"):
        clip_score(images, captions[:3], clip)


def test_bundled_clip_prefers_the_right_caption():
    images, captions, _ = real_images(200, "test")
    right = clip_score(images, captions)
    wrong = clip_score(images, captions[1:] + captions[:1])
    assert right > wrong + 5


# ----------------------------------------------------------------------------------
# The recipe


def test_judge_recipe_runs_briefly(tmp_path, monkeypatch):
    import sdscratch.recipes.judge

    monkeypatch.setattr(sdscratch.recipes.judge, "JUDGE_HELDOUT", 100)
    manifest = run_recipe("judge", out=tmp_path, steps=2)
    assert manifest["quality"]["steps"] == 2
    assert set(manifest["quality"]["heldout_accuracy"]) == {
        "position",
        "shape",
        "colour",
        "size",
        "scene",
    }
    judge = Judge.from_pretrained(tmp_path)
    shapes = attributes(sdscratch.recipes.judge.JUDGE_NOVEL)["shape"]
    read = judge(torch.zeros(2, 3, 32, 32))["shape"]
    assert read.shape == (2, len(SLOTS), len(shapes))
    assert (tmp_path / "judge" / "model.safetensors").stat().st_size <= 1_000_000


def edited(attrs, rng):
    """attrs with one thing changed (perhaps to the same value): a size, colour,
    shape, the position or relation, or the number of objects."""
    attrs = strip_geometry(attrs)
    objects, kind = attrs["objects"], rng.choice(["value", "place", "count"])
    if kind == "value":
        obj, key = rng.choice(objects), rng.choice(["size", "colour", "shape"])
        obj[key] = rng.choice(list({"size": SIZES, "colour": COLOURS,
                                    "shape": SHAPES}[key]))  # fmt: skip
    elif kind == "place" and len(objects) == 1:
        objects[0]["position"] = rng.choice(SLOTS)
    elif kind == "place":
        attrs["relation"] = rng.choice(list(RELATIONS))
        for obj, position in zip(objects, RELATIONS[attrs["relation"]]):
            obj["position"] = position
    elif len(objects) == 1:  # a second object below the first
        second = objects[0] | {"colour": rng.choice(list(COLOURS))}
        objects[0]["position"], second["position"] = RELATIONS["above"]
        attrs = {"objects": [objects[0], second], "relation": "above"}
    else:  # only the first object
        attrs = {"objects": objects[:1], "relation": None}
    return attrs


def test_check_with_a_perfect_reader_agrees_with_satisfies():
    """`check` (from what the judge reads) and `satisfies` (from the attrs) are two
    statements of what a prompt asks: on many scene and caption pairs they agree."""
    natural = Shapes("val", captions="natural")
    pool = [natural.scene(i) for i in range(500)]  # one batch of the Oracle
    rng = random.Random(0)
    truth, asked, expected = [], [], []
    for text, attrs in pool:
        said = parse_caption(natural_caption(edited(attrs, rng), rng))
        truth.append(attrs)
        asked.append(said)
        expected.append(satisfies(attrs, said))
    assert 100 < sum(expected) < 400, "both answers occur often"
    right = check(torch.zeros(len(truth), 3, 32, 32), asked, Oracle(truth))
    assert right["scene"].tolist() == expected
    for text, attrs in pool:
        assert satisfies(attrs, parse_caption(text)), text


def test_satisfies_matrix_is_satisfies_for_every_pair():
    """The batched form (what CLIP's recipe uses to tell which captions in a batch
    an image matches) agrees with `satisfies` on every scene and caption pair."""
    natural = Shapes("val", captions="natural")
    rng = random.Random(1)
    scenes = [natural.scene(i)[1] for i in range(60)]
    edits = [edited(attrs, rng) for attrs in scenes]
    texts = [natural_caption(attrs, rng) for attrs in scenes + edits]
    asked = [parse_caption(text) for text in texts]
    matrix = satisfies_matrix(scenes, asked)
    expected = [[satisfies(attrs, said) for said in asked] for attrs in scenes]
    assert matrix.tolist() == expected
    assert 60 <= matrix.sum() < matrix.numel() // 2, "both answers occur"


def test_a_novel_judge_reads_the_novel_shape_and_colour():
    """JudgeConfig(novel=True) reads seven shapes and colours; the base judge (the
    bundled one's config) refuses a pink heart with one sentence."""
    judge = Judge(JudgeConfig(novel=True))
    logits = judge(torch.zeros(2, 3, 32, 32))
    assert logits["shape"].shape == logits["colour"].shape == (2, 5, 7)
    targets = slot_targets(["a pink heart on the left"], judge.attributes)
    left = SLOTS.index("left")
    assert judge.attributes["shape"][targets["shape"][0, left]] == "heart"
    assert judge.attributes["colour"][targets["colour"][0, left]] == "pink"
    assert Judge(JudgeConfig())(torch.zeros(1, 3, 32, 32))["shape"].shape[-1] == 6
    with pytest.raises(ValueError, match="does not read the shape 'heart'"):
        slot_targets(["a pink heart on the left"])
