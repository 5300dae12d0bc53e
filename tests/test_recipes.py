"""What the recipes share: one manifest schema, one number of threads, seeds."""

import ast
import json
from pathlib import Path

import pytest
import torch

import sdscratch.recipes
from sdscratch import assets_dir
from sdscratch.recipes import MANIFEST_KEYS, RECIPE_THREADS, RECIPES, run_recipe
from sdscratch.recipes.common import COURSE_SCENES, pinned_threads, scenes_seed

BUNDLED = sorted((assets_dir() / "models").glob("*/MANIFEST.json"))
NUMBER = (int, float)


def check_schema(manifest: dict):
    """Assert that a MANIFEST.json has exactly MANIFEST_KEYS, each of its type."""
    assert sorted(manifest) == sorted(MANIFEST_KEYS)
    assert isinstance(manifest["command"], str)
    assert manifest["command"].startswith("python -m sdscratch train ")
    assert isinstance(manifest["seed"], int)
    for key in ("wall_time_seconds", "cpu_seconds", "load_average_end"):
        assert isinstance(manifest[key], NUMBER), key
    assert manifest["load_average_start"] is None or isinstance(
        manifest["load_average_start"], NUMBER
    )
    assert isinstance(manifest["threads"], int)
    for key in ("machine", "torch", "created"):
        assert isinstance(manifest[key], str), key
    assert isinstance(manifest["sha256"], dict) and manifest["sha256"]
    assert isinstance(manifest["quality"], dict) and manifest["quality"]
    moved = {"cpu_seconds", "threads", "load_average", "load_average_start"}
    assert not moved & set(manifest["quality"])  # recorded once, at the top


def test_every_recipe_has_a_bundled_checkpoint():
    folders = sorted(path.parent.name for path in BUNDLED)
    assert folders == sorted(default for _, default in RECIPES.values())


@pytest.mark.parametrize("path", BUNDLED, ids=lambda path: path.parent.name)
def test_bundled_manifest_follows_the_schema(path):
    manifest = json.loads(path.read_text())
    check_schema(manifest)
    name = manifest["command"].split()[4]
    assert RECIPES[name][1] == path.parent.name  # made by the recipe of its folder
    assert manifest["threads"] == RECIPE_THREADS


@pytest.fixture
def tiny_recipe(monkeypatch):
    """A registered recipe that writes one file and reports its torch threads."""

    def tiny(out, seed, steps):
        (out / "weights.bin").write_bytes(bytes([seed]))
        return {"threads_seen": torch.get_num_threads(), "steps": steps}

    monkeypatch.setitem(RECIPES, "tiny", (tiny, "tiny"))
    return "tiny"


def test_run_recipe_pins_threads_and_writes_the_schema(tiny_recipe, tmp_path):
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        manifest = run_recipe(tiny_recipe, out=tmp_path / "made", seed=3, steps=1)
        assert torch.get_num_threads() == 2  # restored afterwards
    finally:
        torch.set_num_threads(before)
    check_schema(manifest)
    assert manifest["quality"]["threads_seen"] == RECIPE_THREADS == 1
    assert json.loads((tmp_path / "made" / "MANIFEST.json").read_text()) == manifest


def test_pinned_threads_restores_after_an_error():
    before = torch.get_num_threads()
    with pytest.raises(RuntimeError), pinned_threads(3):
        assert torch.get_num_threads() == 3
        raise RuntimeError
    assert torch.get_num_threads() == before


def test_scenes_seed_keeps_what_each_recipe_drew():
    """judge and pixel drew Shapes(seed=the run's seed); vae and clip the course's
    scenes; ldm trained on the course's scenes and evaluated on the run's."""
    assert scenes_seed("judge", 5) == scenes_seed("pixel-text", 5, "eval") == 5
    assert scenes_seed("vae", 5) == scenes_seed("clip", 5, "eval") == COURSE_SCENES
    assert (scenes_seed("ldm", 5), scenes_seed("ldm", 5, "eval")) == (0, 5)
    assert set(sdscratch.recipes.common.SCENES_FOLLOW_SEED) == set(RECIPES)


def test_recipe_modules_import_at_the_top():
    """No function-local imports in the recipes: each module says what it uses."""
    for path in Path(sdscratch.recipes.__file__).parent.glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                inner = [n for n in ast.walk(node) if isinstance(n, ast.Import)]
                inner += [n for n in ast.walk(node) if isinstance(n, ast.ImportFrom)]
                assert not inner, f"{path.name}: {node.name} imports inside"
