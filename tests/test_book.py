"""The rendered book: it builds with warnings as errors, and the pages show what they should.

The build uses the same flags as `make book` (-W -n --keep-going): a broken page,
cross-reference or citation fails here, and so fails `make test` and CI.
"""
import pathlib
import re
import subprocess
import sys

import pytest
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[1]
JUPYTER_BOOK = pathlib.Path(sys.executable).parent / "jupyter-book"


@pytest.fixture(scope="module")
def html(tmp_path_factory) -> pathlib.Path:
    out = tmp_path_factory.mktemp("book")
    proc = subprocess.run(
        [str(JUPYTER_BOOK), "build", str(ROOT), "-W", "-n", "--keep-going", "--path-output", str(out)],
        capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, "the book does not build cleanly:\n" + (proc.stdout + proc.stderr)[-6000:]
    return out / "_build" / "html"


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
