"""Every lesson is listed in book.toml, opens with the shared header, stores outputs.

The lessons themselves run as tests through nbval (`make test`); this file checks
what nbval does not.
"""

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
