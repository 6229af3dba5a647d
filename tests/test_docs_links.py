"""Every relative link in README.md and docs/*.md reaches a file, and its #anchor a heading.

Anchors follow GitHub's rule: the heading in lower case, punctuation other than `-`
and `_` dropped, spaces turned into `-`, a repeated heading suffixed `-1`, `-2`...
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)


def slug(heading: str) -> str:
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", ""))
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for line in FENCE.sub("", page.read_text()).splitlines():
        match = re.match(r"^#{1,6} (.+)$", line)
        if match:
            base = slug(match.group(1))
            n = seen.get(base, 0)
            seen[base] = n + 1
            out.add(base if n == 0 else f"{base}-{n}")
    return out


def links(page: Path) -> list[str]:
    return [m.group(1) for m in LINK.finditer(FENCE.sub("", page.read_text()))
            if not re.match(r"^[a-z]+:", m.group(1))]  # http:, https:, mailto:


def broken(page: Path) -> list[str]:
    out = []
    for target in links(page):
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            out.append(f"{target}: no such file")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            out.append(f"{target}: no heading #{anchor} in {file.name}")
    return out


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve(page):
    assert links(page) or page.name != "README.md"
    assert not broken(page), broken(page)


def test_every_docs_page_is_linked_from_the_readme():
    readme = set(links(REPO / "README.md"))
    assert not [p.name for p in PAGES[1:] if f"docs/{p.name}" not in readme]


def test_the_checker_catches_a_broken_file_and_anchor(tmp_path):
    (tmp_path / "a.md").write_text("# Top\n## Two words (`x`)\n```\n# not a heading\n```\n")
    page = tmp_path / "b.md"
    page.write_text("[ok](a.md#two-words-x) [bad](a.md#not-a-heading) [gone](c.md) "
                    "[web](https://example.com) [self](#missing)\n# B\n")
    assert broken(page) == ["a.md#not-a-heading: no heading #not-a-heading in a.md",
                            "c.md: no such file", "#missing: no heading #missing in b.md"]
