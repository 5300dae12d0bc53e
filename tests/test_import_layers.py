"""The package's layers import downwards only.

Stable Diffusion's parts (the core: every module at the top of sdscratch/) know
nothing of the Shapes world; `sdscratch.shapes` builds on the core; the recipes on
both; the course tooling (the website builder and the exercises) sits on top, out of
the core's import path; the command line (`__main__`) above everything. Checked
twice: statically, every import statement of every module (function-local ones
too, and module names handed to `importlib.import_module`), and dynamically, by
importing and running the core in a fresh process.
"""

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

import sdscratch

PACKAGE = Path(sdscratch.__file__).parent
# The layers, lowest first; a module may import only from its own layer and lower.
# A top-level module not listed here is core.
LAYERS = ("core", "shapes", "recipes", "course tooling", "command line")
LAYER_OF = {
    "sdscratch.shapes": "shapes",
    "sdscratch.recipes": "recipes",
    "sdscratch.exercises": "course tooling",
    "sdscratch.book": "course tooling",
    "sdscratch.pages": "course tooling",
    "sdscratch.__main__": "command line",
    "sdscratch.cli_files": "command line",
    "sdscratch.cli_examples": "command line",
    "sdscratch.cli_finetune": "command line",
}
MODULE_NAME = re.compile(r"sdscratch(\.\w+)+")


def layer(module: str) -> str:
    """The layer of a dotted module name under sdscratch ("sdscratch.shapes.data")."""
    for prefix, name in LAYER_OF.items():
        if module == prefix or module.startswith(prefix + "."):
            return name
    return "core"


def module_name(path: Path) -> str:
    """sdscratch/shapes/data.py -> "sdscratch.shapes.data" (a package: its name)."""
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(source: str, module: str, is_package=False) -> list[tuple[int, set]]:
    """Every import in `source` (module `module`), anywhere: (line, the sdscratch
    modules that statement may load).

    `from sdscratch import recipes` may load sdscratch.recipes; relative imports
    are resolved; a string that is a whole module name ("sdscratch.shapes.data",
    as handed to importlib.import_module) counts as an import too.
    """
    package = module if is_package else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                anchor = parts[: len(parts) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            names = {base} | {f"{base}.{alias.name}" for alias in node.names}
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            names = {node.value} if MODULE_NAME.fullmatch(node.value) else set()
        else:
            continue
        names = {name for name in names if name.split(".")[0] == "sdscratch"}
        if names:
            found.append((node.lineno, names))
    return found


def violations(sources: dict[str, str]) -> list[str]:
    """One line per import statement that loads a module of a higher layer than
    its own, in {path under sdscratch/: source}."""
    found = []
    for path, source in sorted(sources.items()):
        path = PACKAGE / path
        importer = module_name(path)
        rank = LAYERS.index(layer(importer))
        for line, names in imports(source, importer, path.name == "__init__.py"):
            highest = max(names, key=lambda name: LAYERS.index(layer(name)))
            if LAYERS.index(layer(highest)) > rank:
                found.append(
                    f"{importer}:{line} ({layer(importer)}) imports {highest} "
                    f"({layer(highest)})"
                )
    return found


def package_sources() -> dict[str, str]:
    return {
        str(path.relative_to(PACKAGE)): path.read_text()
        for path in PACKAGE.rglob("*.py")
    }


def test_the_layers_cover_the_package():
    names = {module_name(path) for path in PACKAGE.rglob("*.py")}
    for prefix in LAYER_OF:
        assert any(name == prefix or name.startswith(prefix + ".") for name in names)
    core = {name for name in names if layer(name) == "core"}
    # the core holds Stable Diffusion's parts, not the Shapes world or the course
    assert {"sdscratch.pipeline", "sdscratch.unet", "sdscratch.metrics"} <= core
    assert not {"sdscratch.shapes.data", "sdscratch.recipes.ldm"} & core


def test_no_module_imports_from_a_layer_above_its_own():
    assert violations(package_sources()) == []


@pytest.mark.parametrize(
    "path, source",
    [
        ("vae.py", "import torch\nfrom sdscratch.shapes.data import Shapes\n"),
        ("pipeline.py", "def f():\n    from sdscratch.shapes import judge\n"),
        ("clip.py", "import sdscratch.recipes.ldm\n"),
        ("unet.py", "from sdscratch import recipes\n"),
        ("metrics.py", "from . import pages\n"),
        ("__init__.py", "EXPORTS = {'Shapes': 'sdscratch.shapes.data'}\n"),
        ("train.py", "from sdscratch.exercises.compare import check\n"),
        ("shapes/judge.py", "from sdscratch.recipes.common import seeded\n"),
        ("shapes/evaluate.py", "from ..recipes import ldm\n"),
        ("recipes/ldm.py", "from sdscratch.book import build\n"),
        ("exercises/compare.py", "from sdscratch.__main__ import main\n"),
    ],
)
def test_the_check_catches_an_upward_import(path, source):
    """A mutation: one upward import added to a module is one violation."""
    sources = package_sources()
    assert violations(sources) == []
    sources[path] = sources[path] + "\n" + source
    (found,) = violations(sources)
    assert found.startswith(module_name(PACKAGE / path) + ":")


def test_downward_and_sideways_imports_pass_the_check():
    sources = {
        "vae.py": "from sdscratch.unet import UNet\nfrom . import layers\n",
        "shapes/judge.py": "from .data import Shapes\nfrom sdscratch import metrics\n",
        "recipes/ldm.py": "from sdscratch.shapes.evaluate import evaluate_model\n",
        "book.py": "from sdscratch.pages import lesson_page\n",
        "__main__.py": "from sdscratch.recipes import run_recipe\n",
        "metrics.py": '"""See `sdscratch.shapes.judge` for the judge."""\n',
    }
    assert violations(sources) == []


CORE_RUN = """
import importlib, pkgutil, sys
import torch
import sdscratch
core = [m.name for m in pkgutil.iter_modules(sdscratch.__path__, "sdscratch.")
        if not m.ispkg and m.name not in ("sdscratch.book", "sdscratch.pages",
                                          "sdscratch.__main__", "sdscratch.cli_files",
                                          "sdscratch.cli_examples",
                                          "sdscratch.cli_finetune")]
for name in core:
    importlib.import_module(name)
for name in sdscratch.EXPORTS:
    getattr(sdscratch, name)
pipe = sdscratch.StableDiffusion.from_pretrained("shapes-ldm")
pipe("a red circle", num_inference_steps=2, generator=torch.Generator().manual_seed(0))
above = ("sdscratch.shapes", "sdscratch.recipes", "sdscratch.exercises",
         "sdscratch.book", "sdscratch.pages", "sdscratch.__main__",
         "sdscratch.cli_files", "sdscratch.cli_examples", "sdscratch.cli_finetune")
print(len(core), sorted(m for m in sys.modules if m.startswith(above)))
"""


def test_the_core_imported_and_run_loads_nothing_above_it():
    """In a fresh process: every core module imported, the top-level names
    resolved, the bundled model loaded and sampled; no upper layer is loaded."""
    result = subprocess.run([sys.executable, "-c", CORE_RUN], capture_output=True,
                            text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    count, loaded = result.stdout.split(" ", 1)
    assert int(count) >= 15  # the core modules were found
    assert loaded.strip() == "[]"
