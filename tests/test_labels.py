"""Hand labels: the file format, the labelling sheets, and every reader's agreement
with every labels file in tests/data/labels/ (target: 97 % per attribute and size).
"""

import copy
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from sdscratch.shapes.data import Shapes, render_batch
from sdscratch.shapes.labels import (
    KEYS,
    LabelsError,
    agreement,
    decode_image,
    encode_image,
    judge_reader,
    labelled_images,
    load_labels,
    outline_reader,
    parse_line,
    prompt_shown,
    rates,
    save_labels,
    sheet,
)
from sdscratch.viz import to_uint8

LABELS = sorted((Path(__file__).parent / "data" / "labels").glob("*.json"))
TARGET = 0.97  # agreement of a reader with the labeller, per attribute and size
READERS = {"judge": judge_reader(), "outline": outline_reader}
# (labels file, reader) -> the (attribute, size group) measured below the target.
# Keep it true: the test fails when one of these reaches the target too.
SHAPE_BELOW = {("shape", "all"), ("shape", "large"), ("shape", "small")}
BELOW_TARGET = {
    # The bundled judge calls small round blobs "star" (and 4-point blobs "cross").
    ("shapes-ldm-pilot", "judge"): SHAPE_BELOW,
    ("shapes-ldm-pilot-2", "judge"): SHAPE_BELOW,
    # The outline measure reads lumpy blobs as circles, thin crosses as diamonds.
    ("shapes-ldm-pilot", "outline"): SHAPE_BELOW,
    ("shapes-ldm-pilot-2", "outline"): SHAPE_BELOW,
    # With the heart LoRA (scale 0.75): the judge calls the LoRA's winged and
    # club-like blobs "heart" (5 of the 6 large unreadable shapes), small circles
    # "star" (6 of 11), small ovals and 4-point sparkles "cross"; it misses a faint
    # blob and calls the smaller of two hearts large (size: small 96.8 %).
    ("shapes-heart-lora", "judge"): SHAPE_BELOW | {("size", "small")},
    # The outline measure calls those blobs "heart" too (6 of 6), small hearts
    # "circle" (5 of 25), small ovals and triangles "unreadable".
    ("shapes-heart-lora", "outline"): SHAPE_BELOW,
}


def below_target(reads, labels) -> set:
    return {
        (key, group)
        for key, groups in rates(agreement(reads, labels)).items()
        for group, rate in groups.items()
        if rate < TARGET
    }


@pytest.mark.parametrize("reader", READERS)
@pytest.mark.parametrize("path", LABELS, ids=lambda path: path.stem)
def test_agreement_with_hand_labels(path, reader):
    labels = load_labels(path)
    reads = READERS[reader](labelled_images(labels))
    expected = BELOW_TARGET.get((path.stem, reader), set())
    assert below_target(reads, labels) == expected, (
        f"{reader} on {path.name}: {rates(agreement(reads, labels))}"
    )


def ground_truth_labels(n=40, size=32) -> tuple[torch.Tensor, dict]:
    """Real test scenes, labelled with what the renderer drew."""
    images, captions, scenes = Shapes("test", size=size).batch(range(n))
    entries = []
    for i, (image, caption, attrs) in enumerate(zip(images, captions, scenes)):
        png, sha = encode_image(image)
        objects = [{key: obj[key] for key in KEYS} for obj in attrs["objects"]]
        entries.append({"id": i, "prompt": caption, "seed": i, "png": png,
                        "sha256": sha, "objects": objects})  # fmt: skip
    return images, {"model": "none: real scenes", "images": entries}


@pytest.mark.parametrize("reader", READERS)
def test_readers_agree_with_the_truth_of_real_scenes(reader):
    images, labels = ground_truth_labels()
    assert below_target(READERS[reader](images), labels) == set()


def test_a_reader_that_calls_everything_a_circle_is_caught():
    images, labels = ground_truth_labels()
    reads = outline_reader(images)
    for objects in reads:
        for obj in objects:
            obj["shape"] = "circle"
    assert ("shape", "all") in below_target(reads, labels)
    missing = [objects[:-1] for objects in outline_reader(images)]  # one lost each
    assert ("position", "all") in below_target(missing, labels)


def test_a_labels_file_round_trips(tmp_path):
    images, labels = ground_truth_labels(n=3)
    path = tmp_path / "labels.json"
    save_labels(path, labels)
    again = load_labels(path)
    assert again == json.loads(json.dumps(labels))
    stored = labelled_images(again)
    torch.testing.assert_close(stored, torch.from_numpy(to_uint8(images)).permute(
        0, 3, 1, 2).float() / 127.5 - 1)  # fmt: skip


def test_bad_labels_are_refused(tmp_path):
    _, labels = ground_truth_labels(n=2)
    broken = copy.deepcopy(labels)
    broken["images"][0]["objects"][0]["shape"] = "hexagon"
    save_labels(tmp_path / "a.json", broken)
    with pytest.raises(LabelsError, match="hexagon"):
        load_labels(tmp_path / "a.json")
    (tmp_path / "b.json").write_text("{not json")
    with pytest.raises(LabelsError):
        load_labels(tmp_path / "b.json")
    save_labels(tmp_path / "c.json", labels | {"lora": {"file": "shapes-heart-lora"}})
    with pytest.raises(LabelsError, match="lora"):
        load_labels(tmp_path / "c.json")
    tampered = copy.deepcopy(labels["images"][1])
    tampered["sha256"] = "0" * 64
    with pytest.raises(LabelsError, match="sha256"):
        decode_image(tampered)


def test_parse_line():
    assert parse_line("7: star red large left | unreadable blue small right") == (
        7,
        [
            {"shape": "star", "colour": "red", "size": "large", "position": "left"},
            {"shape": "unreadable", "colour": "blue", "size": "small",
             "position": "right"},
        ],
    )  # fmt: skip
    assert parse_line("8:") == (8, [])
    with pytest.raises(LabelsError):
        parse_line("9: star red large")
    with pytest.raises(LabelsError):
        parse_line("9: star red large unreadable")  # the position is always seen


def test_sheet_shows_every_pixel_enlarged():
    scene = {"objects": [{"shape": "square", "colour": "blue", "size": "large",
                          "position": "left"}], "relation": None}  # fmt: skip
    images = render_batch([scene] * 7, 32)
    picture = sheet(images, list(range(7)), scale=4, columns=3)
    assert picture.size == (3 * (128 + 8), 3 * (128 + 14 + 8))
    tile = picture.crop((4, 14, 4 + 128, 14 + 128)).resize((32, 32), Image.NEAREST)
    assert (torch.tensor(list(tile.getdata())) == torch.from_numpy(
        to_uint8(images)[0]).reshape(-1, 3)).all()  # fmt: skip


def test_what_the_labeller_could_not_read():
    """An unreadable size or colour is not compared; an unreadable shape is, and
    only a reader that says "unreadable" agrees with it."""
    images, labels = ground_truth_labels(n=4)
    labels["images"][0]["objects"][0]["size"] = "unreadable"
    labels["images"][1]["objects"][0]["shape"] = "unreadable"
    counts = agreement(outline_reader(images), labels)
    objects = sum(len(entry["objects"]) for entry in labels["images"])
    assert counts["size"]["all"] == (objects - 1, objects - 1)
    assert counts["shape"]["all"] == (objects - 1, objects)


def test_prompt_shown():
    entry = {"prompt": "a small red star above a large blue square", "objects": [
        {"shape": "star", "colour": "red", "size": "small", "position": "top"},
        {"shape": "square", "colour": "blue", "size": "large", "position": "bottom"},
    ]}  # fmt: skip
    assert prompt_shown(entry)
    entry["objects"][0]["shape"] = "circle"  # a round blob, for the star
    assert not prompt_shown(entry)
    entry["objects"][0]["shape"] = "star"
    assert not prompt_shown(entry | {"objects": entry["objects"][:1]})
