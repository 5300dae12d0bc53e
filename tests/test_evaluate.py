"""`evaluate_model` and `python -m sdscratch evaluate`, on a tiny random checkpoint."""

import json

import pytest
import torch

from conftest import run_cli
from sdscratch.metrics import frechet_distance, inception_score
from sdscratch.pipeline import StableDiffusion
from sdscratch.shapes.data import (
    COLOURS,
    HELDOUT_TEMPLATES,
    NATURAL_PHRASINGS,
    POSITIONS,
    SHAPES,
    SIZES,
    parse_caption,
    render_batch,
    uses_template,
)
from sdscratch.shapes.evaluate import (
    PROMPT_SETS,
    class_names,
    class_posteriors,
    evaluate_model,
    evaluation_prompts,
    fid_floor,
    outline_scores,
    real_features,
    real_images,
)
from sdscratch.shapes.judge import Judge, JudgeConfig, image_features, prompt_accuracy
from sdscratch.shapes.outline import outline_accuracy

HELDOUT = [t for templates in HELDOUT_TEMPLATES.values() for t in templates]


def tiny_pipeline() -> StableDiffusion:
    """A random text-to-image pipeline: 16×16 images from 4×4 latents."""
    from sdscratch.clip import TextEncoder, TextEncoderConfig
    from sdscratch.shapes.data import Shapes
    from sdscratch.tokenizer import train_bpe
    from sdscratch.unet import UNet, UNetConfig
    from sdscratch.vae import VAE, VAEConfig

    captions = [Shapes().scene(i)[0] for i in range(200)]
    tokenizer = train_bpe(captions, vocab_size=600, context_length=16)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        text_encoder = TextEncoder(
            TextEncoderConfig(len(tokenizer), 16, 16, 32, 1, 2, "quick_gelu", 1e-5,
                              tokenizer.eos_id)
        )  # fmt: skip
        vae = VAE(VAEConfig(block_out_channels=(8, 8, 8), norm_num_groups=4))
        unet = UNet(
            UNetConfig(
                sample_size=4, block_out_channels=(8, 16), layers_per_block=1,
                attention_levels=(False, True), cross_attention_dim=16, num_heads=2,
                norm_num_groups=4,
            )
        )  # fmt: skip
    return StableDiffusion(unet, vae, text_encoder, tokenizer)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from sdscratch.checkpoint import write_manifest

    root = tmp_path_factory.mktemp("tiny-ldm")
    tiny_pipeline().save_pretrained(root)
    write_manifest(root, "python -m sdscratch train ldm", 0, 0.0, {})
    return root


def random_judge() -> Judge:
    with torch.random.fork_rng():
        torch.manual_seed(1)
        return Judge(JudgeConfig()).eval()


def test_evaluate_model_scores_every_prompt_once(checkpoint):
    from test_metrics import tiny_clip

    judge, clip = random_judge(), tiny_clip()
    options = dict(samples=6, num_inference_steps=2, batch_size=4, judge=judge,
                   clip=clip, progress=False)  # fmt: skip
    result = evaluate_model(checkpoint, **options)
    assert result["one_object_prompts"] + result["two_object_prompts"] == 6
    # the same images again, drawn here: batches of 4 prompts, one generator
    pipe, (captions, scenes) = StableDiffusion.from_pretrained(checkpoint), \
        evaluation_prompts(6)  # fmt: skip
    generator = torch.Generator().manual_seed(0)
    images = torch.cat([
        pipe(captions[s : s + 4], num_inference_steps=2, output_type="pt",
             generator=generator)
        for s in range(0, 6, 4)
    ])  # fmt: skip
    for count, key in ((1, "prompt_accuracy_one_object"),
                       (2, "prompt_accuracy_two_objects")):  # fmt: skip
        keep = [i for i, attrs in enumerate(scenes) if len(attrs["objects"]) == count]
        expected = prompt_accuracy(images[keep], [scenes[i] for i in keep], judge)
        assert result[key] == expected
    features = image_features(images, judge)
    expected_fid = frechet_distance(features, real_features(6, "val", judge=judge))
    assert result["fid"] == pytest.approx(expected_fid, rel=1e-6)
    assert result["fid_floor"] == pytest.approx(fid_floor(6, judge), rel=1e-9)
    big = torch.nn.functional.interpolate(images, scale_factor=2)  # CLIP's 32×32
    cos = clip.similarity(big, captions).diagonal()  # the CLIP score by hand
    assert result["clip_score"] == pytest.approx(
        (100 * cos.clamp(min=0)).mean().item(), rel=1e-5
    )
    posteriors = class_posteriors(images, judge)  # the Inception Score by hand
    assert result["inception_score"] == inception_score(posteriors, splits=6)[0]
    assert result["outline_iou"] == outline_scores(images, scenes)["outline_iou"]
    assert result["seconds_per_image"] > 0 and result["cpu_seconds_per_image"] > 0
    again = evaluate_model(StableDiffusion.from_pretrained(checkpoint), **options)
    assert again["fid"] == result["fid"]  # seeded: the same images
    other = evaluate_model(checkpoint, seed=1, **options)
    assert other["fid"] != result["fid"]


def test_evaluate_model_images_do_not_depend_on_the_batch_size(checkpoint):
    """One generator for all the noise: with ddim, batches of 4 or of 5 prompts
    give the same images, so the same figures."""
    from test_metrics import tiny_clip

    options = dict(samples=7, num_inference_steps=2, judge=random_judge(),
                   clip=tiny_clip(), progress=False)  # fmt: skip
    fours = evaluate_model(checkpoint, batch_size=4, **options)
    fives = evaluate_model(checkpoint, batch_size=5, **options)
    for key in ("prompt_accuracy_one_object", "prompt_accuracy_two_objects", "fid",
                "clip_score"):  # fmt: skip
        assert fours[key] == fives[key], key


def test_evaluate_model_speaks_the_pipelines_keywords(checkpoint):
    with pytest.raises(ValueError, match="guidance_scale must be 0 or more"):
        evaluate_model(checkpoint, samples=2, guidance_scale=-1.0)
    with pytest.raises(TypeError, match="steps"):
        evaluate_model(checkpoint, samples=2, steps=2)  # the old name is gone


class PerfectPipeline(StableDiffusion):
    """Draws each prompt's own test scene: what a perfect model could give."""

    def __init__(self, n, scenes=0, prompts="full"):
        self.images = real_images(n, "test", seed=scenes)[0]
        # the canonical (or held-out) captions of those scenes
        self.captions = evaluation_prompts(n, seed=scenes, prompts=prompts)[0]
        self.schedule, self.calls, self.done = None, [], 0

    def __call__(self, prompts, **options):
        assert prompts == self.captions[self.done : self.done + len(prompts)]
        self.calls.append(options | {"prompts": prompts})
        self.done += len(prompts)
        return self.images[self.done - len(prompts) : self.done]


def test_a_perfect_model_is_always_right_and_scores_the_floor():
    from test_metrics import tiny_clip

    pipe = PerfectPipeline(40)
    result = evaluate_model(
        pipe, samples=40, sampler="euler", num_inference_steps=3, guidance_scale=2.0,
        batch_size=16, clip=tiny_clip(), progress=False,
    )  # fmt: skip
    assert result["prompt_accuracy_one_object"] == 1
    assert result["prompt_accuracy_two_objects"] == 1
    assert result["fid"] == pytest.approx(result["fid_floor"], rel=1e-9)
    assert result["fid_floor"] == pytest.approx(fid_floor(40), rel=1e-9)
    assert result["inception_score"] == result["inception_score_real"]
    assert result["outline_iou"] == result["outline_iou_real"] > 0.95
    assert result["outline_accuracy_one_object"] == 1
    assert result["outline_accuracy_two_objects"] == 1
    assert [len(call["prompts"]) for call in pipe.calls] == [16, 16, 8]
    call = pipe.calls[0]
    assert (call["sampler"], call["num_inference_steps"]) == ("euler", 3)
    assert call["guidance_scale"] == 2.0


def test_evaluate_model_draws_prompts_and_real_images_from_the_scenes_seed():
    from test_metrics import tiny_clip

    pipe = PerfectPipeline(20, scenes=1)  # asserts that it is asked seed 1's prompts
    result = evaluate_model(pipe, samples=20, scenes=1, clip=tiny_clip(),
                            progress=False)  # fmt: skip
    assert result["prompt_accuracy_one_object"] == 1
    assert result["prompt_accuracy_two_objects"] == 1
    assert result["fid"] == pytest.approx(result["fid_floor"], rel=1e-9)
    assert result["fid_floor"] == pytest.approx(fid_floor(20, seed=1), rel=1e-9)
    assert result["fid_floor"] != pytest.approx(fid_floor(20), rel=1e-3)


# ----------------------------------------------------------------------------------
# The Inception Score on the judge's classes; the outline measure


def one_object(shape, colour, size="large", position="center") -> dict:
    obj = {"shape": shape, "colour": colour, "size": size, "position": position}
    return {"objects": [obj], "relation": None}


def test_class_posteriors_are_the_objects_shape_and_colour():
    names = class_names()
    assert len(names) == len(set(names)) == 7 * 7  # the bundled judge's
    scenes = [
        one_object("star", "blue", "small", "left"),
        one_object("cross", "yellow"),
        parse_caption("a large red circle above a small green square"),
    ]
    posteriors = class_posteriors(render_batch(scenes))
    assert posteriors.shape == (3, 49)
    torch.testing.assert_close(posteriors.sum(1), torch.ones(3))
    assert names[posteriors[0].argmax()] == "blue star" and posteriors[0].max() > 0.9
    assert names[posteriors[1].argmax()] == "yellow cross"
    top = posteriors[2].topk(2)  # two objects: half each
    assert {names[i] for i in top.indices} == {"red circle", "green square"}
    assert top.values.sum() > 0.9 and top.values.min() > 0.4


class DrawingPipeline(StableDiffusion):
    """Draws scene `i % len(scenes)` for the i-th prompt, whatever it asks."""

    def __init__(self, scenes):
        self.schedule, self.scenes, self.done = None, scenes, 0

    def __call__(self, prompts, **options):
        picked = [self.scenes[(self.done + i) % len(self.scenes)]
                  for i in range(len(prompts))]  # fmt: skip
        self.done += len(prompts)
        return render_batch(picked)


def test_the_inception_score_rewards_one_perfect_picture_per_class_fid_does_not():
    """What the Inception Score cannot see: a model that draws one picture per
    class scores above real data, while FID (and prompt accuracy) see it."""
    from test_metrics import tiny_clip

    options = dict(samples=144, clip=tiny_clip(), progress=False)
    each = [one_object(shape, colour) for shape in SHAPES for colour in COLOURS]
    per_class = evaluate_model(DrawingPipeline(each), **options)
    assert per_class["inception_score"] > per_class["inception_score_real"] + 2
    assert per_class["fid"] > 3 * per_class["fid_floor"]
    assert per_class["prompt_accuracy_one_object"] < 0.2
    one_class = evaluate_model(DrawingPipeline([one_object("circle", "red")]),
                               **options)  # fmt: skip
    assert one_class["inception_score"] < 1.1 < one_class["inception_score_real"]


def test_blobs_lower_the_outline_iou():
    """Every shape drawn as a circle: its outline IoU with the asked shape drops."""
    captions, scenes = evaluation_prompts(40)
    blobs = [{**attrs, "objects": [obj | {"shape": "circle"} for obj in
             attrs["objects"]]} for attrs in scenes]  # fmt: skip
    real = outline_scores(render_batch(scenes), scenes)
    drawn = outline_scores(render_batch(blobs), scenes)
    assert drawn["outline_iou"] < real["outline_iou"] - 0.05
    circles = [obj["shape"] == "circle" for a in scenes for obj in a["objects"]]
    assert drawn["outline_accuracy_one_object"] < 1 and not all(circles)
    images, _, attrs = real_images(40, "test")  # the prompts' scenes, jittered
    expected = outline_accuracy(images, attrs)["mean_iou"]
    assert outline_scores(images, captions)["outline_iou"] == expected


# ----------------------------------------------------------------------------------
# Prompt sets


def test_underspecified_prompts_leave_out_size_position_or_both():
    captions, scenes = evaluation_prompts(600, prompts="underspecified")
    patterns = []
    for text, attrs in zip(captions, scenes):
        assert attrs["relation"] is None and len(attrs["objects"]) == 1, text
        (obj,) = attrs["objects"]
        assert obj["shape"] in SHAPES and obj["colour"] in COLOURS, text
        patterns.append((obj["size"] is None, obj["position"] is None))
    for pattern in ((True, False), (False, True), (True, True)):  # size, position
        assert abs(patterns.count(pattern) / 600 - 1 / 3) < 0.07, pattern
    assert (False, False) not in patterns
    objects = [attrs["objects"][0] for attrs in scenes]
    for key, values in (("shape", SHAPES), ("colour", COLOURS)):
        assert {o[key] for o in objects} == set(values), key
    for key, values in (("size", SIZES), ("position", POSITIONS)):
        assert {o[key] for o in objects} == {*values, None}, key
    bare = [text for text in captions if text.split()[0] not in ("a", "an")]
    assert abs(len(bare) / 600 - 0.5) < 0.07
    assert evaluation_prompts(50, prompts="underspecified")[0] == captions[:50]
    other = evaluation_prompts(50, prompts="underspecified", seed=1)[0]
    assert other != captions[:50]
    with pytest.raises(ValueError, match="one object"):
        evaluation_prompts(5, objects=2, prompts="underspecified")


def test_heldout_prompts_describe_the_test_scenes_in_new_phrasings():
    captions, scenes = evaluation_prompts(200, prompts="heldout")
    assert scenes == evaluation_prompts(200)[1]  # the full prompts' scenes
    used = set()
    for text in captions:
        (template,) = [t for t in HELDOUT if uses_template(text, t)]
        used.add(template)
        assert not any(uses_template(text, t) for t in NATURAL_PHRASINGS), text
    assert used == set(HELDOUT)
    captions, scenes = evaluation_prompts(20, objects=2, prompts="heldout")
    assert all(len(attrs["objects"]) == 2 for attrs in scenes)
    with pytest.raises(ValueError, match="Unknown prompts 'casual'"):
        evaluation_prompts(5, prompts="casual")


OPPOSITE = {"left": "right", "right": "left", "top": "bottom", "bottom": "top"}


class ObedientPipeline(StableDiffusion):
    """Draws what each prompt names (a left-out size: large, a left-out position:
    left); with `extra`, every other picture gets a second, small object opposite
    (none if the first is in the center: there is no room)."""

    def __init__(self, extra=False):
        self.schedule, self.extra, self.done = None, extra, 0

    def __call__(self, prompts, **options):
        scenes = []
        for text in prompts:
            (obj,) = parse_caption(text)["objects"]
            obj = obj | {"size": obj["size"] or "large"}
            obj = obj | {"position": obj["position"] or "left"}
            objects = [obj]
            if self.extra and self.done % 2 and obj["position"] in OPPOSITE:
                opposite = OPPOSITE[obj["position"]]
                objects.append(obj | {"size": "small", "position": opposite})
            scenes.append({"objects": objects, "relation": None})
            self.done += 1
        return render_batch(scenes)


def test_evaluate_model_on_underspecified_prompts():
    from test_metrics import tiny_clip

    options = dict(samples=24, batch_size=10, prompts="underspecified",
                   clip=tiny_clip(), progress=False)  # fmt: skip
    result = evaluate_model(ObedientPipeline(), **options)
    assert result["prompt_accuracy_one_object"] == 1
    assert result["one_object_prompts"] == 24 and result["two_object_prompts"] == 0
    assert "fid" not in result and "fid_floor" not in result
    assert "prompt_accuracy_two_objects" not in result
    assert "inception_score_real" not in result and "outline_iou_real" not in result
    assert result["outline_accuracy_one_object"] == 1  # left out: what is read
    assert result["outline_iou"] > 0.95
    doubled = evaluate_model(ObedientPipeline(extra=True), **options)
    _, scenes = evaluation_prompts(24, prompts="underspecified")
    extra = [i % 2 and s["objects"][0]["position"] != "center"
             for i, s in enumerate(scenes)]  # fmt: skip
    assert sum(extra) >= 8
    assert doubled["prompt_accuracy_one_object"] == 1 - sum(extra) / 24
    assert doubled["attributes_one_object"]["position"] == 1 - sum(extra) / 24
    assert doubled["outline_accuracy_one_object"] == 1 - sum(extra) / 24


def test_evaluate_model_on_heldout_prompts_of_a_perfect_model():
    from test_metrics import tiny_clip

    pipe = PerfectPipeline(30, prompts="heldout")
    result = evaluate_model(pipe, samples=30, prompts="heldout", clip=tiny_clip(),
                            progress=False)  # fmt: skip
    assert result["prompt_accuracy_one_object"] == 1
    assert result["prompt_accuracy_two_objects"] == 1
    assert result["fid"] == pytest.approx(result["fid_floor"], rel=1e-9)


def evaluate(*args):
    """Run `sdscratch evaluate ARGS` in this process: (exit code, stdout, stderr)."""
    return run_cli("evaluate", *args)


@pytest.mark.parametrize(
    "args, message",
    [
        (("--model", "/no/such/folder"), "/no/such/folder"),
        (("--samples", 0), "must be 1 or more"),
        (("--steps", "x"), "--steps"),
        (("--guidance", -1), "--guidance: must be 0 or more"),
        (("--sampler", "plms"), "invalid choice: 'plms'"),
        (("--samples", 1), "at least two images"),
    ],
)
def test_evaluate_errors_are_one_line_and_exit_code_2(checkpoint, args, message):
    if "--model" not in args:
        args = ("--model", checkpoint, "--steps", 1, *args)
    code, out, err = evaluate(*args)
    assert code == 2 and out == "", (code, out, err)
    assert err.count("\n") == 1 and "Traceback" not in err
    assert message in err


def test_evaluate_prints_one_json_line(checkpoint):
    code, out, err = evaluate("--model", checkpoint, "--samples", 4, "--steps", 2,
                              "--batch-size", 3, "--guidance", 3)  # fmt: skip
    assert code == 0, err
    assert out.count("\n") == 1
    result = json.loads(out)
    assert result["model"] == str(checkpoint) and result["samples"] == 4
    assert (result["sampler"], result["steps"], result["guidance"]) == ("ddim", 2, 3)
    for key in ("prompt_accuracy_one_object", "prompt_accuracy_two_objects", "fid",
                "fid_floor", "clip_score", "seconds_per_image", "inception_score",
                "inception_score_std", "inception_score_real", "outline_iou",
                "outline_iou_real", "outline_accuracy_one_object",
                "outline_accuracy_two_objects"):  # fmt: skip
        assert isinstance(result[key], float), key


@pytest.mark.parametrize("prompts", PROMPT_SETS)
def test_evaluate_chooses_the_prompt_set(checkpoint, prompts):
    code, out, err = evaluate("--model", checkpoint, "--samples", 3, "--steps", 1,
                              "--prompts", prompts)  # fmt: skip
    assert code == 0, err
    result = json.loads(out)
    assert result["prompts"] == prompts
    assert ("fid" in result) == (prompts != "underspecified")
    if prompts == "underspecified":
        assert result["one_object_prompts"] == 3


def test_evaluate_refuses_an_unknown_prompt_set(checkpoint):
    code, out, err = evaluate("--model", checkpoint, "--prompts", "casual")
    assert code == 2 and out == "" and err.count("\n") == 1
    assert "invalid choice: 'casual'" in err


def test_a_prompt_the_grammar_cannot_read_still_generates():
    """Unknown words are no Shapes caption (so never evaluation ground truth), but
    the bundled model still draws something for them."""
    with pytest.raises(ValueError, match="is not a Shapes caption"):
        parse_caption("a teal hexagon")
    pipe = StableDiffusion.from_pretrained("shapes-ldm")
    images = pipe(["a teal hexagon"], num_inference_steps=2, output_type="pt",
                  generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert images.shape[0] == 1 and torch.isfinite(images).all()
