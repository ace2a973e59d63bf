"""Fixtures shared by the test modules: the book, built once per test session."""
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
JUPYTER_BOOK = pathlib.Path(sys.executable).parent / "jupyter-book"


@pytest.fixture(scope="session")
def html(tmp_path_factory) -> pathlib.Path:
    """The HTML book, built as `make book` builds it (-W -n --keep-going) into a temporary folder.

    tests/test_book.py reads its files; tests/test_browser.py opens its pages in Chromium.
    """
    out = tmp_path_factory.mktemp("book")
    proc = subprocess.run(
        [str(JUPYTER_BOOK), "build", str(ROOT), "-W", "-n", "--keep-going", "--path-output", str(out)],
        capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, "the book does not build cleanly:\n" + (proc.stdout + proc.stderr)[-6000:]
    return out / "_build" / "html"
