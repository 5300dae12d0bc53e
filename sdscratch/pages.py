"""A lesson notebook as a page of the course website: Markdown that mdBook renders.

`lesson_page()` writes a notebook with its stored outputs as Markdown: code as Python
blocks; text outputs as text blocks; figures as PNG files beside the page, with the
last sentences of the prose above the cell as their alt text; HTML outputs as they
are, their embedded images moved to files; progress bars as the line they ended on;
other widgets as a note followed by what they showed; math kept whole for MathJax;
and a cell marked `# BEGIN SOLUTION` ... `# END SOLUTION` folded under "Solution".
"""

import base64
import hashlib
import html
import io
import re
from pathlib import Path

COLAB_BADGE = "https://colab.research.google.com/assets/colab-badge.svg"
KAGGLE_BADGE = "https://kaggle.com/static/images/open-in-kaggle.svg"
WIDGET_NOTE = (
    "(interactive in the notebook, on Jupyter, Colab or Kaggle; "
    "here, what it showed when the lesson ran)"
)
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
# `# BEGIN SOLUTION` ... `# END SOLUTION` (nbgrader writes `### BEGIN SOLUTION`)
SOLUTION = re.compile(r"^[ \t]*#+ ?(BEGIN|END) SOLUTION[ \t]*\n?", re.MULTILINE)
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
IMAGES = {
    "image/png": "png",
    "image/jpeg": "jpg",
    "image/gif": "gif",
    "image/svg+xml": "svg",
}
DATA_URI = re.compile(r"data:image/(png|jpeg|gif);base64,([A-Za-z0-9+/=\s\\]+)")
# Font Awesome 4 names, as matplotlib's animation controls use them, in the Font
# Awesome 6 that mdBook turns into inline SVG icons.
ICONS = {
    "fast-backward": "backward-fast",
    "step-backward": "backward-step",
    "step-forward": "forward-step",
    "fast-forward": "forward-fast",
    "play": "play",
    "pause": "pause",
    "minus": "minus",
    "plus": "plus",
}
# In a markdown cell: fenced code and code spans (left as they are), an escaped
# dollar, display math $$...$$, and inline math $...$ (no blank line inside).
MARKDOWN_MATH = re.compile(
    r"(?P<fence>^[ \t]*(?P<mark>`{3,}|~{3,}).*?^[ \t]*(?P=mark)[ \t]*$)"
    r"|(?P<code>(?P<ticks>`+).+?(?<!`)(?P=ticks)(?!`))"
    r"|(?P<dollar>\\\$)"
    r"|\$\$(?P<display>.+?)\$\$"
    r"|\$(?P<inline>(?:[^$\n\\]|\\.|\n(?![ \t]*\n))+?)\$",
    re.MULTILINE | re.DOTALL,
)


def widget_text(model_id: str, state: dict) -> str | None:
    """A progress bar's last state as tqdm prints it, from the stored widget state.

    Returns None for a widget that is not a tqdm bar (it needs a running kernel).
    """
    model = state.get(model_id, {})
    if model.get("model_name") != "HBoxModel":
        return None
    children = [
        state.get(ref.removeprefix("IPY_MODEL_"), {})
        for ref in model["state"].get("children", [])
    ]
    kinds = [child.get("model_name") for child in children]
    if kinds not in (
        ["HTMLModel", "FloatProgressModel", "HTMLModel"],
        ["HTMLModel", "IntProgressModel", "HTMLModel"],
    ):
        return None
    left, bar, right = (child["state"] for child in children)
    span = (bar.get("max") or 1) - (bar.get("min") or 0)
    filled = round(10 * ((bar.get("value") or 0) - (bar.get("min") or 0)) / span)
    filled = min(max(filled, 0), 10)

    def text(widget):
        return html.unescape(re.sub(r"<[^>]*>", "", widget.get("value", "")))

    return f"{text(left)}|{'█' * filled}{' ' * (10 - filled)}|{text(right)}"


def widget_outputs(model_id: str, state: dict) -> list[dict]:
    """What a widget's Output areas held when the lesson ran (`interact`'s plot)."""
    model = state.get(model_id, {})
    if model.get("model_name") == "OutputModel":
        return list(model["state"].get("outputs", []))
    found = []
    for ref in model.get("state", {}).get("children", []):
        found += widget_outputs(ref.removeprefix("IPY_MODEL_"), state)
    return found


def static_outputs(nb, page: dict) -> None:
    """Make a lesson's stored outputs and badges work on a static, offline page.

    Widgets become text (a tqdm bar shows where it ended; an interactive widget says
    that it needs the notebook, followed by what it showed when the lesson ran; a
    closed one is left out), and the Colab/Kaggle badge images become local files,
    with a download badge for the notebook beside them.
    """
    import nbformat

    widgets = nb.metadata.pop("widgets", {})
    state = widgets.get("application/vnd.jupyter.widget-state+json", {})
    state = state.get("state", {})
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            source = cell.source.replace(COLAB_BADGE, "colab-badge.svg")
            cell.source = source.replace(KAGGLE_BADGE, "kaggle-badge.svg")
        outputs = []
        for output in cell.get("outputs", []):
            if WIDGET_VIEW in output.get("data", {}):
                model_id = output.data.pop(WIDGET_VIEW)["model_id"]
                if model_id not in state:
                    continue  # closed, as a tqdm bar with leave=False: gone in Jupyter
                text = widget_text(model_id, state)
                if text is None:  # interactive: a note, then what it showed at first
                    output.data = {"text/plain": WIDGET_NOTE}
                    outputs.append(output)
                    outputs += map(nbformat.from_dict, widget_outputs(model_id, state))
                    continue
                output.data = {"text/plain": text}
            outputs.append(output)
        if cell.cell_type == "code":
            cell.outputs = outputs
    download = f"[![Download the notebook](download-badge.svg)]({page['notebook']})"
    nb.cells[0].source += " " + download
    nb.metadata["title"] = page["title"]


def escape_markdown(text: str) -> str:
    """`text` with every ASCII punctuation mark backslash-escaped: Markdown leaves it
    exactly as it is (no emphasis, no smart quotes, no swallowed backslashes)."""
    return re.sub(r"([!-/:-@\[-`{-~])", r"\\\1", text)


def protect_math(markdown: str) -> str:
    """Jupyter's `$...$` and `$$...$$` as MathJax's `\\(...\\)` and `\\[...\\]`,
    escaped so that Markdown passes the TeX through untouched. Code is left alone.
    """

    def replace(match):
        if match["display"] is not None:
            lines = [line.strip() for line in match["display"].splitlines()]
            tex = "\n".join(line for line in lines if line)
            return escape_markdown(f"\\[{tex}\\]")
        if match["inline"] is not None:
            return escape_markdown(f"\\({match['inline'].strip()}\\)")
        return match[0]

    return MARKDOWN_MATH.sub(replace, markdown)


def plain_text(markdown: str) -> str:
    """Prose without its Markdown, on one line: math as its TeX without backslashes
    and braces, links as their words, no emphasis marks or backticks."""

    def math(match):
        tex = re.sub(r"\\[,;!: ]", " ", match[1])
        tex = re.sub(r"\\([A-Za-z]+)|[{}]", r" \1 ", tex)
        return re.sub(r"\s+(?=[_^])", "", tex)

    text = re.sub(r"\$+([^$]+)\$+", math, markdown)
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", text)
    text = re.sub(r"`|^#+ |\*+|(?<!\w)_+|_+(?!\w)", "", text, flags=re.MULTILINE)
    return " ".join(text.split())


def caption(markdown: str, limit: int = 250) -> str:
    """A figure's alt text: the last sentences of the prose above its cell.

    The last paragraph's closing sentences, as many as fit in `limit` characters
    (always at least one); the prose before a figure says what it shows.
    """
    paragraphs = [p for p in re.split(r"\n\s*\n", markdown) if p.strip()]
    if not paragraphs:
        return "A figure made by the code above."
    sentences = re.split(r"(?<=[.!?:])\s+(?=[A-Z(*$`])", plain_text(paragraphs[-1]))
    text = sentences.pop()
    while sentences and len(sentences[-1]) + len(text) < limit:
        text = f"{sentences.pop()} {text}"
    return text.rstrip(":")


def fenced(text: str, language: str) -> str:
    """`text` as a fenced code block, its fence longer than any backtick run in it."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}{language}\n{text.rstrip()}\n{fence}"


class Figures:
    """Writes a page's images into its own folder: `<folder>/<page>/<name>`."""

    def __init__(self, folder: Path, page: str):
        self.folder, self.page = Path(folder), page

    def write(self, data: bytes, suffix: str, name: str) -> str:
        """Save `data` as `<name>.<suffix>`; return its address from the page."""
        (self.folder / self.page).mkdir(parents=True, exist_ok=True)
        (self.folder / self.page / f"{name}.{suffix}").write_bytes(data)
        return f"{self.page}/{name}.{suffix}"


def opaque_png(data: bytes) -> bytes:
    """A PNG without its alpha channel when every pixel is opaque (as matplotlib's
    figures are): the same picture in about a tenth fewer bytes."""
    from PIL import Image

    image = Image.open(io.BytesIO(data))
    if image.mode != "RGBA" or image.getextrema()[3] != (255, 255):
        return data
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def image_markdown(
    output: dict, kind: str, figures: Figures, name: str, alt: str
) -> str:
    """An image output as an <img> of a file, sized as the notebook showed it."""
    data = output["data"][kind]
    if kind == "image/svg+xml":
        raw = (data if isinstance(data, str) else "".join(data)).encode()
    else:
        raw = base64.b64decode(data if isinstance(data, str) else "".join(data))
    src = figures.write(
        opaque_png(raw) if kind == "image/png" else raw, IMAGES[kind], name
    )
    size = output.get("metadata", {}).get(kind, {})
    attributes = "".join(
        f' {key}="{size[key]}"' for key in ("width", "height") if key in size
    )
    return f'<img src="{src}" alt="{html.escape(alt)}"{attributes}>'


def html_markdown(text: str, figures: Figures, name: str) -> str:
    """An HTML output as one raw HTML block: embedded images moved to files, Font
    Awesome 4 icons renamed for mdBook, no blank line (which would end the block)."""

    def to_file(match):
        data = base64.b64decode(re.sub(r"[\\\s]", "", match[2]))
        digest = hashlib.sha1(data).hexdigest()[:10]
        return figures.write(
            data, {"jpeg": "jpg"}.get(match[1], match[1]), f"{name}-{digest}"
        )

    text = DATA_URI.sub(to_file, text)
    text = text.replace("fa-flip-horizontal", "sd-flip-horizontal")
    text = re.sub(
        r'class="fa fa-([a-z-]+)',
        lambda m: 'class="fa-solid fa-' + ICONS.get(m[1], m[1]),
        text,
    )
    lines = [line for line in text.splitlines() if line.strip()]
    return '<div class="sd-output sd-html">\n' + "\n".join(lines) + "\n</div>"


def text_block(text: str, kind: str = "") -> str:
    """Text a cell printed, as a text block in an output box: colour codes dropped,
    and a line rewritten with carriage returns (a text progress bar) as it ended."""
    text = re.sub(r"[^\n]*\r(?!\n)", "", ANSI.sub("", text))
    return f'<div class="sd-output {kind}">\n\n{fenced(text, "text")}\n\n</div>'


def output_markdown(output: dict, figures: Figures, name: str, alt: str) -> str:
    """One stored output as Markdown (or raw HTML that Markdown passes through)."""
    kind = output.get("output_type")
    if kind == "stream":
        stream = "sd-stderr" if output.get("name") == "stderr" else ""
        return text_block(output.get("text", ""), stream)
    if kind == "error":
        return text_block("\n".join(output.get("traceback", [])), "sd-error")
    data = output.get("data", {})
    for image in IMAGES:
        if image in data:
            return image_markdown(output, image, figures, name, alt)
    if "text/html" in data:
        return html_markdown(data["text/html"], figures, name)
    if "text/markdown" in data:
        return protect_math(data["text/markdown"])
    if "text/latex" in data:
        return protect_math(data["text/latex"])
    if data.get("text/plain") == WIDGET_NOTE:
        return f'<p class="sd-note"><em>{WIDGET_NOTE}</em></p>'
    return text_block(data.get("text/plain", ""))


def merged_streams(outputs: list[dict]) -> list[dict]:
    """Consecutive prints to the same stream as one output, as Jupyter shows them."""
    merged = []
    for output in outputs:
        previous = merged[-1] if merged else {}
        if (
            output.get("output_type") == "stream"
            and previous.get("output_type") == "stream"
            and previous.get("name") == output.get("name")
        ):
            merged[-1] = {**previous, "text": previous["text"] + output["text"]}
        else:
            merged.append(dict(output))
    return merged


def code_cell_markdown(cell, number: int, figures: Figures, prose: str) -> str:
    """A code cell, then its outputs; folded under "Solution" if it holds one."""
    source = cell.source
    solution = SOLUTION.search(source) is not None
    parts = [fenced(SOLUTION.sub("", source), "python")] if source.strip() else []
    outputs = merged_streams(cell.get("outputs", []))
    images = sum(any(kind in o.get("data", {}) for kind in IMAGES) for o in outputs)
    shown, described = 0, caption(prose)
    for output in outputs:
        alt = described
        if any(kind in output.get("data", {}) for kind in IMAGES):
            shown += 1
            alt += f" (figure {shown} of {images})" if images > 1 else ""
        name = f"cell{number:03d}-{len(parts)}"
        parts.append(output_markdown(output, figures, name, alt))
    if solution:
        parts = [
            '<details class="sd-solution">\n<summary>Solution</summary>',
            *parts,
            "</details>",
        ]
    return "\n\n".join(parts)


def lesson_page(nb, page: dict, folder: Path) -> str:
    """The Markdown of a lesson's page; its figures go to `folder/<lesson>/`.

    Args:
        nb: the notebook (nbformat), its outputs as stored.
        page: {"notebook": file name, "title": ...}.
        folder: the book's source folder (mdBook's `src`).
    Returns:
        The page's Markdown.
    """
    static_outputs(nb, page)
    figures = Figures(folder, Path(page["notebook"]).stem)
    blocks, prose = [], ""
    for number, cell in enumerate(nb.cells):
        if cell.cell_type == "markdown":
            prose = cell.source
            blocks.append(protect_math(cell.source))
        elif cell.cell_type == "code":
            blocks.append(code_cell_markdown(cell, number, figures, prose))
    return "\n\n".join(block for block in blocks if block.strip()) + "\n"
