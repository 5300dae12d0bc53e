"""Every lesson widget still works after Run All: moved to a new value, it draws a new
figure of a sensible size, with no error (its data must not come from globals that
later cells replace)."""

import base64
import json

import nbformat
import pytest
from nbclient import NotebookClient
from nbformat.v4 import new_code_cell

from sdscratch.book import OFFLINE_ENVIRONMENT, ROOT

# lesson, the name of its `widgets.interact(...)` result, {control: new value}
WIDGETS = [
    ("00_tour.ipynb", "playground", {"seed": 7, "steps": 10, "sampler": "euler"}),
    ("01_forward_diffusion.ipynb", "slider", {"t": 600, "name": "cosine"}),
    ("07_guidance.ipynb", "guidance_slider", {"guidance_scale": 2.0}),
    ("10_img2img_inpainting.ipynb", "strength_slider", {"strength": 0.3}),
]
LARGEST_PNG = 300_000  # bytes: a figure of a few images, not of hundreds


def move(variable: str, values: dict) -> str:
    """Code that sets each control and prints what the widget's output then holds."""
    return f"""
import json
box = {variable}.widget
controls = {{c.description: c for c in box.kwargs_widgets}}
shown = []
for name, value in {values!r}.items():
    controls[name].value = value
    shown.append([dict(o) for o in box.out.outputs])
print(json.dumps(shown))
"""


def run_and_move(notebook, variable: str, values: dict) -> list[list[dict]]:
    """Run a lesson top to bottom, then move its widget: the widget's outputs after
    each move."""
    notebook.cells.append(new_code_cell(move(variable, values)))
    folder = str(ROOT / "lessons")
    client = NotebookClient(
        notebook, timeout=600, resources={"metadata": {"path": folder}}
    )
    client.execute()  # raises CellExecutionError on any error, ours included
    printed = "".join(
        output.get("text", "")
        for output in notebook.cells[-1].outputs
        if output.get("name") == "stdout"
    )
    return json.loads(printed)


@pytest.mark.parametrize(
    "lesson, variable, values", WIDGETS, ids=[w[0] for w in WIDGETS]
)
def test_a_widget_moved_after_run_all_draws_again(
    lesson, variable, values, monkeypatch
):
    for key, value in OFFLINE_ENVIRONMENT.items():
        monkeypatch.setenv(key, value)
    notebook = nbformat.read(ROOT / "lessons" / lesson, as_version=4)
    for outputs in run_and_move(notebook, variable, values):
        assert not [o for o in outputs if o.get("output_type") == "error"], outputs
        pngs = [o["data"]["image/png"] for o in outputs if "image/png" in o["data"]]
        assert len(pngs) == 1, f"{variable} should draw one figure, drew {len(pngs)}"
        assert len(base64.b64decode(pngs[0])) < LARGEST_PNG
