"""The rendered book: it builds with warnings as errors, and the pages show what they should.

The build uses the same flags as `make book` (-W -n --keep-going): a broken page,
cross-reference or citation fails here, and so fails `make test` and CI.
"""
import os
import pathlib
import re
import shutil

import pytest
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[1]
# The `html` fixture (the built book, shared with tests/test_browser.py) is in conftest.py.


def toc_files() -> list[str]:
    return re.findall(r"file:\s*(\S+)", (ROOT / "_toc.yml").read_text())


def test_every_page_of_the_toc_is_rendered(html):
    for f in toc_files():
        page = html / f"{f}.html"
        assert page.exists(), f"{f} was not rendered"
        assert len(page.read_text()) > 5000


def test_notebook_pages_show_their_committed_outputs(html):
    for nb in sorted(ROOT.glob("chapters/*/*.ipynb")):
        page = (html / nb.relative_to(ROOT).with_suffix(".html")).read_text()
        assert "tier: " in page, f"{nb.name}: the setup cell's output is missing"
        assert 'class="cell_output' in page
    ring = (html / "chapters/02_concepts/ring_allreduce.html").read_text()
    assert "ring == dist.all_reduce == sum of inputs" in ring and "<img" in ring


def test_notebook_pages_have_a_colab_button(html):
    url = yaml.safe_load((ROOT / "_config.yml").read_text())["repository"]["url"]
    repo = url.removeprefix("https://github.com/")
    page = (html / "chapters/02_concepts/ring_allreduce.html").read_text()
    assert f"colab.research.google.com/github/{repo}/blob/main/chapters/02_concepts/ring_allreduce.ipynb" in page


def test_citations_and_math_render(html):
    page = (html / "chapters/02_concepts/index.html").read_text()
    assert "Patarasuk" in page and "references.html#id" in page  # a resolved citation links out
    assert "\\alpha" in page  # MathJax source is present
    refs = (html / "book/references.html").read_text()
    for author in ("Huang", "Shoeybi", "Rajbhandari", "Sergeev", "Li"):
        assert author in refs


def test_scripts_and_styles_are_served_by_the_book(html):
    """Offline reading: MathJax and the widget library are fetched from npm by the build
    (book/_ext/offline_assets.py) and served from _static/, like every other script."""
    if shutil.which("npm") is None and os.environ.get("CI") != "true":
        pytest.skip("npm is not installed, so the build loads MathJax from a CDN (install Node.js)")
    for page in html.rglob("*.html"):
        tags = re.findall(r"<(?:script|link)\b[^>]*>", page.read_text())
        external = [t for t in tags if re.search(r'(?:src|href)="https?://', t)]
        assert external == [], f"{page.relative_to(html)} loads from the internet"
    assert 'src="../_static/mathjax/tex-mml-chtml.js' in (html / "book/notation.html").read_text()
    widgets = (html / "chapters/01_background/memory_and_compute.html").read_text()
    assert 'src="../../_static/jupyter-widgets/embed.js' in widgets
    assert (html / "_static/mathjax/output/chtml/fonts/woff-v2").is_dir()
