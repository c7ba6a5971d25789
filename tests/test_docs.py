"""Every ``python`` block in the README and the guides runs, and module doctests pass."""

from __future__ import annotations

import doctest
import re
import sys
import types
from pathlib import Path

import pytest

import oncely.functions.decorator
import oncely.settings

ROOT = Path(__file__).resolve().parent.parent
# Blocks fenced as ```python run (in a temporary directory); ```py blocks are shown, not run.
DOCS = [
    ROOT / "README.md",
    *(
        ROOT / "docs" / f
        for f in (
            "decorator.md",
            "locks.md",
            "http.md",
            "settings.md",
            "sql.md",
            "optimistic.md",
            "statemachine.md",
            "messaging.md",
        )
    ),
]


def blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.DOTALL)


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.name)
def test_python_blocks_run(path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    found = blocks(path)
    assert found, f"{path} has no python examples"
    for index, code in enumerate(found):
        # A real module, so dataclasses and pickling can find the example's classes.
        module = types.ModuleType(f"docs_example_{index}")
        sys.modules[module.__name__] = module
        try:
            exec(compile(code, str(path), "exec"), module.__dict__)
        finally:
            del sys.modules[module.__name__]


@pytest.mark.parametrize("module", [oncely.functions.decorator, oncely.settings])
def test_module_doctests(module: types.ModuleType) -> None:
    result = doctest.testmod(module)
    assert result.attempted > 0 and result.failed == 0


#: Docs whose every example runs again, as written, in the directory of its first run (a user
#: runs an example twice): an example that writes a SQLite file starts from a fresh one.
RERUNNABLE = [path for path in DOCS if path.name in ("statemachine.md",)]


@pytest.mark.parametrize("path", RERUNNABLE, ids=lambda p: p.name)
def test_python_blocks_run_twice(
    path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    for index, code in enumerate(blocks(path)):
        for run in range(2):
            module = types.ModuleType(f"docs_example_{index}_{run}")
            sys.modules[module.__name__] = module
            try:
                where = f"{path} example {index} run {run + 1}"
                exec(compile(code, where, "exec"), module.__dict__)
            finally:
                del sys.modules[module.__name__]
