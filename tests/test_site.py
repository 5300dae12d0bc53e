"""The course website, built by mdBook and opened in a real headless Chromium.

The site is served on 127.0.0.1 only, for the length of the tests, and every page is
opened 1366 px wide (a laptop) and 390 px wide (a phone). Each page must load with
no console error or failed request, ask nothing of another host, show every image
(on a laptop, every figure at its own size: none scaled down to the column), typeset
its math, fit the phone's width, and link its badges and its neighbours where they
belong. Screenshots go to _build/screenshots/.
"""

import gzip
import io
import os
import re
import statistics
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
from sdscratch.book import ROOT, book_lessons, build, links, load_book

CHROMIUM = Path("/usr/bin/chromium")
# As root, on a machine whose only network is loopback: no sandbox, no background
# connections that would be refused.
FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TIMEOUT_MS = 60_000  # any one wait in the browser (the machine may be busy)
WIDTHS = {"desktop": (1366, 860), "phone": (390, 844)}
TEX_LEFT_AS_TEXT = re.compile(r"\$\$|\\\(|\\\[|\$[^$\n]*\\[A-Za-z]+[^$\n]*\$")
PROSE = "#mdbook-content main :is(p, li, h1, h2, h3, h4, td)"
SHOTS = ROOT / "_build" / "screenshots"
COMPRESSED = {".html", ".css", ".js", ".svg", ".json", ".ipynb"}


class QuietHandler(SimpleHTTPRequestHandler):
    """Serves the site as GitHub Pages does: text files gzip-compressed if asked."""

    def log_message(self, format, *args):
        pass

    def send_head(self):
        path = Path(self.translate_path(self.path))
        if (
            path.suffix not in COMPRESSED
            or not path.is_file()
            or "gzip" not in self.headers.get("Accept-Encoding", "")
        ):
            return super().send_head()
        body = gzip.compress(path.read_bytes())
        self.send_response(200)
        self.send_header("Content-Type", self.guess_type(str(path)))
        self.send_header("Content-Encoding", "gzip")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        return io.BytesIO(body)


class Server(ThreadingHTTPServer):
    def handle_error(self, request, client_address):
        pass  # the browser hung up on a request it no longer needed


@contextmanager
def serve(folder: Path):
    """Serve `folder` on 127.0.0.1 (a free port) until the block ends."""
    server = Server(("127.0.0.1", 0), partial(QuietHandler, directory=str(folder)))
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
            pytest.fail(
                f"{CHROMIUM} is missing on CI: `make test` installs Debian's "
                "chromium with apt-get, see what it printed."
            )
        pytest.skip(
            f"Debian's chromium ({CHROMIUM}) is not installed and `make test` "
            "could not install it, so the website was not opened in a browser."
        )
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=FLAGS, timeout=TIMEOUT_MS
        )
        yield chromium
        chromium.close()


class Site:
    """A built site being served: its lessons in order, as pages to open."""

    def __init__(self, root: Path, out: Path, base: str):
        self.root, self.out, self.base = root, out, base
        self.book = load_book(root / "book.toml")
        self.lessons = book_lessons(self.book, root)
        self.pages = ["index.html"] + [
            Path(lesson["file"]).with_suffix(".html").name for lesson in self.lessons
        ]

    def lesson(self, page: str) -> dict | None:
        index = self.pages.index(page)
        return self.lessons[index - 1] if index > 0 else None


@pytest.fixture(scope="module")
def site():
    """The real course website, built once for these tests."""
    out = build(ROOT, ROOT / "_build" / "site")
    with serve(out) as base:
        yield Site(ROOT, out, base)


@pytest.fixture(scope="module")
def tiny_site(tmp_path_factory):
    """A tiny book (math, a figure, a progress bar, a solution), built and served."""
    root = make_book(tmp_path_factory.mktemp("tiny") / "book")
    out = build(root)
    with serve(out) as base:
        yield Site(root, out, base)


def open_page(context, url: str):
    """Load `url` until its math is typeset and the network is quiet.

    Returns the page and what happened: `errors` (console errors, failed
    requests), `requests` (every address asked for).
    """
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    seen = {"errors": [], "requests": []}
    base = url.rsplit("/", 1)[0] + "/"
    page.on("console", lambda m: m.type == "error" and seen["errors"].append(m.text))
    page.on("pageerror", lambda e: seen["errors"].append(str(e)))
    page.on("request", lambda r: seen["requests"].append(r.url))
    page.on(
        "requestfailed",
        lambda r: seen["errors"].append(f"request failed: {r.url.removeprefix(base)}"),
    )
    page.on(
        "response",
        lambda r: (
            r.status >= 400
            and seen["errors"].append(f"HTTP {r.status} for {r.url.removeprefix(base)}")
        ),
    )
    page.goto(url, wait_until="load")
    page.evaluate("""() => window.MathJax === undefined || new Promise(done =>
        MathJax.Hub.Register.StartupHook("End", done))""")
    page.wait_for_load_state("networkidle")  # fonts and images asked for late
    return page, seen


MEASURE = """() => {
    const images = [...document.images]
        .filter(image => !(image.complete && image.naturalWidth > 0))
        .map(image => image.getAttribute('src').slice(0, 60));
    const entries = [...performance.getEntriesByType('navigation'),
                     ...performance.getEntriesByType('resource')];
    // mdBook's content box scrolls on its own: it must not need to sideways either
    const boxes = [document.documentElement, document.getElementById('mdbook-content')];
    // a figure wider than the column is scaled down, and its 10-pixel text with it
    const shrunk = [...document.querySelectorAll('main img[width]')]
        .filter(image => image.clientWidth > 0)  // not in a folded solution
        .filter(image => image.clientWidth < Number(image.getAttribute('width')))
        .map(image => image.getAttribute('src').slice(0, 60));
    return {broken: images, shrunk: shrunk,
            overflow: Math.max(...boxes.map(box => box.scrollWidth - box.clientWidth)),
            bytes: entries.reduce((sum, entry) => sum + entry.encodedBodySize, 0),
            unpacked: entries.reduce((sum, entry) => sum + entry.decodedBodySize, 0)};
}"""


def hrefs(page, selector: str) -> list[str]:
    return page.eval_on_selector_all(selector, "all => all.map(a => a.href)")


def lesson_problems(page, site: Site, name: str) -> list[str]:
    """What is wrong with one lesson page: math, badges, previous/next, sidebar."""
    lesson, base = site.lesson(name), site.base
    notebook = nbformat.read(site.root / "lessons" / lesson["file"], as_version=4)
    problems = []
    if any(c.cell_type == "markdown" and "$" in c.source for c in notebook.cells):
        if page.locator(".MathJax, .MathJax_Display").count() == 0:
            problems.append("its math was not typeset")
    if page.locator(".MathJax_Error, merror").count():
        problems.append("MathJax reported an error")
    text = " ".join(page.locator(PROSE).all_inner_texts())
    if TEX_LEFT_AS_TEXT.search(text):
        problems.append(f"TeX shows as text: {TEX_LEFT_AS_TEXT.search(text)[0]!r}")
    badges = page.eval_on_selector_all(
        "main a:has(img)",
        "all => all.map(a => [a.querySelector('img').getAttribute('src'), a.href])",
    )[:3]
    link = links(site.book, lesson["file"])
    expected = [
        ["colab-badge.svg", link["colab"]],
        ["kaggle-badge.svg", link["kaggle"]],
        ["download-badge.svg", base + lesson["file"]],
    ]
    if badges != expected:
        problems.append(f"its badges are {badges}, not {expected}")
    index = site.pages.index(name)
    for rel, other in (("prev", index - 1), ("next", index + 1)):
        want = {base + site.pages[other]} if other < len(site.pages) else set()
        if set(hrefs(page, f"a[rel~={rel}]")) != want:
            problems.append(f"its {rel} links are not {want}")
    return problems


def page_problems(context, site: Site, name: str, phone: bool):
    """Everything wrong with one page, its weight in bytes, and the links it holds."""
    page, seen = open_page(context, site.base + name)
    measured = page.evaluate(MEASURE)
    problems = [f"console error {error}" for error in seen["errors"]]
    problems += [
        f"asked another host for {url}"
        for url in seen["requests"]
        if not url.startswith(("data:", "blob:", site.base))
    ]
    problems += [f"image {src} did not load" for src in measured["broken"]]
    if not phone:
        shrunk = measured["shrunk"]
        problems += [f"figure {src} is scaled down to the column" for src in shrunk]
    if phone and measured["overflow"] > 0:
        problems.append(f"overflows the phone's width by {measured['overflow']} px")
    chapters = [a for a in hrefs(page, "#mdbook-sidebar a[href]") if "#" not in a]
    if chapters != [site.base + other for other in site.pages]:
        problems.append(f"its sidebar lists {chapters}, not every page in order")
    if name == "index.html":
        listed = [a for a in hrefs(page, "main a") if a in chapters[1:]]
        if list(dict.fromkeys(listed)) != chapters[1:]:
            problems.append(f"it lists the lessons {listed}, not all in order")
    elif phone is False:
        problems += lesson_problems(page, site, name)
    report = {
        "bytes": measured["bytes"],
        "unpacked": measured["unpacked"],
        "requests": len(seen["requests"]),
        "links": set(hrefs(page, "a[href]")),
    }
    page.close()
    where = f"{name} ({'phone' if phone else 'desktop'})"
    return [f"{where}: {problem}" for problem in problems], report


def local_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status == 200
    except urllib.error.URLError:
        return False


def site_problems(browser, site: Site, pages=None, widths=("desktop", "phone")):
    """Everything wrong with the site's pages (default: all) on a laptop and a phone.

    Returns the problems as sentences, and each page's report (on the first width).
    """
    problems, reports = [], {}
    for width in widths:
        phone = width == "phone"
        size = dict(zip(("width", "height"), WIDTHS[width]))
        context = browser.new_context(viewport=size)
        for name in pages or site.pages:
            found, report = page_problems(context, site, name, phone)
            problems += found
            reports.setdefault(name, report)
        context.close()
    links = set().union(*(report["links"] for report in reports.values()))
    for link in sorted({link.split("#")[0] for link in links}):
        if link.startswith(site.base) and not local_ok(link):
            problems.append(f"the link {link.removeprefix(site.base)} is broken")
    return problems, reports


@pytest.fixture(scope="module")
def checked(browser, site):
    """The real site's problems and page reports, found once for the tests below."""
    return site_problems(browser, site)


def test_every_page_of_the_course_website_works_on_a_laptop_and_a_phone(checked):
    problems, reports = checked
    assert problems == []


def test_the_median_lesson_page_weighs_at_most_a_megabyte(checked, site):
    _, reports = checked
    weights = [reports[page]["bytes"] for page in site.pages[1:]]
    for page in site.pages:
        print(
            page,
            reports[page]["bytes"],
            reports[page]["unpacked"],
            reports[page]["requests"],
        )
    assert weights and statistics.median(weights) <= 1_000_000, weights


def test_the_tiny_book_with_math_figures_and_progress_bars_passes(browser, tiny_site):
    problems, _ = site_problems(browser, tiny_site)
    assert problems == []


def screenshot(page, name: str) -> Path:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=SHOTS / name)
    return SHOTS / name


def test_searching_cross_attention_lists_lesson_06(browser, site):
    page, _ = open_page(browser.new_context(), site.base + "index.html")
    page.click("#mdbook-search-toggle")
    page.fill("#mdbook-searchbar", "cross-attention")
    page.wait_for_selector("#mdbook-searchresults a")
    found = hrefs(page, "#mdbook-searchresults a")
    assert any("06_cross_attention.html" in href for href in found), found
    page.context.close()


def test_the_dark_theme_switches(browser, site):
    page, seen = open_page(
        browser.new_context(viewport={"width": 1366, "height": 860}),
        site.base + "06_cross_attention.html",
    )
    background = "() => getComputedStyle(document.documentElement).backgroundColor"
    light = page.evaluate(background)
    screenshot(page, "desktop.png")
    page.click("#mdbook-theme-toggle")
    page.click("#mdbook-theme-navy")
    dark = page.evaluate(background)
    red, green, blue = map(int, re.findall(r"\d+", dark)[:3])
    assert "navy" in page.evaluate("() => document.documentElement.className")
    assert dark != light and red + green + blue < 3 * 80, (light, dark)
    screenshot(page, "dark.png")
    assert seen["errors"] == []
    page.context.close()


def test_the_phone_menu_opens_the_list_of_lessons(browser, site):
    context = browser.new_context(
        viewport=dict(zip(("width", "height"), WIDTHS["phone"]))
    )
    page, _ = open_page(context, site.base + "03_unet.html")
    box = "document.getElementById('mdbook-sidebar').getBoundingClientRect()"
    title = page.locator("main h1").bounding_box()
    # the menu is closed and the lesson comes first
    assert page.evaluate(f"() => {box}.right") <= 0 and title["y"] < 200
    screenshot(page, "phone.png")
    page.click("#mdbook-sidebar-toggle")
    page.wait_for_function(f"() => {box}.left >= 0")  # slid in
    lesson = page.locator("#mdbook-sidebar a[href='06_cross_attention.html']")
    assert lesson.is_visible()
    screenshot(page, "phone-menu.png")
    context.close()


def test_lesson_pages_have_copy_buttons_heading_anchors_and_a_print_page(browser, site):
    page, _ = open_page(browser.new_context(), site.base + "06_cross_attention.html")
    blocks = page.locator("main pre > code").count()
    assert blocks > 5 and page.locator("main pre button.clip-button").count() == blocks
    headings = page.locator("main h2").count()
    assert headings > 3 and page.locator("main h2 > a.header[href^='#']").count() == (
        headings
    )
    assert hrefs(page, "a[href$='print.html']") == [site.base + "print.html"]
    page.context.close()
    printed, seen = open_page(browser.new_context(), site.base + "print.html")
    badges = printed.locator("main img[src='colab-badge.svg']").count()
    assert badges == len(site.lessons)  # every lesson, one after the other
    assert seen["errors"] == [] and printed.evaluate(MEASURE)["broken"] == []
    printed.context.close()


def test_the_animation_of_lesson_09_plays_with_its_buttons(browser, site):
    page, _ = open_page(browser.new_context(), site.base + "09_latent_diffusion.html")
    frame = "() => document.querySelector('.sd-html img').getAttribute('src')"
    icons = page.locator(".sd-html .anim-buttons button svg")
    assert icons.count() == 9 and icons.first.bounding_box()["width"] > 5
    first = page.evaluate(frame)
    page.click(".sd-html button[title=Play]")
    page.wait_for_function(f"() => ({frame[6:]}) !== {first!r}")
    page.click(".sd-html button[title=Pause]")
    page.click(".sd-html button[title='First frame']")
    assert page.evaluate(frame) == first
    page.context.close()


def test_lesson_06_shows_its_math(browser, site):
    context = browser.new_context(
        viewport=dict(zip(("width", "height"), WIDTHS["phone"]))
    )
    page, _ = open_page(context, site.base + "06_cross_attention.html")
    display = page.locator(".MathJax_Display").first
    display.scroll_into_view_if_needed()
    box = display.bounding_box()
    assert 0 <= box["x"] and box["x"] + box["width"] <= WIDTHS["phone"][0]
    screenshot(page, "math-phone.png")
    context.close()


def test_a_solution_is_folded_until_opened(browser, tiny_site):
    page, _ = open_page(browser.new_context(), tiny_site.base + "01_lesson_1.html")
    solution = page.locator("details.sd-solution")
    assert solution.locator("summary").inner_text() == "Solution"
    code = solution.locator("pre code").first
    assert not code.is_visible()
    solution.locator("summary").click()
    assert code.is_visible() and code.inner_text().strip().startswith("answer = 6 * 7")
    assert "SOLUTION" not in page.locator("main").inner_text()
    page.context.close()


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


@pytest.mark.parametrize(
    "old, new, problem",
    [
        ('src="02_lesson_2/cell003-1.png"', 'src="missing.png"', "did not load"),
        ("<main>", "<main><script>oops()</script>", "console error"),
        ("mathjax/MathJax.js", "mathjax/NoMathJax.js", "not typeset"),
        ('href="02_lesson_2.ipynb"', 'href="01_lesson_1.ipynb"', "badges"),
        (
            'rel="prev" href="01_lesson_1.html"',
            'rel="prev" href="index.html"',
            "prev links",
        ),
        ("<main>", '<main><img src="http://127.0.0.2:9/x.png" alt="">', "another host"),
        ("<main>", '<main><div style="width: 1200px">wide</div>', "phone's width"),
    ],
)
def test_a_broken_page_fails(browser, tiny_site, old, new, problem):
    width = "phone" if problem == "phone's width" else "desktop"
    with broken(tiny_site.out / "02_lesson_2.html", old, new):
        problems, _ = site_problems(browser, tiny_site, ["02_lesson_2.html"], [width])
    assert problems and all(p.startswith("02_lesson_2.html") for p in problems)
    assert any(problem in p for p in problems), problems
