"""Exercise notebooks: solutions taken out of the lessons, and every check then
saying "not done yet"; the committed exercises/ up to date with the lessons."""

import contextlib
import io
import json
from pathlib import Path

import pytest

from conftest import run_cli
from sdscratch.exercises import NOT_DONE
from sdscratch.exercises.notebooks import (
    BEGIN,
    END,
    ExerciseError,
    exercise_notebook,
    has_solutions,
    strip_solutions,
    write_exercises,
)

ROOT = Path(__file__).resolve().parent.parent

EXERCISE = f"""def snr(alphas_cumprod):
    # the signal-to-noise ratio of every timestep
    {BEGIN}
    ratio = alphas_cumprod / (1 - alphas_cumprod)
    return ratio
    {END}
"""
CHECK = "from sdscratch import exercises\nexercises.check_snr(snr)"


def cell(kind, source, outputs=()):
    made = {"cell_type": kind, "metadata": {}, "source": source}
    if kind == "code":
        made |= {"outputs": list(outputs), "execution_count": 3 if outputs else None}
    return made


def lesson(*cells) -> dict:
    return {"cells": list(cells), "metadata": {"widgets": {"state": 1}},
            "nbformat": 4, "nbformat_minor": 5}  # fmt: skip


def test_a_solution_becomes_raise_not_implemented_at_its_indentation():
    stripped = strip_solutions(EXERCISE)
    assert stripped == (
        "def snr(alphas_cumprod):\n"
        "    # the signal-to-noise ratio of every timestep\n"
        "    raise NotImplementedError\n"
    )


def test_two_solutions_in_one_cell_and_code_after_them_stay_apart():
    source = f"{BEGIN}\na = 1\n{END}\nb = 2\n  {BEGIN}\n  c = 3\n  {END}\nd = 4\n"
    assert strip_solutions(source) == (
        "raise NotImplementedError\nb = 2\n  raise NotImplementedError\nd = 4\n"
    )


@pytest.mark.parametrize(
    "source, words",
    [
        (f"{BEGIN}\nx = 1\n", "without # END SOLUTION"),
        (f"x = 1\n{END}\n", "without # BEGIN SOLUTION"),
        (f"{BEGIN}\n{BEGIN}\n{END}\n{END}\n", "inside another solution"),
    ],
)
def test_markers_that_do_not_pair_are_one_sentence(source, words):
    with pytest.raises(ExerciseError, match=words):
        strip_solutions(source, "lessons/01_x.ipynb, cell 4")


def test_the_exercise_notebook_clears_outputs_and_keeps_the_prose():
    output = {"output_type": "stream", "name": "stdout", "text": "snr: right\n"}
    made = exercise_notebook(
        lesson(cell("markdown", "Write `snr`."), cell("code", EXERCISE, [output]))
    )
    prose, code = made["cells"]
    assert prose["source"] == "Write `snr`."
    assert code["outputs"] == [] and code["execution_count"] is None
    assert "NotImplementedError" in code["source"] and "ratio =" not in code["source"]
    assert "widgets" not in made["metadata"]


def source(item) -> str:
    text = item["source"]
    return text if isinstance(text, str) else "".join(text)


def is_check_cell(text: str) -> bool:
    """Only check calls (and the import of `exercises`)."""
    lines = [line for line in text.splitlines() if line.strip()]
    return bool(lines) and all(
        line.startswith("exercises.check_") or line == "from sdscratch import exercises"
        for line in lines
    )


def exercise_cells(lesson: dict) -> list[int]:
    """The indices of a lesson's exercise cells and check cells."""
    return [
        i
        for i, item in enumerate(lesson["cells"])
        if item["cell_type"] == "code"
        and (BEGIN in source(item) or is_check_cell(source(item)))
    ]


def run_exercise_cells(notebook: dict, indices: list[int]) -> str:
    """What cells `indices` print when run in order, in this process (an exercise
    cell holds only its function, which takes what it uses as arguments, so these
    cells run without the rest of the lesson)."""
    namespace, out = {}, io.StringIO()
    preamble = "import math\nimport torch\nimport torch.nn.functional as F\n"
    preamble += "from einops import rearrange\n"
    exec(preamble + "from sdscratch import exercises", namespace)
    for i in indices:
        with contextlib.redirect_stdout(out):
            exec(source(notebook["cells"][i]), namespace)
    return out.getvalue()


def test_a_lesson_passes_its_checks_and_its_exercise_copy_says_not_done():
    book = lesson(cell("code", EXERCISE), cell("code", CHECK))
    cells = exercise_cells(book)
    assert cells == [0, 1]
    assert run_exercise_cells(book, cells) == "snr: right on all 1 random tests.\n"
    unsolved = run_exercise_cells(exercise_notebook(book), cells)
    assert unsolved == f"snr: {NOT_DONE}\n"


def test_make_exercises_writes_only_lessons_with_exercises(tmp_path):
    lessons = tmp_path / "lessons"
    lessons.mkdir()
    with_exercise = lesson(cell("code", EXERCISE), cell("code", CHECK))
    (lessons / "01_a.ipynb").write_text(json.dumps(with_exercise))
    (lessons / "02_b.ipynb").write_text(json.dumps(lesson(cell("code", "x = 1"))))
    code, out, err = run_cli("book", "--root", tmp_path, "exercises")
    assert (code, err) == (0, "")
    assert sorted(p.name for p in (tmp_path / "exercises").iterdir()) == ["01_a.ipynb"]
    written = json.loads((tmp_path / "exercises" / "01_a.ipynb").read_text())
    assert not has_solutions(written)


def test_make_exercises_never_overwrites_a_learners_work(tmp_path):
    lessons, exercises = tmp_path / "lessons", tmp_path / "exercises"
    lessons.mkdir()
    (lessons / "01_a.ipynb").write_text(
        json.dumps(lesson(cell("code", EXERCISE), cell("code", CHECK)))
    )
    write_exercises(lessons, exercises)
    work = exercises / "01_a.ipynb"
    work.write_text(work.read_text().replace("NotImplementedError", "my answer"))
    code, out, err = run_cli("book", "--root", tmp_path, "exercises")
    assert code == 2 and err.count("\n") == 1 and "--force" in err
    assert "my answer" in work.read_text()
    code, out, err = run_cli("book", "--root", tmp_path, "exercises", "--force")
    assert code == 0 and "my answer" not in work.read_text()


def lessons_with_exercises() -> list[Path]:
    return [
        path
        for path in sorted((ROOT / "lessons").glob("[0-9][0-9]_*.ipynb"))
        if has_solutions(json.loads(path.read_text()))
    ]


def test_the_committed_exercises_are_made_from_the_lessons(tmp_path):
    written = write_exercises(ROOT / "lessons", tmp_path)
    committed = sorted((ROOT / "exercises").glob("*.ipynb"))
    assert [p.name for p in committed] == [p.name for p in written], (
        "exercises/ is out of date: run `make exercises FORCE=1`"
    )
    for path in written:
        assert path.read_text() == (ROOT / "exercises" / path.name).read_text(), (
            f"exercises/{path.name} is out of date: run `make exercises FORCE=1`"
        )


@pytest.mark.parametrize("path", lessons_with_exercises(), ids=lambda p: p.name)
def test_every_check_in_a_lesson_passes_and_its_exercise_says_not_done(path):
    notebook = json.loads(path.read_text())
    cells = exercise_cells(notebook)
    checks = sum(source(notebook["cells"][i]).count("exercises.check_") for i in cells)
    assert checks > 0
    solved = run_exercise_cells(notebook, cells).splitlines()
    assert len(solved) == checks and all("right on all" in line for line in solved)
    unsolved = run_exercise_cells(exercise_notebook(notebook), cells).splitlines()
    assert len(unsolved) == checks and all(NOT_DONE in line for line in unsolved)
