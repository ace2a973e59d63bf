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
    ignored = len(re.findall(r"NBVAL_(IGNORE_OUTPUT|SKIP)", src))
    assert ignored <= len(code) / 3, "too many cells escape validation; narrow the sanitize rules"


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
        assert len((ROOT / "chapters" / c / "index.md").read_text().split()) > 500, f"{c} needs real prose"
