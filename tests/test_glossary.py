"""Each glossary term links to the glossary from its first use in each chapter's prose.

A chapter's prose is its pages in the order of `_toc.yml`: the overview, the section pages and
the notebooks' markdown cells. Headings, code, math, HTML and the text of other links and roles
are not prose here (a term link cannot go there).
"""
import json
import pathlib
import re

import pytest
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[1]
HIDDEN = "\0"  # what masking leaves: same length, so positions still point into the source

PROSE_DIRECTIVES = ("note", "tip", "warning", "important", "admonition", "figure", "dropdown")
_MASKS = [
    re.compile(r"^ {0,3}#+ .*$", re.M),             # headings
    re.compile(r"^ {0,3}<.*?(?:\n[ \t]*\n|\Z)", re.S | re.M),  # HTML blocks (calculators)
    re.compile(r"^\(.*\)=[ \t]*$|^%.*$|^:[\w-]+:.*$", re.M),   # labels, comments, directive options
    re.compile(r"\$\$.*?\$\$|\$[^$\n]+\$", re.S),   # math
    re.compile(r"\{[\w:-]+\}`[^`]*`"),              # roles: {term}, {ref}, {glue:text}, {cite:p}, ...
    re.compile(r"`[^`\n]+`"),                       # inline code
    re.compile(r"\[[^\]\n]*\]\([^)\n]*\)|<https?://[^>\s]+>"),  # links
]
_TERM_ROLE = re.compile(r"\{term\}`(?:[^`<]*<([^>`]+)>|([^`]+))`")


def glossary_terms() -> list[str]:
    """The English names of book/glossary.md's entries (each entry also has a Chinese name)."""
    text = (ROOT / "book/glossary.md").read_text()
    return [line.strip() for block in re.findall(r"```\{glossary\}\n(.*?)```", text, re.S)
            for line in block.splitlines()
            if line.strip() and not line.startswith(" ") and not re.search(r"[\u4e00-\u9fff]", line)]


def chapter_pages() -> dict[str, list[str]]:
    """Each chapter's pages (without suffix), in the order of the table of contents."""
    def below(node):
        for s in node.get("sections", []):
            yield s["file"]
            yield from below(s)
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    return {ch["file"]: [ch["file"], *below(ch)] for part in toc["parts"] for ch in part["chapters"]
            if ch["file"].startswith("chapters/")}


def prose_segments(page: str) -> list[tuple[int | None, str]]:
    """(markdown cell index or None for a .md page, source text) of one page."""
    md = ROOT / f"{page}.md"
    if md.exists():
        return [(None, md.read_text())]
    cells = json.loads((ROOT / f"{page}.ipynb").read_text())["cells"]
    return [(i, "".join(c["source"])) for i, c in enumerate(cells) if c["cell_type"] == "markdown"]


def mask(text: str) -> tuple[str, list[tuple[int, str]]]:
    """The prose with everything else hidden, and the (position, target) of each term link."""
    links = [(m.start(), (m.group(1) or m.group(2)).strip().lower()) for m in _TERM_ROLE.finditer(text)]
    text = _mask_fences(text)
    for pattern in _MASKS:
        text = pattern.sub(lambda m: re.sub(r"[^\n]", HIDDEN, m.group(0)), text)
    return text, links


def _mask_fences(text: str) -> str:
    """Hide code, math and raw blocks and the fence lines; keep the content of prose directives."""
    out, open_fences = [], []  # (fence, hides its content), outermost first
    for line in text.split("\n"):
        fence = re.match(r" {0,3}(`{3,}|~{3,}|:{3,})(.*)$", line)
        hide = any(h for _, h in open_fences)
        if fence and open_fences and not fence.group(2).strip() and fence.group(1).startswith(open_fences[-1][0]):
            open_fences.pop()
            hide = True
        elif fence and not hide:
            name = re.match(r"\{([\w-]+)\}", fence.group(2).strip())
            open_fences.append((fence.group(1), not (name and name.group(1) in PROSE_DIRECTIVES)))
            hide = True
        out.append(HIDDEN * len(line) if hide else line)
    return "\n".join(out)


def term_pattern(term: str) -> re.Pattern:
    """The term and its plural as a word; lower-case terms in any case. "stage" is a pipeline's,
    not ZeRO's ("ZeRO stage 3", "stages 1, 2, 3")."""
    flags = re.I if term[0].islower() else 0
    pattern = r"(?<![\w-])" + re.escape(term) + r"(?:e?s)?(?![\w-])"
    if term == "stage":
        pattern = r"(?<!ZeRO )(?<!zero )" + pattern + r"(?! \d)"
    return re.compile(pattern, flags)


def unlinked_first_uses() -> list[tuple[str, str, int | None, int, str]]:
    """(chapter, page, cell, position, term) of every term whose first use in a chapter is not a link."""
    found = []
    terms = glossary_terms()
    for chapter, pages in chapter_pages().items():
        uses = {}  # term -> (order, linked, page, cell, position, text)
        for order, (page, cell, text) in enumerate((p, c, t) for p in pages for c, t in prose_segments(p)):
            prose, links = mask(text)
            for term in terms:
                if term in uses:
                    continue
                plain = term_pattern(term).search(prose)
                link = next((pos for pos, target in links if target == term.lower()), None)
                if link is not None and (plain is None or link < plain.start()):
                    uses[term] = True
                elif plain is not None:
                    uses[term] = False
                    found.append((chapter, page, cell, plain.start(), plain.group(0)))
    return found


def test_the_glossary_has_its_terms():
    terms = glossary_terms()
    assert len(terms) > 40 and {"all-reduce", "ZeRO", "pipeline parallelism", "bubble"} <= set(terms)


def test_masking_keeps_prose_and_hides_the_rest():
    text = "# Data parallelism\nA {term}`rank <rank>` and `gloo` with $N$ ranks,\n```python\nbubble\n```\nthe bubble."
    prose, links = mask(text)
    assert len(prose) == len(text) and links == [(text.index("{term}"), "rank")]
    assert "Data parallelism" not in prose and "gloo" not in prose and "the bubble." in prose
    assert prose.count("bubble") == 1 and "ranks," in prose
    prose, _ = mask("```\ntorchrun --standalone\n```\n```{note}\nA torchrun job.\n```\n")
    assert prose.count("torchrun") == 1 and "A torchrun job." in prose
    assert term_pattern("stage").search("ZeRO stage 3 and stages 1, 2, 3") is None
    assert term_pattern("stage").search("two stages of a pipeline")


@pytest.mark.parametrize("chapter", sorted(chapter_pages()), ids=lambda c: c.split("/")[1])
def test_each_term_links_to_the_glossary_from_its_first_use_in_the_chapter(chapter):
    missing = [f"{page}{'' if cell is None else f' cell {cell}'}: {word!r}"
               for ch, page, cell, _, word in unlinked_first_uses() if ch == chapter]
    assert not missing, "first uses without {term}`...`:\n" + "\n".join(missing)
