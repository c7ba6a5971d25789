"""Write one benchmark's section of ``docs/performance.md``, leaving the others alone.

Each section sits between ``<!-- NAME:begin -->`` and ``<!-- NAME:end -->`` markers, so the
benchmarks can be rerun in any order.
"""

from __future__ import annotations

from pathlib import Path

PERFORMANCE_MD = Path(__file__).resolve().parent.parent / "docs" / "performance.md"


def write_section(name: str, body: str, path: Path = PERFORMANCE_MD) -> None:
    """Replace (or append) the section called ``name`` with ``body`` (markdown, with heading)."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    section = f"{begin}\n{body.strip()}\n{end}"
    current = path.read_text() if path.exists() else "# Performance\n"
    if begin in current and end in current:
        head, rest = current.split(begin, 1)
        current = head + section + rest.split(end, 1)[1]
    else:
        current = current.rstrip() + "\n\n" + section + "\n"
    path.write_text(current)
