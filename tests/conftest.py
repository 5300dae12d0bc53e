"""Shared test helpers: random weights for tiny models, an in-process CLI runner, and
a tiny book for the website tests (two lessons with stored outputs, made by hand:
math, a figure, a progress bar and an exercise's solution)."""

import base64
import contextlib
import io
import json

import nbformat
import pytest
import torch
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook, new_output
from PIL import Image

from sdscratch.book import header_markdown, load_book, setup_code


def randomise(model, seed):
    """Move norms and biases off their initial 1s and 0s, so every weight matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


def run_cli(*args) -> tuple[int, str, str]:
    """Run `python -m sdscratch ARGS` in this process: (exit code, stdout, stderr)."""
    from sdscratch.__main__ import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(arg) for arg in args])
        except SystemExit as exit:  # argparse's usage errors
            code = exit.code
    return code, out.getvalue(), err.getvalue()


MATH = (
    "The forward process adds noise: $x_t = \\sqrt{\\bar\\alpha_t}\\, x_0 + "
    "\\sqrt{1 - \\bar\\alpha_t}\\, \\epsilon$, and\n\n"
    "$$\\bar\\alpha_t = \\prod_{s=1}^{t} (1 - \\beta_s), \\quad \\mathcal N(0, I).$$"
)


# An exercise's solution, as lessons mark it: the website folds the cell.
SOLUTION = "# BEGIN SOLUTION\nanswer = 6 * 7\n# END SOLUTION\nprint(answer)"


def png(colour) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (24, 16), colour).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def tqdm_widget() -> tuple[dict, dict]:
    """A tqdm progress bar's output and widget state, as Jupyter stores them."""

    def model(name, **state):
        return {
            "model_name": name,
            "model_module": "@jupyter-widgets/controls",
            "model_module_version": "2.0.0",
            "state": state,
        }

    state = {
        "bar": model(
            "HBoxModel",
            children=["IPY_MODEL_left", "IPY_MODEL_progress", "IPY_MODEL_right"],
        ),
        "left": model("HTMLModel", value="100%"),
        "progress": model("FloatProgressModel", value=5.0, min=0.0, max=5.0),
        "right": model("HTMLModel", value=" 5/5 [00:00&lt;00:00, 9.90it/s]"),
    }
    output = new_output(
        "display_data",
        data={
            "application/vnd.jupyter.widget-view+json": {
                "model_id": "bar",
                "version_major": 2,
                "version_minor": 0,
            },
            "text/plain": "  0%|          | 0/5 [00:00<?, ?it/s]",
        },
    )
    widgets = {
        "application/vnd.jupyter.widget-state+json": {
            "state": state,
            "version_major": 2,
            "version_minor": 0,
        }
    }
    return output, widgets


def lesson_notebook(book: dict, file: str, title: str, colour) -> dict:
    progress, widgets = tqdm_widget()
    code = new_code_cell(
        "show(picture)",
        execution_count=2,
        outputs=[
            new_output(
                "display_data",
                data={"image/png": png(colour), "text/plain": "<Figure>"},
            )
        ],
    )
    loop = new_code_cell(
        "for step in tqdm(range(5)): pass", execution_count=3, outputs=[progress]
    )
    solution = new_code_cell(
        SOLUTION,
        execution_count=4,
        outputs=[new_output("stream", name="stdout", text="42\n")],
    )
    nb = new_notebook(
        cells=[
            new_markdown_cell(header_markdown(book, file, title)),
            new_code_cell(setup_code(book), execution_count=1),
            new_markdown_cell(MATH),
            code,
            loop,
            new_markdown_cell("**Exercise.** Find the answer."),
            solution,
        ]
    )
    nb.metadata["widgets"] = widgets
    return nb


def make_book(root, titles=("Adding noise", "Removing noise"), unlisted=()):
    """Write book.toml, README.md and lessons/ for a book of `titles` under `root`."""
    real = load_book()
    book = {"book": real["book"], "output": real["output"], "lesson": []}
    (root / "lessons").mkdir(parents=True)
    toml = [
        f"[book]\ntitle = {json.dumps(real['book']['title'])}",
        f"[output.html]\ngit-repository-url = "
        f"{json.dumps(real['output']['html']['git-repository-url'])}",
    ]
    for number, title in enumerate(titles, start=1):
        file = f"{number:02d}_lesson_{number}.ipynb"
        book["lesson"].append({"file": file, "title": title})
        toml.append(
            f"[[lesson]]\nfile = {json.dumps(file)}\ntitle = {json.dumps(title)}"
        )
    for number, entry in enumerate(book["lesson"]):
        colour = (200, 40 * number, 60)
        nb = lesson_notebook(book, entry["file"], entry["title"], colour)
        nbformat.write(nb, root / "lessons" / entry["file"])
    for file in unlisted:
        nbformat.write(new_notebook(), root / "lessons" / file)
    (root / "assets").mkdir()
    Image.new("RGB", (4, 4), (0, 90, 200)).save(root / "assets" / "dot.png")
    (root / "book.toml").write_text("\n\n".join(toml) + "\n")
    rows = "".join(
        f"| [{entry['title']}](lessons/{entry['file']}) |\n" for entry in book["lesson"]
    )
    (root / "README.md").write_text(
        "# A tiny course\n\nAn introduction with a [link](#lessons), a [file]"
        "(LICENSE) and a picture: ![a dot](assets/dot.png)\n\n"
        f"## Lessons\n\n| lesson |\n|---|\n{rows}\n## Numbers\n\nNot on the site.\n"
    )
    return root


@pytest.fixture(scope="module")
def bundled():
    """The bundled shapes-ldm pipeline, loaded once per test module."""
    from sdscratch.pipeline import StableDiffusion

    return StableDiffusion.from_pretrained("shapes-ldm")


@pytest.fixture
def pipe(bundled):
    """A copy of the bundled pipeline that a test may change (LoRAs, tokens)."""
    import copy

    return copy.deepcopy(bundled)


def diffusers_of(pipe):
    """`pipe.to_diffusers()`, without its progress bars."""
    reference = pipe.to_diffusers()
    reference.set_progress_bar_config(disable=True)
    return reference


@pytest.fixture
def tiny_book(tmp_path):
    """Two lessons (math, a figure, a progress bar, a solution) in tmp_path."""
    return make_book(tmp_path / "book")
