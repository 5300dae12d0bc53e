"""Exercise notebooks made from the lessons: the solutions taken out.

In a lesson, the learner's part of an exercise sits between two comment lines,
`# BEGIN SOLUTION` and `# END SOLUTION`, inside the function the check cell tests.
`make exercises` writes `exercises/NN_topic.ipynb` for every lesson that has
exercises: each solution replaced by `raise NotImplementedError` at its
indentation, every output cleared, everything else as in the lesson. Run
unchanged, each check then prints its "not done yet" sentence.
"""

import json
import re
from pathlib import Path

BEGIN, END = "# BEGIN SOLUTION", "# END SOLUTION"


class ExerciseError(ValueError):
    """A lesson's solution markers do not pair up: one clear sentence."""


def strip_solutions(source: str, where: str = "a cell") -> str:
    """A cell's source with every solution block replaced by `raise
    NotImplementedError`, indented as the `# BEGIN SOLUTION` line is.

    Raises:
        ExerciseError: a BEGIN without its END, an END without a BEGIN, or nesting.
    """
    kept, inside = [], False
    for line in source.splitlines(keepends=True):
        marker = line.strip()
        if marker == BEGIN:
            if inside:
                raise ExerciseError(f"{where}: {BEGIN} inside another solution.")
            indent = re.match(r"\s*", line).group()
            kept.append(f"{indent}raise NotImplementedError\n")
            inside = True
        elif marker == END:
            if not inside:
                raise ExerciseError(f"{where}: {END} without {BEGIN} above it.")
            inside = False
        elif not inside:
            kept.append(line)
    if inside:
        raise ExerciseError(f"{where}: {BEGIN} without {END}.")
    return "".join(kept)


def has_solutions(notebook: dict) -> bool:
    return any(
        cell["cell_type"] == "code" and BEGIN in _text(cell["source"])
        for cell in notebook["cells"]
    )


def exercise_notebook(notebook: dict, name: str = "the lesson") -> dict:
    """The learner's copy of a lesson (nbformat 4 JSON): solutions out, outputs
    cleared, widget state dropped."""
    cells = []
    for index, cell in enumerate(notebook["cells"]):
        cell = dict(cell)
        if cell["cell_type"] == "code":
            where = f"{name}, cell {index}"
            cell["source"] = strip_solutions(_text(cell["source"]), where)
            cell["outputs"], cell["execution_count"] = [], None
        cells.append(cell)
    metadata = {k: v for k, v in notebook["metadata"].items() if k != "widgets"}
    return {**notebook, "cells": cells, "metadata": metadata}


def write_exercises(lessons: Path, out: Path, force: bool = False) -> list[Path]:
    """Write out/NN_topic.ipynb for every lesson in `lessons` with exercises.

    A learner may have worked in an exercise notebook: one that differs from what
    would be written is replaced only with `force` (nothing is written otherwise).

    Returns:
        The notebooks written, in lesson order.
    Raises:
        ExerciseError: markers that do not pair up, or notebooks that would be
            replaced without `force`.
    """
    made = {}
    for path in sorted(Path(lessons).glob("[0-9][0-9]_*.ipynb")):
        notebook = json.loads(path.read_text())
        if has_solutions(notebook):
            exercise = exercise_notebook(notebook, f"lessons/{path.name}")
            made[Path(out) / path.name] = json.dumps(exercise, indent=1) + "\n"
    changed = [p for p, text in made.items() if p.exists() and p.read_text() != text]
    if changed and not force:
        names = ", ".join(str(p) for p in changed)
        raise ExerciseError(
            f"{names} differ from the lessons (your work?); pass --force to "
            "replace them."
        )
    Path(out).mkdir(parents=True, exist_ok=True)
    for path, text in made.items():
        path.write_text(text)
    return list(made)


def _text(source) -> str:
    """A cell's source, stored as one string or as a list of lines."""
    return source if isinstance(source, str) else "".join(source)
