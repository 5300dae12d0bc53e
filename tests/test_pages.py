"""sdscratch.pages: a lesson notebook as a Markdown page of the course website."""

import base64
import io
import re

import nbformat
from PIL import Image

from conftest import SOLUTION, png
from sdscratch.pages import (
    WIDGET_NOTE,
    Figures,
    caption,
    html_markdown,
    lesson_page,
    protect_math,
    static_outputs,
    text_block,
    widget_text,
)


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
    state["interact"] = {
        "model_name": "VBoxModel",
        "state": {"children": ["IPY_MODEL_slider", "IPY_MODEL_plot"]},
    }
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


def test_a_text_progress_bar_shows_its_last_state_without_colour_codes():
    printed = "\x1b[31mwarning\x1b[0m\n 10%|#  | 1/10\r100%|###| 10/10\ndone\r\n"
    block = text_block(printed, "sd-stderr")
    assert "```text\nwarning\n100%|###| 10/10\ndone\n```" in block
    assert block.startswith('<div class="sd-output sd-stderr">')


def test_math_is_escaped_for_markdown_and_code_is_left_alone():
    markdown = "Code `$x$` stays, $a_t*b_t$ and\n$$\n  \\sum_i x_i\n$$ do not."
    assert protect_math(markdown) == (
        "Code `$x$` stays, \\\\\\(a\\_t\\*b\\_t\\\\\\) and\n"
        "\\\\\\[\\\\sum\\_i x\\_i\\\\\\] do not."
    )
    assert protect_math("It costs \\$5 and \\$6.") == "It costs \\$5 and \\$6."


def test_a_figure_is_described_by_the_last_sentences_above_it():
    prose = (
        "# Noise\n\nAn opening paragraph.\n\n"
        "We add noise. Below, *the* `x_t`: $t$ grows."
    )
    assert caption(prose) == "We add noise. Below, the x_t: t grows."
    assert caption(prose, limit=20) == "Below, the x_t: t grows."
    assert caption("") == "A figure made by the code above."


def test_a_page_has_figure_files_a_folded_solution_and_alt_text(tiny_book, tmp_path):
    nb = nbformat.read(tiny_book / "lessons" / "01_lesson_1.ipynb", as_version=4)
    page = {"notebook": "01_lesson_1.ipynb", "title": "Adding noise"}
    markdown = lesson_page(nb, page, tmp_path)
    figure = tmp_path / "01_lesson_1" / "cell003-1.png"
    assert Image.open(figure).size == (24, 16)
    assert (
        f'<img src="01_lesson_1/cell003-1.png" alt="{caption(nb.cells[2].source)}"'
        in markdown
    )
    assert "data:image" not in markdown
    folded = markdown.split('<details class="sd-solution">')[1].split("</details>")[0]
    assert "answer = 6 * 7" in folded and "42" in folded
    assert "SOLUTION" not in markdown and SOLUTION.count("SOLUTION") == 2


def test_an_html_output_keeps_its_images_as_files_and_gets_icons(tmp_path):
    picture = png((10, 20, 30))
    text = (
        f'<div>\n\n  <img src="data:image/png;base64,{picture}">\n'
        '<button><i class="fa fa-fast-backward"></i></button>\n'
        '<button><i class="fa fa-play fa-flip-horizontal"></i></button></div>'
    )
    block = html_markdown(text, Figures(tmp_path, "page"), "cell001")
    assert "\n\n" not in block and "data:image" not in block
    name = block.split('src="')[1].split('"')[0]
    assert (tmp_path / name).read_bytes() == base64.b64decode(picture)
    assert 'class="fa-solid fa-backward-fast"' in block
    assert 'class="fa-solid fa-play sd-flip-horizontal"' in block
    assert Image.open(io.BytesIO((tmp_path / name).read_bytes())).size == (24, 16)
