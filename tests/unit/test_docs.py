"""The README and docs/ render as written: a code fence left open turns the rest of a page into
one code block (docs/export.md's sections after its report excerpt were, from a stray fence)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
PAGES = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_code_fence_is_closed(page: Path) -> None:
    opened = None
    for number, line in enumerate(page.read_text().splitlines(), 1):
        if re.match(r"\s*```", line):
            if opened is None:
                opened = number
            else:
                assert line.strip() == "```", (
                    f"{page.name}:{number} opens a fence inside the one from line {opened}"
                )
                opened = None
    assert opened is None, f"{page.name}:{opened} opens a code fence that is never closed"
