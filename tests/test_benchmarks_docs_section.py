"""``benchmarks/docs_section.py``: a benchmark's ``--write-docs`` rewrites only its own section of
``docs/performance.md`` and never drops hand-written text (a rerun once dropped the "HTTP on
SQLite: the writer thread" notes kept inside the generated HTTP section)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
PERFORMANCE_MD = BENCHMARKS.parent / "docs" / "performance.md"


@pytest.fixture
def docs_section() -> Iterator[Any]:
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import docs_section as module

        yield module
    finally:
        sys.path.remove(str(BENCHMARKS))


def test_a_rewrite_replaces_only_its_section(docs_section: Any, tmp_path: Path) -> None:
    page = tmp_path / "performance.md"
    page.write_text(
        "# P\n<!-- a:begin -->\n## A\nold a\n<!-- a:end -->\n### Notes on A\nkept\n"
        "<!-- b:begin -->\n## B\nold b\n<!-- b:end -->\n"
    )
    docs_section.write_section("a", "## A\nnew a", page)
    assert page.read_text() == (
        "# P\n<!-- a:begin -->\n## A\nnew a\n<!-- a:end -->\n### Notes on A\nkept\n"
        "<!-- b:begin -->\n## B\nold b\n<!-- b:end -->\n"
    )


def test_a_rewrite_that_would_drop_a_hand_written_heading_refuses(
    docs_section: Any, tmp_path: Path
) -> None:
    before = "# P\n<!-- a:begin -->\n## A\nold\n### Hand-written notes\ntext\n<!-- a:end -->\n"
    page = tmp_path / "performance.md"
    page.write_text(before)
    with pytest.raises(SystemExit, match="Hand-written notes"):
        docs_section.write_section("a", "## A\nnew", page)
    assert page.read_text() == before


def test_every_generated_section_of_the_docs_can_be_rewritten_by_its_benchmark() -> None:
    """Each section a benchmark writes holds only headings that benchmark's code writes."""
    import re

    page = PERFORMANCE_MD.read_text()
    for path in sorted(BENCHMARKS.glob("*.py")):
        source = path.read_text()
        for name in re.findall(r'write_section\(\s*"([\w-]+)"', source):
            section = page.split(f"<!-- {name}:begin -->", 1)[1].split(f"<!-- {name}:end -->")[0]
            for line in section.splitlines():
                if re.match(r"#{1,6} ", line):
                    title = line.lstrip("#").strip()
                    assert title.split("(")[0].strip()[:20] in source, (path.name, line)
