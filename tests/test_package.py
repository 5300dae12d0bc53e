"""The package's own helpers: seed_everything, and assets_dir in a built wheel."""

import json
import os
import random
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch

from sdscratch import seed_everything
from sdscratch.book import ROOT


def draws():
    return random.random(), np.random.rand(), torch.rand(1).item()


def test_seed_everything_seeds_python_numpy_and_torch():
    random.seed(5)
    np.random.seed(5)
    torch.manual_seed(5)
    expected = draws()  # each library seeded by hand
    seed_everything(1)
    other = draws()
    generator = seed_everything(5)
    assert draws() == expected and other != expected
    assert torch.equal(
        torch.randn(3, generator=generator),
        torch.randn(3, generator=torch.Generator().manual_seed(5)),
    )


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """The wheel `pip wheel` builds from this repository, unzipped."""
    out = tmp_path_factory.mktemp("wheel")
    try:
        build = subprocess.run(
            [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
             "-q", "-w", str(out), str(ROOT)],
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        pytest.fail("pip wheel took more than 5 minutes")
    assert build.returncode == 0, build.stderr[-2000:]
    (built,) = out.glob("sdscratch-*.whl")
    unzipped = out / "unzipped"
    zipfile.ZipFile(built).extractall(unzipped)
    return unzipped


def test_the_wheel_carries_the_bundled_checkpoints(wheel):
    models = wheel / "sdscratch" / "assets" / "models"
    bundled = sorted(p.name for p in (ROOT / "assets" / "models").iterdir())
    assert sorted(p.name for p in models.iterdir()) == bundled
    for name in bundled:
        manifest = json.loads((models / name / "MANIFEST.json").read_text())
        for file in manifest["sha256"]:
            source = ROOT / "assets" / "models" / name / file
            packed = models / name / file
            assert packed.read_bytes() == source.read_bytes(), f"{name}/{file}"


def test_assets_dir_finds_the_wheels_own_assets(wheel, tmp_path):
    """Imported from the unzipped wheel, away from the repository: assets_dir() is
    the wheel's sdscratch/assets, and the bundled model verifies there."""
    code = (
        "import sdscratch\n"
        "from sdscratch.checkpoint import resolve, verify\n"
        "print(sdscratch.__file__)\n"
        "print(sdscratch.assets_dir())\n"
        "print(verify(resolve('shapes-ldm'))['command'])\n"
    )
    env = {key: value for key, value in os.environ.items()
           if key != "SDSCRATCH_ASSETS"} | {"PYTHONPATH": str(wheel)}  # fmt: skip
    result = subprocess.run([sys.executable, "-c", code], capture_output=True,
                            text=True, cwd=tmp_path, env=env)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    module, assets, command = result.stdout.splitlines()
    assert module == str(wheel / "sdscratch" / "__init__.py")
    assert assets == str(wheel / "sdscratch" / "assets")
    assert command.startswith("python -m sdscratch train ldm")


def test_the_main_names_import_from_the_top_and_are_the_modules_own():
    import importlib

    import sdscratch

    for name, module in sdscratch.EXPORTS.items():
        defined = getattr(importlib.import_module(module), name)
        assert getattr(sdscratch, name) is defined
    assert set(sdscratch.EXPORTS) <= set(dir(sdscratch))
    with pytest.raises(AttributeError, match="no attribute 'Nothing'"):
        sdscratch.Nothing  # noqa: B018
    # `import sdscratch` alone does not load the pipeline (nor diffusers)
    code = "import sys, sdscratch; print('sdscratch.pipeline' in sys.modules)"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True,
                            text=True)  # fmt: skip
    assert loaded.stdout.strip() == "False", loaded.stderr
    code = "from sdscratch import StableDiffusion, UNet, UNetConfig, VAE, VAEConfig, "
    code += "TextEncoder, Tokenizer, NoiseSchedule, sample"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
