"""The book's conventions (CONTRIBUTING.md, Notebooks and figures), checked on every notebook."""
import json
import pathlib
import re

import pytest
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted(ROOT.glob("chapters/*/*.ipynb"))
TOC = (ROOT / "_toc.yml").read_text()


def cells(path):
    return json.loads(path.read_text())["cells"]


def expected_setup_cell() -> str:
    url = yaml.safe_load((ROOT / "_config.yml").read_text())["repository"]["url"]
    return (ROOT / "tests/setup_cell.py").read_text().replace("REPO_URL", url).rstrip("\n")


def test_there_are_notebooks():
    assert len(NOTEBOOKS) >= 3


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_first_cell_is_the_setup_cell(path):
    first = cells(path)[0]
    assert first["cell_type"] == "code" and "".join(first["source"]) == expected_setup_cell()


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_committed_with_outputs_and_checks_its_claims(path):
    code = [c for c in cells(path) if c["cell_type"] == "code"]
    # Run top to bottom in one kernel (execution counts 1 … n), and committed with outputs.
    assert [c.get("execution_count") for c in code] == list(range(1, len(code) + 1)), "re-run it top to bottom"
    assert sum(bool(c.get("outputs")) for c in code) >= len(code) / 2, "run it and commit its outputs"
    src = "\n".join("".join(c["source"]) for c in code)
    assert re.search(r"\bassert\b|assert_close", src), "a notebook must check what it claims"
    ignored = sum(bool(NBVAL_TAGS & set(c.get("metadata", {}).get("tags", []))) for c in code)
    assert ignored <= len(code) / 3, "too many cells escape validation; narrow the sanitize rules"


NBVAL_TAGS = {"nbval-ignore-output", "nbval-skip"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_validation_markers_are_cell_tags_not_comments(path):
    # Readers see a cell's source; a `# NBVAL_IGNORE_OUTPUT` comment is for the tooling only.
    for c in cells(path):
        if c["cell_type"] == "code":
            assert "NBVAL_" not in "".join(c["source"]), "use the cell tag nbval-ignore-output instead"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_tables_in_outputs_fit_the_page(path):
    # The book's code column holds about 80 monospace characters. The book wraps longer
    # lines, which reads well for a sentence and garbles a table: rows (columns aligned by
    # runs of spaces) must fit.
    for c in cells(path):
        for out in c.get("outputs", []) if c["cell_type"] == "code" else []:
            if "application/vnd.jupyter.widget-view+json" in out.get("data", {}):
                continue  # a widget's text/plain is a placeholder the book does not show
            text = "".join(out.get("text") or out.get("data", {}).get("text/plain", ""))
            for line in text.splitlines():
                if re.search(r"\S {2,}\S", line):
                    assert len(line) <= 80, f"table row of {len(line)} characters: {line[:60]}…"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_outputs_are_readable_text(path):
    # A printed dict or a bare None is the program's view, not the reader's.
    for c in cells(path):
        for out in c.get("outputs", []) if c["cell_type"] == "code" else []:
            text = "".join(out.get("text", ""))
            # (None as a value printed, not as code shown: `x=None`, `-> None:` are fine)
            assert not re.search(r"\{'[^']*': |(?<![=\w.])None(?![\w:,)\]=])", text), f"print readable text, not: {text[:80]}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_in_the_table_of_contents(path):
    assert str(path.relative_to(ROOT).with_suffix("")) in TOC


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_defines_no_functions(path):
    # Thin notebooks: the code lives in nanopar (and workers must, to be spawned).
    for c in cells(path):
        if c["cell_type"] == "code":
            assert not re.search(r"^\s*(def|class) ", "".join(c["source"]), re.M), "move it to nanopar"


def test_every_chapter_of_the_article_is_in_the_book():
    chapters = ["01_background", "02_concepts", "03_algorithms", "04_practice",
                "05_applications", "06_tools", "07_trends", "08_faq"]
    positions = [TOC.index(f"chapters/{c}/index") for c in chapters]
    assert positions == sorted(positions)
    for c in chapters:
        # A chapter's prose is its overview page and its section pages (chapters 3 to 6).
        words = sum(len(md.read_text().split()) for md in (ROOT / "chapters" / c).glob("*.md"))
        assert words > 500, f"{c} needs real prose"


def test_only_the_articles_sections_are_numbered():
    """Chapter pages with section pages are overviews: a `##` there would take the number 3.1."""
    for c in ("03_algorithms", "04_practice", "05_applications", "06_tools"):
        index = (ROOT / "chapters" / c / "index.md").read_text()
        assert not re.search(r"^##? ", index.split("\n", 2)[2], re.M), f"{c}/index.md: move sections to their pages"
    sections = yaml.safe_load((ROOT / "book/sections.yml").read_text())
    for chapter in sections:
        for s in chapter.get("sections", []):
            assert s["file"] in TOC, f"{s['file']} (section {s['number']}) is not in _toc.yml"
