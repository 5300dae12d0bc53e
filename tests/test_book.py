"""sdscratch.book: book.toml against the lessons, the site build, `make lessons`."""

import html
import re
import subprocess
import sys
import tomllib

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_notebook, new_output

from conftest import MATH
from sdscratch.book import (
    BookError,
    book_lessons,
    build,
    execute,
    load_book,
    mdbook_toml,
)


def cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "sdscratch", *args], capture_output=True, text=True
    )


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
    lessons = ["01_lesson_1.html", "02_lesson_2.html"]
    assert sorted(path.name for path in out.glob("0*.html")) == lessons
    assert (out / "index.html").is_file() and (out / "print.html").is_file()
    assert (out / "01_lesson_1.ipynb").read_bytes() == (
        tiny_book / "lessons" / "01_lesson_1.ipynb"
    ).read_bytes()
    assert (out / "mathjax" / "MathJax.js").is_file()
    assert (out / "assets" / "dot.png").is_file()  # the README's picture
    assert list((out / "01_lesson_1").glob("*.png"))  # figures are files
    index = (out / "index.html").read_text()
    assert 'href="01_lesson_1.html"' in index and "Not on the site" not in index
    assert 'href="https://github.com/sdscratch/sdscratch/blob/main/LICENSE"' in index
    for page in out.glob("*.html"):
        text = page.read_text()
        remote = re.findall(
            r"""<(?:script|img|link)[^>]*(?:src|href)=["']https?:""", text
        )
        assert remote == [], f"{page.name} loads {remote}"
        assert "widget-view+json" not in text and "data:image" not in text


def test_math_reaches_the_page_as_tex_for_mathjax(tiny_book):
    text = html.unescape((build(tiny_book) / "01_lesson_1.html").read_text())
    inline, display = re.findall(r"\$+([^$]+)\$+", MATH)
    assert f"\\({inline}\\)" in text
    assert f"\\[{display}\\]" in text


def test_mdbook_reads_book_toml_without_the_lessons():
    book = load_book()
    config = tomllib.loads(mdbook_toml(book))
    assert set(config) == {"book", "output"} and config["book"] == book["book"]
    html_config = config["output"]["html"]
    for key, value in book["output"]["html"].items():
        assert html_config[key] == value
    assert html_config["mathjax-support"] is False  # MathJax comes from the site


def test_a_warning_from_mdbook_fails_the_build(tiny_book):
    path = tiny_book / "lessons" / "01_lesson_1.ipynb"
    nb = nbformat.read(path, as_version=4)
    nb.cells.append(
        new_code_cell(
            "show()",
            outputs=[
                new_output(
                    "display_data",
                    data={"text/html": '<i class="fa fa-no-such-icon"></i>'},
                )
            ],
        )
    )
    nbformat.write(nb, path)
    with pytest.raises(BookError, match="mdBook failed to build the site: WARN"):
        build(tiny_book)


def test_a_folder_that_is_not_a_site_is_never_replaced(tmp_path, tiny_book):
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(BookError, match="not built by sdscratch"):
        build(tiny_book, out=tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "keep me"
    out = build(tiny_book, out=tmp_path / "site")
    assert build(tiny_book, out=out) == out  # an earlier build is replaced


def write_notebook(path, *sources):
    nbformat.write(new_notebook(cells=[new_code_cell(s) for s in sources]), path)
    return path


def test_execute_stores_outputs_and_refuses_a_failing_lesson(tmp_path):
    good = write_notebook(
        tmp_path / "01_good.ipynb",
        "import os\nprint(os.environ['HF_HUB_OFFLINE'], os.getcwd())",
    )
    bad = write_notebook(tmp_path / "02_bad.ipynb", "x = 1", "assert x == 2, 'not 2'")
    before = bad.read_text()
    with pytest.raises(BookError, match=r"02_bad.ipynb failed in cell 2 \(assert"):
        execute([good, bad])
    output = nbformat.read(good, as_version=4).cells[0].outputs[0]
    assert output.text == f"1 {tmp_path}\n"
    assert bad.read_text() == before
