"""The course website, built and opened in a real headless Chromium.

The site is served on 127.0.0.1 only, for the length of the test. Each page must load
with no console error, show every image, typeset its math, and link its badges and
its previous/next lessons where they belong. Screenshots go to _build/screenshots/.
"""

import os
import re
import threading
import urllib.error
import urllib.request
from contextlib import contextmanager
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import nbformat
import pytest

from conftest import make_book
from sdscratch.book import ROOT, book_lessons, build, load_book, site_map

CHROMIUM = Path("/usr/bin/chromium")
# As root, on a machine whose only network is loopback: no sandbox, no background
# connections that would be refused.
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update",
         "--disable-sync"]
TIMEOUT_MS = 60_000  # any one wait in the browser (the machine may be busy)
TEX_LEFT_AS_TEXT = re.compile(r"\$\$|\\\(|\\\[|\$[^$\n]*\\[A-Za-z]+[^$\n]*\$")


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format, *args):
        pass


class Server(ThreadingHTTPServer):
    def handle_error(self, request, client_address):
        pass  # the browser hung up on a request it no longer needed


@contextmanager
def serve(folder: Path):
    """Serve `folder` on 127.0.0.1 (a free port) until the block ends."""
    server = Server(("127.0.0.1", 0),
                    partial(QuietHandler, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        if os.environ.get("CI") == "true":
            pytest.fail(f"{CHROMIUM} is missing on CI: `make test` installs Debian's "
                        "chromium with apt-get, see what it printed.")
        pytest.skip(f"Debian's chromium ({CHROMIUM}) is not installed and `make test` "
                    "could not install it, so the website was not opened in a browser.")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=FLAGS, timeout=TIMEOUT_MS)
        yield chromium
        chromium.close()


def local_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status == 200
    except urllib.error.URLError:
        return False


def open_page(browser, url: str, screenshot: Path | None = None):
    """Load `url`; return the page, what it logged as errors, and its broken images."""
    page = browser.new_page(viewport={"width": 1280, "height": 860})
    page.set_default_timeout(TIMEOUT_MS)
    errors = []
    page.on("console", lambda m: m.type == "error" and errors.append(m.text))
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("response", lambda r: r.status >= 400 and errors.append(
        f"HTTP {r.status} for {r.url.removeprefix(url.rsplit('/', 1)[0] + '/')}"))
    response = page.goto(url, wait_until="load")
    if response is None or response.status != 200:
        errors.append(f"HTTP {response and response.status}")
    if page.evaluate("() => window.MathJax !== undefined"):
        page.evaluate("() => new Promise(done => MathJax.Hub.Queue(done))")
    page.wait_for_load_state("networkidle")  # fonts and images asked for late
    broken = page.evaluate("""() => [...document.images]
        .filter(image => !(image.complete && image.naturalWidth > 0))
        .map(image => image.getAttribute('src').slice(0, 60))""")
    if screenshot:
        screenshot.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=screenshot)
    return page, errors, broken


def links_of(page, selector: str) -> list[str]:
    return page.eval_on_selector_all(selector, "all => all.map(a => a.href)")


def page_problems(page, base: str, entry: dict, notebook) -> list[str]:
    """What is wrong with one lesson page: math, badges, previous/next, sidebar."""
    problems = []
    has_math = any(cell.cell_type == "markdown" and "$" in cell.source
                   for cell in notebook.cells)
    typeset = page.locator(".MathJax, .MathJax_Display").count()
    if has_math and typeset == 0:
        problems.append("its math was not typeset")
    if page.locator(".MathJax_Error, merror").count():
        problems.append("MathJax reported an error")
    text = " ".join(page.locator(".jp-RenderedMarkdown").all_inner_texts())
    if TEX_LEFT_AS_TEXT.search(text):
        problems.append(f"TeX shows as text: {TEX_LEFT_AS_TEXT.search(text)[0]!r}")
    badges = page.eval_on_selector_all(
        ".jp-RenderedMarkdown a:has(img)",
        "all => all.map(a => [a.querySelector('img').getAttribute('src'), a.href])")
    expected = [["colab-badge.svg", entry["links"]["colab"]],
                ["kaggle-badge.svg", entry["links"]["kaggle"]],
                ["download-badge.svg", base + entry["notebook"]]]
    if badges[:3] != expected:
        problems.append(f"its badges are {badges[:3]}, not {expected}")
    for rel, neighbour in (("prev", entry["prev"]), ("next", entry["next"])):
        want = [base + neighbour["href"]] * 2 if neighbour else []
        if links_of(page, f".sd-pager a[rel={rel}]") != want:
            problems.append(f"its {rel} links are not {want}")
    return problems


def index_problems(browser, base: str, site: dict, screenshot=None):
    """What is wrong with index.html, and the links it holds."""
    page, errors, broken = open_page(browser, base + "index.html", screenshot)
    problems = [f"console error {e}" for e in errors]
    problems += [f"image {src} did not load" for src in broken]
    listed = links_of(page, "a.sd-lesson-link")
    if listed != [base + entry["href"] for entry in site["pages"]]:
        problems.append(f"it lists {listed}, not every lesson in order")
    links = links_of(page, "a[href]")
    page.close()
    return problems, links


def lesson_problems(browser, base: str, site: dict, entry: dict, root: Path,
                    screenshot=None):
    """What is wrong with one lesson's page, and the links it holds."""
    page, errors, broken = open_page(browser, base + entry["href"], screenshot)
    notebook = nbformat.read(root / "lessons" / entry["notebook"], as_version=4)
    problems = [f"console error {e}" for e in errors]
    problems += [f"image {src} did not load" for src in broken]
    problems += page_problems(page, base, entry, notebook)
    if links_of(page, ".sd-toc a") != [base + other["href"] for other in site["pages"]]:
        problems.append("its sidebar does not list every lesson in order")
    links = links_of(page, "a[href]")
    page.close()
    return problems, links


def site_problems(browser, root: Path, out: Path, screenshots=None, only=None):
    """Everything wrong with the site built from `root` into `out`, as sentences.

    `only` names the pages to open (default: the index and every lesson).
    """
    book = load_book(root / "book.toml")
    site = site_map(book, book_lessons(book, root))
    problems, links = [], set()
    with serve(out) as base:
        if only is None or "index.html" in only:
            shot = screenshots / "index.png" if screenshots else None
            found, on_page = index_problems(browser, base, site, shot)
            problems += [f"index.html: {problem}" for problem in found]
            links.update(on_page)
        for number, entry in enumerate(site["pages"]):
            if only is not None and entry["href"] not in only:
                continue
            shot = screenshots / "lesson.png" if screenshots and number == 0 else None
            found, on_page = lesson_problems(browser, base, site, entry, root, shot)
            problems += [f"{entry['href']}: {problem}" for problem in found]
            links.update(on_page)
        for link in sorted(links):
            if link.startswith(base) and not local_ok(link.split("#")[0]):
                problems.append(f"the link {link.removeprefix(base)} is broken")
    return problems


def test_the_course_website_works_in_a_browser(browser):
    out = build(ROOT, ROOT / "_build" / "site")
    shots = ROOT / "_build" / "screenshots"
    for old in shots.glob("*.png"):
        old.unlink()
    assert site_problems(browser, ROOT, out, shots) == []
    assert (shots / "index.png").is_file()
    assert (shots / "lesson.png").is_file() or not load_book().get("lesson")


@pytest.fixture(scope="module")
def tiny_site(tmp_path_factory):
    """A tiny book (math, a figure, a progress bar) and its built site."""
    root = make_book(tmp_path_factory.mktemp("tiny") / "book")
    return root, build(root)


def test_a_tiny_book_with_math_figures_and_progress_bars_passes(browser, tiny_site):
    root, out = tiny_site
    assert site_problems(browser, root, out) == []


@contextmanager
def broken(page: Path, old: str, new: str):
    """`page` with `old` replaced by `new` for the length of the block."""
    text = page.read_text()
    assert old in text
    page.write_text(text.replace(old, new, 1))
    try:
        yield
    finally:
        page.write_text(text)


@pytest.mark.parametrize("old, new, problem", [
    ('src="data:image/png', 'src="missing.png" data-was="', "did not load"),
    ('<main class="sd-main">', '<main class="sd-main"><script>oops()</script>',
     "console error"),
    ("mathjax/MathJax.js", "mathjax/NoMathJax.js", "not typeset"),
    ('class="sd-prev" href="01_lesson_1.html"', 'class="sd-prev" href="index.html"',
     "prev links"),
    ('href="02_lesson_2.ipynb"', 'href="01_lesson_1.ipynb"', "badges"),
])
def test_a_broken_page_fails(browser, tiny_site, old, new, problem):
    root, out = tiny_site
    with broken(out / "02_lesson_2.html", old, new):
        problems = site_problems(browser, root, out, only=["02_lesson_2.html"])
    assert problems and all(p.startswith("02_lesson_2.html") for p in problems)
    assert any(problem in p for p in problems), problems
