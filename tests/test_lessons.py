"""Every lesson is listed in book.toml, opens with the shared header, stores outputs,
and stores its figures sharp and no wider than the website's column.

The lessons themselves run as tests through nbval (`make test`); this file checks
what nbval does not.
"""

import base64
import io
import json
import re
from pathlib import Path

import pytest

from sdscratch.book import (
    ROOT,
    book_lessons,
    header_markdown,
    links,
    load_book,
    setup_code,
)
from sdscratch.exercises.notebooks import has_solutions
from sdscratch.viz import LESSON_DPI, MIN_FONTSIZE, PAGE_WIDTH

LESSONS = sorted((ROOT / "lessons").glob("*.ipynb"))
BOOK = load_book()
LISTED = BOOK.get("lesson", [])


def cells(path: Path) -> list[dict]:
    return json.loads(path.read_text())["cells"]


def source(cell: dict) -> str:
    text = cell["source"]
    return "".join(text) if isinstance(text, list) else text


def test_book_lists_exactly_the_lessons_in_order():
    listed = [lesson["file"] for lesson in book_lessons(BOOK)]  # or a clear BookError
    assert listed == [path.name for path in LESSONS]


@pytest.mark.parametrize("path", LESSONS, ids=lambda p: p.name)
def test_lesson_name_is_numbered_topic(path):
    assert re.fullmatch(r"\d\d_[a-z0-9_]+\.ipynb", path.name)


@pytest.mark.parametrize("lesson", LISTED, ids=lambda lesson: lesson["file"])
def test_lesson_opens_with_title_badges_and_setup(lesson):
    first, second = cells(ROOT / "lessons" / lesson["file"])[:2]
    assert first["cell_type"] == "markdown"
    title = source(first).splitlines()[0].removeprefix("# ")
    notebook = json.loads((ROOT / "lessons" / lesson["file"]).read_text())
    assert source(first) == header_markdown(
        BOOK, lesson["file"], title, exercises=has_solutions(notebook)
    )
    link = links(BOOK, lesson["file"])
    assert f"/blob/main/lessons/{lesson['file']})" in link["colab"] + ")"
    assert second["cell_type"] == "code"
    assert source(second) == setup_code(BOOK)


@pytest.mark.parametrize("path", LESSONS, ids=lambda p: p.name)
def test_lesson_has_stored_outputs_and_no_stored_error(path):
    code = [cell for cell in cells(path) if cell["cell_type"] == "code"]
    assert any(cell.get("outputs") for cell in code), (
        "run `make lessons` to store outputs"
    )
    for cell in code:
        for output in cell.get("outputs", []):
            assert output["output_type"] != "error", f"stored error in:\n{source(cell)}"


@pytest.mark.parametrize("path", LESSONS, ids=lambda p: p.name)
def test_lesson_outputs_come_from_one_run_top_to_bottom(path):
    """Cells ran 1, 2, 3, ... in order: the stored outputs are one fresh run's."""
    code = [cell for cell in cells(path) if cell["cell_type"] == "code"]
    counts = [cell.get("execution_count") for cell in code if source(cell).strip()]
    assert counts == list(range(1, len(counts) + 1)), (
        f"cells ran out of order or not at all ({counts}): run `make lessons`"
    )


def png_outputs(path: Path) -> list[tuple[bytes, dict]]:
    """Every stored PNG of a lesson, with the size the notebook shows it at."""
    found = []
    for cell in cells(path):
        for output in cell.get("outputs", []):
            if "image/png" in output.get("data", {}):
                data = base64.b64decode(output["data"]["image/png"])
                found.append((data, output.get("metadata", {}).get("image/png", {})))
    return found


@pytest.mark.parametrize("path", LESSONS, ids=lambda p: p.name)
def test_lesson_figures_are_sharp_and_fit_the_page(path):
    """2x PNGs shown at half their pixels, and no wider than the website's column
    (a wider one is scaled down, and its 10-pixel text with it)."""
    from PIL import Image

    for data, shown in png_outputs(path):
        width, height = Image.open(io.BytesIO(data)).size
        assert (width // 2, height // 2) == (shown.get("width"), shown.get("height")), (
            "a figure stored without viz.lesson_style's 2x pixels: run `make lessons`"
        )
        assert shown["width"] <= PAGE_WIDTH, (
            f"a figure {shown['width']} px wide: narrow it to {PAGE_WIDTH} px "
            f"({PAGE_WIDTH / LESSON_DPI:.1f} inches at {LESSON_DPI} dpi)"
        )


@pytest.mark.parametrize("path", LESSONS, ids=lambda p: p.name)
def test_lesson_figures_come_from_the_lesson_style(path):
    """The figure style lives in viz.lesson_style, and no text is set smaller."""
    code = "\n".join(source(c) for c in cells(path) if c["cell_type"] == "code")
    assert "lesson_style()" in code and "figure.dpi" not in code
    sizes = re.findall(r"fontsize=([\d.]+|\"[a-z-]+\")", code)
    assert all(size[0].isdigit() and float(size) >= MIN_FONTSIZE for size in sizes), (
        f"a font size under {MIN_FONTSIZE} points: {sizes}"
    )
