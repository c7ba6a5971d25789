"""The layers of docs/architecture.md, checked on the source: backends/ holds no mechanism, no
module reaches into another module's private names from stores/ or locks/, and each piece of
backend plumbing exists once (one URL table, one Lua loader)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src" / "oncely"
MECHANISMS = (
    "oncely.stores",
    "oncely.locks",
    "oncely.functions",
    "oncely.http",
    "oncely.tokens",
    "oncely.sql",
)


def _module_imports(path: Path) -> list[tuple[str, list[str]]]:
    """(module, names) of the imports a module runs when it is imported (not those under
    ``if TYPE_CHECKING:`` nor inside functions)."""
    tree = ast.parse(path.read_text(), str(path))
    found: list[tuple[str, list[str]]] = []
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.module:
            found.append((node.module, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            found.extend((a.name, []) for a in node.names)
    return found


def _files(folder: str) -> list[Path]:
    return sorted((SRC / folder).rglob("*.py"))


@pytest.mark.parametrize("path", _files("backends"), ids=lambda p: p.name)
def test_backends_import_no_mechanism(path: Path) -> None:
    for module, _ in _module_imports(path):
        assert not module.startswith(MECHANISMS), f"{path.name} imports {module}"


@pytest.mark.parametrize("path", _files("core"), ids=lambda p: p.name)
def test_core_imports_no_mechanism_and_no_backend(path: Path) -> None:
    for module, _ in _module_imports(path):
        if module.startswith("oncely"):
            # oncely.settings is a leaf like oncely.errors (standard library only, checked by
            # test_settings_import_only_the_standard_library): core/observe.py reads log_key.
            assert module.startswith(("oncely.core", "oncely.errors", "oncely.settings")), (
                f"core/{path.name} imports {module}"
            )


@pytest.mark.parametrize(
    "path", _files("stores") + _files("locks") + _files("sql"), ids=lambda p: p.name
)
def test_stores_and_locks_use_no_private_name_of_another_module(path: Path) -> None:
    for module, names in _module_imports(path):
        private = [n for n in names if n.startswith("_")]
        assert not (module.startswith("oncely") and private), (
            f"{path.relative_to(SRC)} imports {private} from {module}"
        )


def test_one_url_table_and_one_lua_loader() -> None:
    for path in SRC.rglob("*.py"):
        text = path.read_text()
        name = path.relative_to(SRC).as_posix()
        if name != "backends/lua.py":
            assert "hashlib.sha1" not in text and '"EVALSHA"' not in text, name
        # Backends are loaded by URL scheme in one place; the only other dynamic import
        # is a configuration option naming an object by dotted path (Django settings).
        if name not in ("backends/registry.py", "http/options.py"):
            assert "import_module" not in text or name.startswith("demo/"), name
        if name == "http/options.py":
            assert "://" not in text.replace("redis://localhost", ""), (
                "URL schemes belong in registry"
            )


def test_sql_requests_are_carried_out_only_by_oncely_sql_connections() -> None:
    """``Exec``/``Enter``/``Leave`` requests are dispatched in one place,
    :func:`oncely.sql.connections.run` / ``arun``: a mechanism passes only its own requests
    (``other=``), never a copy of that dispatch."""
    requests = {"Exec", "Enter", "Leave", "ExecLeave"}
    for path in SRC.rglob("*.py"):
        name = path.relative_to(SRC).as_posix()
        if name in ("sql/connections.py", "backends/plans.py"):
            continue
        for node in ast.walk(ast.parse(path.read_text(), name)):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id == "isinstance"
                and len(node.args) == 2
            ):
                kinds = node.args[1]
                names = {
                    n.id for n in ast.walk(kinds) if isinstance(n, ast.Name) and n.id in requests
                }
                assert not names, f"{name}:{node.lineno} dispatches {sorted(names)} itself"
