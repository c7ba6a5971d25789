"""Write one benchmark's section of ``docs/performance.md``, leaving the others alone.

Each section sits between ``<!-- NAME:begin -->`` and ``<!-- NAME:end -->`` markers, so the
benchmarks can be rerun in any order. Hand-written text about a section goes after its end
marker: a rewrite that would drop a heading of the old section refuses (``SystemExit``) instead.
"""

from __future__ import annotations

import re
from pathlib import Path

PERFORMANCE_MD = Path(__file__).resolve().parent.parent / "docs" / "performance.md"


def write_section(name: str, body: str, path: Path = PERFORMANCE_MD) -> None:
    """Replace (or append) the section called ``name`` with ``body`` (markdown, with heading)."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    section = f"{begin}\n{body.strip()}\n{end}"
    current = path.read_text() if path.exists() else "# Performance\n"
    if begin in current and end in current:
        head, rest = current.split(begin, 1)
        old, tail = rest.split(end, 1)
        lost = [h for h in _headings(old) if h not in _headings(body)]
        if lost:
            raise SystemExit(
                f"{path}: rewriting the {name!r} section would drop the heading(s) {lost}; "
                f"move that hand-written text after {end} and run again"
            )
        current = head + section + tail
    else:
        current = current.rstrip() + "\n\n" + section + "\n"
    path.write_text(current)


def _headings(text: str) -> list[str]:
    """The markdown headings of ``text`` with their text (dates and numbers included)."""
    return [line.strip() for line in text.splitlines() if re.match(r"#{1,6} ", line)]
