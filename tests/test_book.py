"""sdscratch.book: book.toml against the lessons, the site build, `make lessons`."""

import re
import subprocess
import sys

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_notebook

from sdscratch.book import (
    WIDGET_NOTE,
    BookError,
    book_lessons,
    build,
    execute,
    load_book,
    static_outputs,
    widget_text,
)


def cli(*args):
    return subprocess.run([sys.executable, "-m", "sdscratch", *args],
                          capture_output=True, text=True)


def test_a_listed_lesson_that_does_not_exist_is_one_clear_error(tiny_book):
    (tiny_book / "lessons" / "02_lesson_2.ipynb").unlink()
    with pytest.raises(BookError, match=r"lists lessons/02_lesson_2.ipynb, which does"):
        book_lessons(load_book(tiny_book / "book.toml"), tiny_book)
    result = cli("book", "--root", str(tiny_book), "build")
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert "02_lesson_2.ipynb, which does not exist" in result.stderr


def test_a_lesson_file_not_in_book_toml_is_one_clear_error(tiny_book):
    nbformat.write(new_notebook(), tiny_book / "lessons" / "03_extra.ipynb")
    with pytest.raises(BookError, match=r"lessons/03_extra.ipynb is not listed in"):
        book_lessons(load_book(tiny_book / "book.toml"), tiny_book)


def test_the_site_has_a_page_per_lesson_and_loads_nothing_remote(tiny_book):
    out = build(tiny_book)
    pages = sorted(path.name for path in out.glob("*.html"))
    assert pages == ["01_lesson_1.html", "02_lesson_2.html", "index.html"]
    assert (out / "01_lesson_1.ipynb").read_bytes() == (
        tiny_book / "lessons" / "01_lesson_1.ipynb").read_bytes()
    assert (out / "mathjax" / "MathJax.js").is_file()
    assert (out / "assets" / "dot.png").is_file()  # the README's picture
    index = (out / "index.html").read_text()
    assert 'href="https://github.com/' in index and "lessons/01_lesson_1.ipynb" in index
    for page in pages:
        text = (out / page).read_text()
        remote = re.findall(r"""<(?:script|img|link)[^>]*(?:src|href)=["']https?:""",
                            text)
        assert remote == [], f"{page} loads {remote}"
        assert "widget-view+json" not in text


def test_a_folder_that_is_not_a_site_is_never_replaced(tmp_path, tiny_book):
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(BookError, match="not built by sdscratch"):
        build(tiny_book, out=tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "keep me"


def test_a_progress_bar_shows_where_it_ended_and_the_badges_are_local(tiny_book):
    nb = nbformat.read(tiny_book / "lessons" / "01_lesson_1.ipynb", as_version=4)
    page = {"notebook": "01_lesson_1.ipynb", "title": "Adding noise"}
    static_outputs(nb, page)
    bar = nb.cells[4].outputs[0].data
    assert bar == {"text/plain": "100%|██████████| 5/5 [00:00<00:00, 9.90it/s]"}
    assert "widgets" not in nb.metadata
    assert "https://" not in re.sub(r"\]\(https://[^)]*\)", "", nb.cells[0].source)
    assert "(download-badge.svg)](01_lesson_1.ipynb)" in nb.cells[0].source


def test_a_closed_widget_is_left_out_and_a_live_one_shows_what_it_showed(tiny_book):
    nb = nbformat.read(tiny_book / "lessons" / "01_lesson_1.ipynb", as_version=4)
    closed = nbformat.from_dict(nb.cells[4].outputs[0])
    closed.data["application/vnd.jupyter.widget-view+json"]["model_id"] = "gone"
    live = nbformat.from_dict(nb.cells[4].outputs[0])
    live.data["application/vnd.jupyter.widget-view+json"]["model_id"] = "interact"
    picture = nb.cells[3].outputs[0]
    state = nb.metadata.widgets["application/vnd.jupyter.widget-state+json"]["state"]
    state["interact"] = {"model_name": "VBoxModel", "state": {"children": [
        "IPY_MODEL_slider", "IPY_MODEL_plot"]}}
    state["slider"] = {"model_name": "IntSliderModel", "state": {"value": 3}}
    state["plot"] = {"model_name": "OutputModel", "state": {"outputs": [picture]}}
    nb.cells[4].outputs = [closed, live]
    static_outputs(nb, {"notebook": "01_lesson_1.ipynb", "title": "Adding noise"})
    note, shown = nb.cells[4].outputs
    assert note.data == {"text/plain": WIDGET_NOTE}
    assert shown == picture


def test_a_widget_that_is_not_a_progress_bar_is_not_text():
    state = {"slider": {"model_name": "IntSliderModel", "state": {"value": 3}}}
    assert widget_text("slider", state) is None
    assert widget_text("gone", state) is None


def write_notebook(path, *sources):
    nbformat.write(new_notebook(cells=[new_code_cell(s) for s in sources]), path)
    return path


def test_execute_stores_outputs_and_refuses_a_failing_lesson(tmp_path):
    good = write_notebook(tmp_path / "01_good.ipynb",
                          "import os\nprint(os.environ['HF_HUB_OFFLINE'], os.getcwd())")
    bad = write_notebook(tmp_path / "02_bad.ipynb", "x = 1", "assert x == 2, 'not 2'")
    before = bad.read_text()
    with pytest.raises(BookError, match=r"02_bad.ipynb failed in cell 2 \(assert"):
        execute([good, bad])
    output = nbformat.read(good, as_version=4).cells[0].outputs[0]
    assert output.text == f"1 {tmp_path}\n"
    assert bad.read_text() == before
