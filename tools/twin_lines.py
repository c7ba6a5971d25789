"""Count the lines of sync/async twins: functions written once per face.

A twin pair is a function ``name`` and, in the same class or module, a function ``aname``
(``_run`` / ``_arun``, ``claim`` / ``aclaim``, ``wait_release`` / ``await_release``) where at least
one of the two is ``async def``. The count is the lines both definitions span (signature, body
and docstring), so a pair of one-line delegations counts 2 x 2-3 lines and a pair of hand-written
copies counts all their lines. A pair is *thin* when each body is one statement (a docstring
aside, and an abstract ``...`` counts as one): a delegation such as
``return run(self._claim(...), self._execute)``; the others are *written twice*.

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


def _thin(node: Func) -> bool:
    body = list(node.body)
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]  # the docstring
    return len(body) <= 1


def twins(path: pathlib.Path) -> list[tuple[str, int, int, bool]]:
    """(name, sync lines, async lines, thin) of every twin pair in ``path``."""
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
            out.append((prefix + name, _span(node), _span(twin), _thin(node) and _thin(twin)))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="*", default=["src/oncely"])
    parser.add_argument("--detail", action="store_true", help="one line per pair")
    args = parser.parse_args()
    grand = twice = 0
    print(" lines  written twice  pairs  file")
    for root in map(pathlib.Path, args.paths):
        files = sorted(root.rglob("*.py")) if root.is_dir() else [root]
        for path in files:
            pairs = twins(path)
            lines = sum(s + a for _, s, a, _ in pairs)
            doubled = sum(s + a for _, s, a, thin in pairs if not thin)
            grand, twice = grand + lines, twice + doubled
            if pairs and args.detail:
                for name, s, a, thin in pairs:
                    print(f"    {path}:{name}  {s} + {a}{'  thin' if thin else ''}")
            if pairs:
                print(f"{lines:6d}  {doubled:13d}  {len(pairs):5d}  {path}")
    print(f"{grand:6d}  {twice:13d}         total")
    return 0


if __name__ == "__main__":
    sys.exit(main())
