"""Chapter 6, the tools mapped: each section's PyTorch script runs as a reader would run it,
and every `nanopar.…` or `torch.…` name the chapter cites exists."""
import importlib
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
CHAPTER = ROOT / "chapters/06_tools"
SECTIONS = ("pytorch", "tensorflow", "horovod", "nccl", "deepspeed")
# A runnable script announces itself, for the reader and for this test, on its first line.
SCRIPT = re.compile(r"```python\n(# save as (\w+\.py) and run: python \2\n.*?)```", re.S)
CITED_NAME = re.compile(r"`((?:nanopar|torch)(?:\.\w+)+)")


def scripts(stem: str) -> list[tuple[str, str]]:
    """(source, file name) of each runnable script on a section's page."""
    return SCRIPT.findall((CHAPTER / f"{stem}.md").read_text())


def resolve(dotted: str) -> object:
    """The object a dotted name names: the longest importable module, then attributes."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
        return obj
    raise ModuleNotFoundError(dotted)


@pytest.mark.parametrize("stem", SECTIONS)
def test_each_section_has_one_runnable_script_and_ends_with_its_table(stem):
    (source, _), = scripts(stem)
    assert re.search(r"\bassert\b|assert_close", source), "the script must check what it claims"
    text = (CHAPTER / f"{stem}.md").read_text()
    last_section = text.rsplit("\n## ", 1)[1]
    assert last_section.startswith("Where the book shows it\n")
    rows = [line for line in last_section.splitlines() if line.startswith("|")]
    assert rows[0].count("|") == 4 and len(rows) >= 5, "a table: name | the idea | where the book shows it"


@pytest.mark.parametrize("stem", SECTIONS)
def test_the_sections_script_runs_and_its_checks_pass(stem, tmp_path):
    (source, name), = scripts(stem)
    path = tmp_path / name
    path.write_text(source)
    done = subprocess.run([sys.executable, str(path)], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]


def test_every_nanopar_and_torch_name_the_chapter_cites_exists():
    cited = {name for page in CHAPTER.glob("*.md") for name in CITED_NAME.findall(page.read_text())}
    assert {"nanopar.zero.zero_bytes_per_rank", "nanopar.bench.bus_bandwidth"} <= cited
    for name in sorted(cited):
        resolve(name)


def test_resolve_rejects_a_name_that_does_not_exist():
    with pytest.raises(AttributeError):
        resolve("nanopar.zero.zero_bytes_per_parameter")
