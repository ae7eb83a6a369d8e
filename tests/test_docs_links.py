"""Every relative link in the README and the guides points to a file that exists, and every ``#anchor`` to a
heading of that file (GitHub's heading slugs), so a reader following the docs never lands on nothing."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")
FENCE = re.compile(r"^(```|~~~)")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped (word characters, spaces and hyphens
    kept), spaces as hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def prose_lines(path: Path) -> list[str]:
    """A markdown file's lines outside fenced code blocks (fence lines dropped)."""
    out, in_code = [], False
    for line in path.read_text(encoding="utf-8").splitlines():
        if FENCE.match(line):
            in_code = not in_code
        elif not in_code:
            out.append(line)
    return out


def anchors(path: Path) -> set[str]:
    """The anchors of a markdown file's headings (outside code blocks); repeats get ``-1``, ``-2``, ..."""
    seen: Counter[str] = Counter()
    found = set()
    for line in prose_lines(path):
        if line.startswith("#"):
            base = slug(line.lstrip("#"))
            found.add(base if seen[base] == 0 else f"{base}-{seen[base]}")
            seen[base] += 1
    return found


def links(path: Path) -> list[str]:
    """The link targets of a markdown file, outside code blocks."""
    return [target for line in prose_lines(path) for target in LINK.findall(line)]


def test_slug_follows_github():
    assert slug(" 2026-12-01 (fourth session): photos: the empty mask (issue 10)") == (
        "2026-12-01-fourth-session-photos-the-empty-mask-issue-10"
    )
    assert slug("What to expect: 50 ImageNet samples, `fast` (x ↓)") == "what-to-expect-50-imagenet-samples-fast-x-"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_relative_links_and_anchors_resolve(doc):
    broken = []
    for target in links(doc):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        file = (doc.parent / file_part).resolve() if file_part else doc
        if not file.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            broken.append(f"{target} (no such heading)")
    assert not broken, f"{doc.relative_to(ROOT)}: " + "; ".join(broken)
