"""Count the lines of sync/async twins: functions written once per face.

A twin pair is a function ``name`` and, in the same class or module, a function ``aname``
(``_run`` / ``_arun``, ``claim`` / ``aclaim``, ``wait_release`` / ``await_release``) where at least
one of the two is ``async def``. The count is the lines both definitions span (signature, body
and docstring), so a pair of one-line delegations counts 2 x 2-3 lines and a pair of hand-written
copies counts all their lines.

    python tools/twin_lines.py [--detail] [PATH ...]   (default: src/oncely)
"""

from __future__ import annotations

import argparse
import ast
import pathlib
import sys

Func = ast.FunctionDef | ast.AsyncFunctionDef


def _async_name(name: str) -> str:
    stripped = name.lstrip("_")
    return name[: len(name) - len(stripped)] + "a" + stripped


def _span(node: Func) -> int:
    first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
    return (node.end_lineno or node.lineno) - first + 1


def _scopes(tree: ast.Module) -> list[tuple[str, list[ast.stmt]]]:
    scopes: list[tuple[str, list[ast.stmt]]] = [("", tree.body)]
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef):
            scopes.append((node.name + ".", node.body))
    return scopes


def twins(path: pathlib.Path) -> list[tuple[str, int, int]]:
    """(name, sync lines, async lines) of every twin pair in ``path``."""
    tree = ast.parse(path.read_text(), str(path))
    out = []
    for prefix, body in _scopes(tree):
        funcs = {n.name: n for n in body if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)}
        for name, node in funcs.items():
            twin = funcs.get(_async_name(name))
            if twin is None or twin is node:
                continue
            if not (
                isinstance(twin, ast.AsyncFunctionDef) or isinstance(node, ast.AsyncFunctionDef)
            ):
                continue
            out.append((prefix + name, _span(node), _span(twin)))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="*", default=["src/oncely"])
    parser.add_argument("--detail", action="store_true", help="one line per pair")
    args = parser.parse_args()
    grand = 0
    for root in map(pathlib.Path, args.paths):
        files = sorted(root.rglob("*.py")) if root.is_dir() else [root]
        for path in files:
            pairs = twins(path)
            lines = sum(s + a for _, s, a in pairs)
            grand += lines
            if pairs and args.detail:
                for name, s, a in pairs:
                    print(f"  {path}:{name}  {s} + {a}")
            if pairs:
                print(f"{lines:6d}  {len(pairs):3d} pairs  {path}")
    print(f"{grand:6d}  total twin lines")
    return 0


if __name__ == "__main__":
    sys.exit(main())
