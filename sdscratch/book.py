"""The course as a book: lesson order and links from book.toml, and its website.

`book.toml` names the lessons in order and holds the repository URL, the one place
it lives; the Colab and Kaggle badges of every lesson are derived from it.
`build()` renders every lesson, with its stored outputs, to a static website
(nbconvert with the template in assets/site/templates, MathJax from a pip package,
nothing loaded from the network); `execute()` re-runs lessons and stores their
outputs, with the kernel and settings of the test run.
"""

import html
import os
import re
import shutil
import time
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SITE_ASSETS = ROOT / "assets" / "site"
COLAB_BADGE = "https://colab.research.google.com/assets/colab-badge.svg"
KAGGLE_BADGE = "https://kaggle.com/static/images/open-in-kaggle.svg"
# MathJax 2.7 as nbconvert's template configures it, from the jupyter-server-mathjax
# package (the `mathjax` package on PyPI is an empty stub).
MATHJAX = "mathjax/MathJax.js?config=TeX-AMS-MML_HTMLorMML-full,Safe"
# The environment lessons run in, here and in the test run (conftest.py).
OFFLINE_ENVIRONMENT = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
}
WIDGET_NOTE = ("(interactive in the notebook, on Jupyter, Colab or Kaggle; "
               "here, what it showed when the lesson ran)")
SITE_MARKER = ".sdscratch-site"  # marks a folder that `build` may replace


class BookError(ValueError):
    """book.toml and the lessons disagree, or a lesson fails: one clear sentence."""


def load_book(path=ROOT / "book.toml") -> dict:
    """Read book.toml."""
    with open(path, "rb") as file:
        return tomllib.load(file)


def repository(book: dict) -> str:
    """'https://github.com/owner/name' -> 'owner/name'."""
    url = book["output"]["html"]["git-repository-url"].rstrip("/")
    return url.removeprefix("https://github.com/")


def links(book: dict, lesson_file: str) -> dict:
    """The Colab, Kaggle and GitHub addresses of a lesson on the main branch."""
    github = f"https://github.com/{repository(book)}/blob/main/lessons/{lesson_file}"
    return {
        "colab": f"https://colab.research.google.com/github/{repository(book)}"
        f"/blob/main/lessons/{lesson_file}",
        "kaggle": f"https://kaggle.com/kernels/welcome?src={github}",
        "github": github,
    }


def header_markdown(book: dict, lesson_file: str, title: str) -> str:
    """The first cell of every lesson: its title and the Open in Colab/Kaggle badges."""
    link = links(book, lesson_file)
    return (
        f"# {title}\n\n"
        f"[![Open In Colab]({COLAB_BADGE})]({link['colab']}) "
        f"[![Open In Kaggle]({KAGGLE_BADGE})]({link['kaggle']})"
    )


def setup_code(book: dict) -> str:
    """The second cell of every lesson: on Colab/Kaggle only, install the release
    tag v<__version__> of sdscratch (never a moving branch) with what the lessons
    import; offline, one sentence instead of pip's traceback."""
    from sdscratch import __version__

    url = f"git+https://github.com/{repository(book)}@v{__version__}"
    return (
        f"# On Colab or Kaggle, install sdscratch {__version__} (with its bundled\n"
        "# checkpoints); locally, `make lab` has installed it and this does nothing.\n"
        "import os\n"
        "import subprocess\n"
        "import sys\n"
        "\n"
        'if "google.colab" in sys.modules or "KAGGLE_KERNEL_RUN_TYPE" in os.environ:\n'
        f'    url = "{url}"\n'
        '    pip = [sys.executable, "-m", "pip", "install", "-q",\n'
        '           f"sdscratch[lessons] @ {url}"]\n'
        "    if subprocess.run(pip, capture_output=True).returncode != 0:\n"
        '        print(f"Could not install sdscratch from {url}: is the notebook "\n'
        '              "offline? Turn its internet on, then run this cell again.")'
    )


def book_lessons(book: dict, root: Path = ROOT) -> list[dict]:
    """The lessons of book.toml in order, checked against the files in lessons/.

    Raises:
        BookError: a listed lesson has no file, or a lesson file is not listed.
    """
    listed = book.get("lesson", [])
    for lesson in listed:
        if not isinstance(lesson.get("file"), str) or not lesson.get("title"):
            raise BookError(f"book.toml has a [[lesson]] without a file and title: "
                            f"{lesson}")
    names = [lesson["file"] for lesson in listed]
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise BookError(f"book.toml lists {', '.join(twice)} more than once.")
    missing = [name for name in names if not (root / "lessons" / name).is_file()]
    if missing:
        files = ", ".join(f"lessons/{name}" for name in missing)
        raise BookError(f"book.toml lists {files}, which does not exist.")
    unlisted = sorted(
        path.name
        for path in (root / "lessons").glob("*.ipynb")
        if path.name not in names
    )
    if unlisted:
        files = ", ".join(f"lessons/{name}" for name in unlisted)
        raise BookError(
            f"{files} is not listed in book.toml: add a [[lesson]] with its file "
            "and title."
        )
    return listed


def site_map(book: dict, lessons: list[dict]) -> dict:
    """What the templates need: the book's title, and each page with its neighbours."""
    pages = [
        {
            "href": Path(lesson["file"]).with_suffix(".html").name,
            "notebook": lesson["file"],
            "title": lesson["title"],
            "number": lesson["file"][:2],
            "links": links(book, lesson["file"]),
        }
        for lesson in lessons
    ]
    index = {"href": "index.html", "title": "Course contents"}
    for i, page in enumerate(pages):
        page["prev"] = pages[i - 1] if i > 0 else index
        page["next"] = pages[i + 1] if i + 1 < len(pages) else None
    return {
        "title": book["book"]["title"],
        "description": book["book"].get("description", ""),
        "language": book["book"].get("language", "en"),
        "repository": f"https://github.com/{repository(book)}",
        "pages": pages,
    }


def widget_text(model_id: str, state: dict) -> str | None:
    """A progress bar's last state as tqdm prints it, from the stored widget state.

    Returns None for a widget that is not a tqdm bar (it needs a running kernel).
    """
    model = state.get(model_id, {})
    if model.get("model_name") != "HBoxModel":
        return None
    children = [state.get(ref.removeprefix("IPY_MODEL_"), {}) for ref in
                model["state"].get("children", [])]
    kinds = [child.get("model_name") for child in children]
    if kinds not in (["HTMLModel", "FloatProgressModel", "HTMLModel"],
                     ["HTMLModel", "IntProgressModel", "HTMLModel"]):
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
    view = "application/vnd.jupyter.widget-view+json"
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            source = cell.source.replace(COLAB_BADGE, "colab-badge.svg")
            source = source.replace(KAGGLE_BADGE, "kaggle-badge.svg")
            cell.source = source
        outputs = []
        for output in cell.get("outputs", []):
            if view in output.get("data", {}):
                model_id = output.data.pop(view)["model_id"]
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


def copy_static(out: Path) -> None:
    """The css, the badges and MathJax (from the jupyter-server-mathjax package)."""
    import jupyter_server_mathjax

    for path in SITE_ASSETS.iterdir():
        if path.suffix in (".css", ".svg"):
            shutil.copy(path, out / path.name)
    mathjax = Path(jupyter_server_mathjax.__file__).parent / "static"
    shutil.copytree(mathjax, out / "mathjax")


def readme_intro(root: Path, site: dict, out: Path) -> tuple[str, str]:
    """The README up to its lesson table, as HTML: the course's introduction.

    Returns its opening (before the first `##` section) and the sections after it,
    so that the index can list the lessons in between. Relative links point to the
    repository on GitHub; relative images are copied into the site.
    """
    from nbconvert.filters import markdown2html

    text = (root / "README.md").read_text() if (root / "README.md").is_file() else ""
    text = re.split(r"^## Lessons\b", text, maxsplit=1, flags=re.MULTILINE)[0]

    def relative(match):
        bang, label, target = match.groups()
        if re.match(r"[a-z]+:|#|/|\.\.", target):
            return match[0]
        if bang:
            (out / target).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(root / target, out / target)
            return match[0]
        return f"[{label}]({site['repository']}/blob/main/{target})"

    text = re.sub(r"(!?)\[([^\]]*)\]\(([^)\s]+)\)", relative, text)
    opening, _, sections = text.partition("\n## ")
    return markdown2html(opening), markdown2html("## " + sections if sections else "")


def fresh_site_folder(out: Path) -> Path:
    """An empty `out`, refusing to delete a folder that is not a built site."""
    if out.exists():
        if any(out.iterdir()) and not (out / SITE_MARKER).exists():
            raise BookError(f"{out} is not empty and was not built by sdscratch; "
                            "choose another output folder.")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    (out / SITE_MARKER).write_text("built by `python -m sdscratch book build`\n")
    (out / ".nojekyll").touch()  # GitHub Pages serves the files as they are
    return out


def build(root: Path = ROOT, out: Path | None = None) -> Path:
    """Build the course website: an index page, and a page per lesson.

    Args:
        root: the repository (book.toml, README.md, lessons/).
        out: the site folder, replaced if it holds an earlier build
            (default: root/_build/site).
    Returns:
        The site folder.
    """
    root = Path(root)
    book = load_book(root / "book.toml")
    site = site_map(book, book_lessons(book, root))

    import jinja2
    import nbformat
    from nbconvert import HTMLExporter

    out = fresh_site_folder(Path(out) if out else root / "_build" / "site")
    copy_static(out)
    templates = SITE_ASSETS / "templates"
    exporter = HTMLExporter(
        template_name="sdscratch",
        extra_template_basedirs=[str(templates)],
        mathjax_url=MATHJAX,
        embed_images=True,
    )
    for page in site["pages"]:
        notebook = root / "lessons" / page["notebook"]
        nb = nbformat.read(notebook, as_version=4)
        static_outputs(nb, page)
        resources = {
            "site": site,
            "page": page,
            "metadata": {"name": page["title"], "path": str(notebook.parent)},
        }
        body, _ = exporter.from_notebook_node(nb, resources=resources)
        (out / page["href"]).write_text(body)
        shutil.copy(notebook, out / page["notebook"])
    environment = jinja2.Environment(
        loader=jinja2.FileSystemLoader(templates / "sdscratch"), autoescape=False
    )
    home = environment.get_template("home.html.j2")
    opening, sections = readme_intro(root, site, out)
    page = home.render(site=site, opening=opening, sections=sections)
    (out / "index.html").write_text(page)
    return out


def failed_cell(nb) -> str:
    """Where a lesson failed: 'cell N (first line of its code)'."""
    for number, cell in enumerate(nb.cells, start=1):
        if any(out.get("output_type") == "error" for out in cell.get("outputs", [])):
            first = cell.source.strip().splitlines()[0] if cell.source.strip() else ""
            return f"cell {number} ({first[:60]})"
    return "a cell"


def execute(paths=None, root: Path = ROOT, timeout: int = 600) -> list[Path]:
    """Run lessons top to bottom and store their outputs in the notebooks.

    The kernel is the one the test run uses (nbval's current environment, started
    in lessons/, offline), so stored outputs are what `make test` sees.

    Args:
        paths: the notebooks to run (default: every lesson in book.toml, in order).
        timeout: the most seconds one cell may take.
    Raises:
        BookError: a cell raised; its notebook is left as it was.
    """
    import nbformat
    from jupyter_client.manager import KernelManager
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError
    from nbval.kernel import CURRENT_ENV_KERNEL_NAME, NbvalKernelspecManager

    if not paths:
        book = load_book(root / "book.toml")
        lessons = book_lessons(book, root)
        paths = [root / "lessons" / lesson["file"] for lesson in lessons]
        if not paths:
            print("book.toml lists no lessons yet: nothing to run")
    for name, value in OFFLINE_ENVIRONMENT.items():
        os.environ.setdefault(name, value)
    done = []
    for path in map(Path, paths):
        nb = nbformat.read(path, as_version=4)
        kernel = KernelManager(kernel_name=CURRENT_ENV_KERNEL_NAME,
                               kernel_spec_manager=NbvalKernelspecManager())
        client = NotebookClient(nb, km=kernel, timeout=timeout, record_timing=False,
                                resources={"metadata": {"path": str(path.parent)}})
        start = time.perf_counter()
        try:
            client.execute()
        except CellExecutionError as error:
            raise BookError(f"{path.name} failed in {failed_cell(nb)}: "
                            f"{error.ename}: {error.evalue}") from None
        nbformat.write(nb, path)
        seconds = time.perf_counter() - start
        print(f"{path.name}: ran in {seconds:.0f} s, outputs stored")
        done.append(path)
    return done
