"""The README quotes measured numbers only from the pages that measured them: every such number in
a paragraph stands, as written, on a page that paragraph links to (docs/*.md, each made by the
command it names). A number typed by hand and later re-measured on its page shows up here."""

from __future__ import annotations

import re
from pathlib import Path

from .conftest import ROOT

# a measured figure: a decimal with two or more places (0.1792), a decimal percentage (44.6 %), a
# ratio (1.50×), a duration in ms or min (109 ms, 4 min); not a setting (k = 32, 0.9, ±15 %, every 30 s)
MEASURED = re.compile(r"(?<![\w.\-/=`])(\d+\.\d{2,}|\d+\.\d+\s?%|\d+(?:\.\d+)?×|\d+(?:\.\d+)?\s?(?:ms|min)\b)(?![\w`])")
LINK = re.compile(r"\]\((docs/[^)#\s]+\.md)")


def paragraphs(text: str) -> list[str]:
    """Blocks between blank lines, code blocks left out (commands, not claims)."""
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    return [p for p in re.split(r"\n\s*\n", text) if p.strip()]


def squeeze(text: str) -> str:
    return re.sub(r"\s+(ms|min)\b", r"\1", re.sub(r"\s+(%|×)", r"\1", text))


def unsourced(readme: str, root: Path = ROOT) -> list[str]:
    """Every measured number of ``readme`` not found on a page its paragraph links to, with the
    paragraph's start (empty: all sourced)."""
    problems = []
    for para in paragraphs(readme):
        found = [squeeze(m.group(1)) for m in MEASURED.finditer(para)]
        if not found:
            continue
        pages = sorted(set(LINK.findall(para)))
        source = squeeze(" ".join((root / page).read_text() for page in pages if (root / page).is_file()))
        missing = [n for n in found if n not in source]
        if missing:
            where = " ".join(para.split())[:80]
            problems.append(f"{', '.join(missing)} in «{where}…» (not on {', '.join(pages) or 'a linked page'})")
    return problems


def test_every_measured_number_in_the_readme_is_on_a_page_it_links():
    problems = unsourced((ROOT / "README.md").read_text())
    assert not problems, "\n".join(problems)


def test_the_check_fails_on_a_changed_number_and_an_unlinked_one():
    readme = (ROOT / "README.md").read_text()
    quoted = [m.group(1) for p in paragraphs(readme) if LINK.search(p) for m in MEASURED.finditer(p)]
    assert len(quoted) >= 20, quoted  # the README does quote measurements: the check has work to do
    figure = next(q for q in quoted if re.fullmatch(r"\d+\.\d{4}", q))
    # its last digit changed to one that no page holds (a page may hold the neighbour by chance)
    pages = " ".join(page.read_text() for page in (ROOT / "docs").glob("*.md"))
    typo = next(t for t in (f"{figure[:-1]}{(int(figure[-1]) + i) % 10}" for i in range(1, 10)) if t not in pages)
    changed = readme.replace(figure, typo, 1)
    assert changed != readme and any(typo in p for p in unsourced(changed))
    assert unsourced("A figure typed by hand: FVU 0.1234 at 12.5 % of the cost.\n") == [
        "0.1234, 12.5% in «A figure typed by hand: FVU 0.1234 at 12.5 % of the cost.…» (not on a linked page)"
    ]
