"""The rendered book: it builds with warnings as errors, and the pages show what they should.

The build uses the same flags as `make book` (-W -n --keep-going): a broken page,
cross-reference or citation fails here, and so fails `make test` and CI.
"""
import html as html_lib
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


def article_sections() -> list[dict]:
    """book/sections.yml flattened: every chapter and section the article numbers."""
    out = []
    for chapter in yaml.safe_load((ROOT / "book/sections.yml").read_text()):
        out.append(chapter)
        out.extend(chapter.get("sections", []))
    return out


def _text(fragment: str) -> str:
    return html_lib.unescape(re.sub(r"<[^>]+>", "", fragment)).strip()


def numbered_headings(page: pathlib.Path) -> list[tuple[str, str]]:
    """(number, title) of every heading of a page's own content that carries a number."""
    found = re.findall(r'<h[1-6]><span class="section-number">([\d.]+)\. </span>(.*?)<a class="headerlink"',
                       page.read_text())
    return [(number, _text(title)) for number, title in found]


def test_sidebar_reads_as_the_articles_table_of_contents(html):
    """The sidebar numbers exactly the article's chapters and the sections that have a page."""
    expected = [(s["number"], s["title"], s["file"]) for s in article_sections()
                if s["number"].count(".") == 0 or s["file"] != s["file"].rsplit("/", 1)[0] + "/index"]
    links = re.findall(r'<li class="toctree-l\d[^"]*"><a class="reference internal" href="\.\./([^"]+)\.html">(.*?)</a>',
                       (html / "book/intro.html").read_text())
    numbered = [(m.group(1), _text(m.group(2)), f) for f, text in links
                if (m := re.match(r"([\d.]+)\. (.*)", _text(text)))]
    assert numbered == expected


def test_every_article_section_is_a_numbered_heading_and_nothing_else_is(html):
    listed = {(s["number"], s["title"]) for s in article_sections()}
    for s in article_sections():
        assert (s["number"], s["title"]) in numbered_headings(html / f"{s['file']}.html"), s
    for page in html.rglob("*.html"):
        extra = set(numbered_headings(page)) - listed
        assert not extra, f"{page.relative_to(html)} numbers headings the article does not: {extra}"


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


def test_chapter_2_figure_numbers_hybrid_ranks_as_chapter_3_does():
    """The hybrid panel of fig-parallelism places device d at grid coordinates
    i_dp = d % d_dp, i_pp = d // d_dp (rank = i_tp + d_tp (i_dp + d_dp i_pp), d_tp = 1),
    so with d_dp = d_pp = 2 the pipelines are devices {0, 2} and {1, 3}."""
    from nanopar import plotting

    hybrid = plotting.plot_parallelism_schemes().axes[2]
    held: dict[int, dict] = {}
    for text in hybrid.texts:
        device = int(text.get_position()[0] // 1.2)  # each device's column is 1.2 wide
        label = text.get_text()
        entry = held.setdefault(device, {"layers": set()})
        if label.startswith("L"):
            entry["layers"].add(int(label[1:]))
        elif label.startswith("batch"):
            entry["batch"] = label
    d_dp = 2
    for d, entry in held.items():
        i_dp, i_pp = d % d_dp, d // d_dp
        assert entry["layers"] == {2 * i_pp + 1, 2 * i_pp + 2}, f"device {d} holds the wrong stage"
        assert entry["batch"] == held[i_dp]["batch"], f"device {d} is not in pipeline {i_dp}"
    assert held[0]["batch"] != held[1]["batch"]
