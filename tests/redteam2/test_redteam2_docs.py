"""Red-team findings (redteam2) on the docs: the ```python examples of docs/sql.md,
docs/optimistic.md and docs/messaging-inbox.md, run as a reader runs them, in one working
directory (they share shop.db) and twice (a reader runs an example again)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parents[2] / "docs"


def _blocks(page: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", (DOCS / page).read_text(), re.S)


def _run(code: str, cwd: Path, name: str) -> subprocess.CompletedProcess[str]:
    """Run ``code`` as a reader does: saved as ``<name>.py`` and run as a script (its default
    operation names come from the file's name; ``python -c`` has none and must name them)."""
    script = cwd / f"{name}.py"
    script.write_text(code)
    return subprocess.run(
        [sys.executable, script.name], cwd=cwd, capture_output=True, text=True, timeout=60
    )


def test_doc_examples_run_in_one_directory(tmp_path: Path) -> None:
    failures = []
    for page in ["sql.md", "optimistic.md", "messaging-inbox.md"]:
        for i, code in enumerate(_blocks(page)):
            done = _run(code, tmp_path, f"{page.removesuffix('.md').replace('-', '_')}_{i}")
            if done.returncode:
                failures.append((page, i, done.stderr.strip().splitlines()[-1]))
    assert failures == []


def test_sql_doc_examples_run_twice(tmp_path: Path) -> None:
    failures = []
    for i, code in enumerate(_blocks("sql.md")):
        for attempt in (1, 2):
            done = _run(code, tmp_path, f"sql_{i}")
            if done.returncode:
                failures.append((i, attempt, done.stderr.strip().splitlines()[-1]))
    assert failures == []
