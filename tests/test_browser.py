"""The rendered book as a reader meets it: every page of _toc.yml in headless Chromium, offline.

Debian's Chromium (`apt-get install chromium`; .ci/run installs it), driven by Playwright
for Python pointed at that browser (no `playwright install`). The pages come from a local
HTTP server on 127.0.0.1, and any other request is refused and reported: a page that
needs the internet fails here. Screenshots of three pages are written to
_build/screenshots/ for a person to look at.
"""
from __future__ import annotations

import functools
import html.parser
import http.server
import os
import pathlib
import re
import shutil
import threading
import urllib.parse
from dataclasses import dataclass

import pytest
import yaml

from nanopar import cost, memory_model, schedules

try:
    from playwright.sync_api import TimeoutError as PlaywrightTimeoutError
    from playwright.sync_api import sync_playwright
except ImportError:  # MISSING below says how to install it
    sync_playwright = None

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCREENSHOTS = ROOT / "_build" / "screenshots"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run"]
CONFIG = yaml.safe_load((ROOT / "_config.yml").read_text())
TOC_PAGES = re.findall(r"file:\s*(\S+)", (ROOT / "_toc.yml").read_text())
NOTEBOOK_PAGES = [p for p in TOC_PAGES if (ROOT / f"{p}.ipynb").exists()]


CHROMIUM = shutil.which("chromium")
MISSING = ("Chromium is not installed (Debian: `apt-get install chromium`)" if CHROMIUM is None else
           "Playwright is not installed (`pip install -r requirements.txt`)" if sync_playwright is None else None)
ON_CI = os.environ.get("CI") == "true"
# Skipped before the book is built; on CI a missing browser fails in the `browser` fixture instead.
pytestmark = pytest.mark.skipif(MISSING is not None and not ON_CI, reason=f"{MISSING}: the browser tests cannot run")


@pytest.fixture(scope="module")
def browser():
    if MISSING:
        pytest.fail(f"{MISSING}: on CI the browser tests must run")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        yield browser
        browser.close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def site(browser, html) -> str:
    """The built book on http://127.0.0.1:<free port>/."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(html)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def context(browser, site):
    """A browser context that may only reach the local server; ``context.refused`` lists the rest."""
    context = browser.new_context(viewport={"width": 1280, "height": 900}, service_workers="block")
    context.refused = []

    def local_only(route):
        if route.request.url.startswith(site) or route.request.url.startswith("data:"):
            route.continue_()
        else:
            context.refused.append(route.request.url)
            route.abort()

    context.route("**/*", local_only)
    context.set_default_timeout(20_000)
    yield context
    context.close()


def open_page(context, site: str, path: str):
    """Load ``path`` and wait for MathJax and the widgets; returns the page and its problems."""
    page = context.new_page()
    problems: list[str] = []
    page.on("console", lambda m: problems.append(f"console error: {m.text}") if m.type == "error" else None)
    page.on("pageerror", lambda error: problems.append(f"JavaScript error: {error}"))
    page.on("requestfailed", lambda r: problems.append(f"failed request: {r.url} ({r.failure})")
            if r.url.startswith(site) else None)
    page.on("response", lambda r: problems.append(f"HTTP {r.status}: {r.url}") if r.status >= 400 else None)
    refused_before = len(context.refused)
    page.goto(site + path, wait_until="load")
    page.evaluate("() => window.MathJax && MathJax.startup && MathJax.startup.promise")
    try:
        page.wait_for_function(RENDERED_WIDGETS + ".every(Boolean)", timeout=10_000)
    except PlaywrightTimeoutError:
        pass  # test_notebook_widgets_render names the page whose widgets were not drawn
    problems += [f"request to the internet: {url}" for url in context.refused[refused_before:]]
    return page, problems


# For each notebook widget view in the page: whether the widget library drew it.
RENDERED_WIDGETS = """[...document.querySelectorAll('script[type="application/vnd.jupyter.widget-view+json"]')]
  .map((s) => s.parentElement.querySelector('.jupyter-widgets, .widget-output') !== null)"""

PAGE_FACTS = """() => {
  const article = document.querySelector("article.bd-article") || document.body;
  const prose = article.cloneNode(true);  // the text a reader sees as prose: no code, no typeset math
  prose.querySelectorAll("pre, code, script, style, mjx-container").forEach((e) => e.remove());
  return {
    formulas: document.querySelectorAll(".math").length,
    typeset: document.querySelectorAll(".math mjx-container").length,
    rawMath: ["\\\\(", "\\\\[", "$$"].filter((s) => prose.textContent.includes(s)),
    brokenImages: [...document.images].filter((i) => !(i.complete && i.naturalWidth > 0)).map((i) => i.src),
    links: [...document.querySelectorAll("a[href]")].map((a) => a.href),
    widgets: %s,
    displayMath: document.querySelectorAll("div.math").length,
    plots: document.querySelectorAll(".cell_output img").length,
    calculators: [...document.querySelectorAll("[data-calculator]")].map((e) => e.dataset.calculator),
    cutOutputs: [...document.querySelectorAll("div.cell_output pre")]
      .filter((p) => p.scrollWidth > p.clientWidth + 1).map((p) => p.textContent.slice(0, 60)),
  };
}""" % RENDERED_WIDGETS


@dataclass
class Visit:
    path: str
    problems: list[str]
    facts: dict


@pytest.fixture(scope="module")
def visits(context, site) -> list[Visit]:
    """Every page of the table of contents, opened once."""
    result = []
    for path in TOC_PAGES:
        page, problems = open_page(context, site, f"{path}.html")
        result.append(Visit(path, problems, page.evaluate(PAGE_FACTS)))
        page.close()
    return result


def test_pages_load_offline_without_errors(visits):
    assert {v.path: v.problems for v in visits if v.problems} == {}


def test_math_is_typeset_by_the_book_own_mathjax(visits):
    assert sum(v.facts["formulas"] for v in visits) > 100  # the check has something to check
    for v in visits:
        assert v.facts["typeset"] == v.facts["formulas"], f"{v.path}: formulas left untypeset"
        assert v.facts["rawMath"] == [], f"{v.path}: raw TeX delimiters in the text"


def test_images_load(visits):
    assert {v.path: v.facts["brokenImages"] for v in visits if v.facts["brokenImages"]} == {}


def test_notebook_widgets_render(visits):
    """Widgets are drawn from their saved state (the widget library is served by the book)."""
    widgets = {v.path: v.facts["widgets"] for v in visits if v.facts["widgets"]}
    assert "chapters/01_background/memory_and_compute" in widgets
    assert all(all(drawn) for drawn in widgets.values()), widgets


def test_code_outputs_fit_the_page(visits):
    assert {v.path: v.facts["cutOutputs"] for v in visits if v.facts["cutOutputs"]} == {}


class _Ids(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.ids: set[str] = set()

    def handle_starttag(self, tag, attrs) -> None:
        self.ids.update(value for name, value in attrs if name == "id" or (tag == "a" and name == "name"))


@functools.lru_cache(maxsize=None)
def ids_in(page: pathlib.Path) -> frozenset[str]:
    parser = _Ids()
    parser.feed(page.read_text(encoding="utf-8"))
    return frozenset(parser.ids)


def test_internal_links_and_anchors_resolve(visits, site, html):
    broken = []
    checked = 0
    for v in visits:
        for link in v.facts["links"]:
            if not link.startswith(site):
                continue
            url = urllib.parse.urlsplit(link)
            target = html / urllib.parse.unquote(url.path).lstrip("/")
            if target.is_dir():
                target = target / "index.html"
            checked += 1
            if not target.is_file():
                broken.append(f"{v.path}: {link} (no such file)")
            elif url.fragment and target.suffix == ".html" and urllib.parse.unquote(url.fragment) not in ids_in(target):
                broken.append(f"{v.path}: {link} (no such anchor)")
    assert checked > 100
    assert broken == []


def test_colab_links_open_the_page_notebook(visits):
    repo = CONFIG["repository"]["url"].removeprefix("https://github.com/")
    branch = CONFIG["repository"]["branch"]
    by_path = {v.path: v for v in visits}
    assert NOTEBOOK_PAGES
    for path in NOTEBOOK_PAGES:
        colab = [link for link in by_path[path].facts["links"] if "colab.research.google.com" in link]
        assert colab == [f"https://colab.research.google.com/github/{repo}/blob/{branch}/{path}.ipynb"], path


def calculator(context, site, visits, name: str):
    """Open the page that holds calculator ``name``: the page, its problems, the calculator, and
    a function that reads the number it shows under a ``data-result`` key."""
    path = next(v.path for v in visits if name in v.facts["calculators"])
    page, problems = open_page(context, site, f"{path}.html")
    root = page.locator(f'[data-calculator="{name}"]')
    return page, problems, root, lambda key: root.locator(f'[data-result="{key}"]').inner_text()


def test_each_calculator_is_on_a_page(visits):
    placed = {v.path: v.facts["calculators"] for v in visits if v.facts["calculators"]}
    assert sorted(sum(placed.values(), [])) == ["allreduce", "memory", "pipeline"], placed
    # the memory calculator stands in for the notebook's sliders where no kernel runs
    assert placed["chapters/01_background/memory_and_compute"] == ["memory"]


def test_memory_calculator_shows_what_the_memory_model_computes(context, site, visits):
    page, problems, root, shown = calculator(context, site, visits, "memory")
    shape = dict(batch=2, seq=2048, hidden=8192, layers=80, heads=64)
    cases = [(70, "fp32", "momentum", 0, (1, 1, 1), "off"), (1.3, "mixed", "adam", 2, (8, 2, 1), "saved"),
             (175, "mixed_fp32_grad_copy", "adam", 3, (16, 8, 4), "checkpointed"),
             (0.35, "autocast", "sgd", 1, (4, 1, 2), "saved")]
    for params, precision, optimizer, stage, (dp, tp, pp), activations in cases:
        root.locator('[name="params"]').fill(str(params))
        for name, value in [("precision", precision), ("optimizer", optimizer), ("zeroStage", str(stage)),
                            ("activations", activations), ("attention", "fused"), ("dropout", "no")]:
            root.locator(f'[name="{name}"]').select_option(value)
        for name, value in [("dp", dp), ("tp", tp), ("pp", pp), *shape.items()]:
            root.locator(f'[name="{name}"]').fill(str(value))
        spec = None if activations == "off" else memory_model.ActivationSpec(
            **shape, checkpointing=activations == "checkpointed", attention="fused", dropout=False)
        expected = memory_model.memory_per_device(params * 1e9, precision, optimizer, stage, dp, tp, pp, spec)
        b = memory_model.bytes_per_param(precision, optimizer)
        for kind in ("weights", "grads", "optimizer", "total"):
            assert shown(f"{kind}-per-param") == str(getattr(b, kind))
        for kind in (*memory_model.MEMORY_KINDS, "total"):
            assert shown(f"{kind}-gib") == f"{memory_model.gib(expected[kind]):,.1f}", (kind, params, precision)
    root.locator('[name="tp"]').fill("3")
    assert "choose tp dividing the number of heads" in root.locator(".calculator-error").inner_text()
    page.close()
    assert problems == []


def test_schedule_explorer_draws_what_nanopar_runs(context, site, visits):
    page, problems, root, shown = calculator(context, site, visits, "pipeline")
    for p, m, name in [(3, 5, "gpipe"), (4, 6, "1f1b"), (2, 3, "naive")]:
        root.locator('[name="p"]').fill(str(p))
        root.locator('[name="m"]').fill(str(m))
        root.locator('[name="schedule"]').select_option(name)
        drawn = root.locator("rect[data-op]").evaluate_all("(boxes) => boxes.map((b) => b.dataset.op)")
        ops = schedules.make(name, p, m)
        assert sorted(drawn) == sorted(f"{o.slot},{o.stage},{o.microbatch},{o.kind}" for o in ops)
        assert shown("idle") == f"{schedules.idle_fraction(ops, p):.3f}"
        assert shown("bubble") == f"{schedules.bubble_fraction(p, m):.3f}"
        assert shown("peak") == str(schedules.peak_in_flight(ops, 0))
    root.locator('[name="m"]').fill("0")
    assert "positive integer" in root.locator(".calculator-error").inner_text()
    page.close()
    assert problems == []


def test_allreduce_calculator_shows_what_cost_computes(context, site, visits):
    page, problems, root, shown = calculator(context, site, visits, "allreduce")
    for ranks, megabytes, microseconds, gbps in [(12, 3, 7, 12), (64, 0.001, 5, 25)]:
        for name, value in [("ranks", ranks), ("megabytes", megabytes), ("microseconds", microseconds),
                            ("gigabytesPerS", gbps)]:
            root.locator(f'[name="{name}"]').fill(str(value))
        times = {a: cost.allreduce_time(a, ranks, megabytes * 1e6, microseconds * 1e-6, gbps * 1e9)
                 for a in cost.ALLREDUCE_ALGORITHMS}
        for algorithm, seconds in times.items():
            assert shown(algorithm) == f"{seconds * 1e3:.3f}"
        assert shown("fastest").endswith(min(times, key=times.get))
    page.close()
    assert problems == []


def test_screenshots_for_a_person_to_look_at(context, site, visits):
    """The page with the most displayed formulas, the first notebook plot (with the output
    above it) and the pipeline explorer, as a reader's 1280-pixel-wide window shows them."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    theory = max(visits, key=lambda v: v.facts["displayMath"]).path
    plotted = next(v.path for v in visits if v.path in NOTEBOOK_PAGES and v.facts["plots"])
    explorer = next(v.path for v in visits if "pipeline" in v.facts["calculators"])
    shots = {
        "theory": (theory, "div.math", "center"),
        "notebook_plot": (plotted, ".cell_output img", "end"),
        "calculator_pipeline": (explorer, '[data-calculator="pipeline"]', "center"),
    }
    for name, (path, selector, block) in shots.items():
        page, problems = open_page(context, site, f"{path}.html")
        page.evaluate("([s, block]) => document.querySelector(s).scrollIntoView({block})", [selector, block])
        page.screenshot(path=SCREENSHOTS / f"{name}.png")
        page.close()
        assert problems == []
        assert (SCREENSHOTS / f"{name}.png").stat().st_size > 10_000
