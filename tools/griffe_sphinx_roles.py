"""Griffe extension for the reference: oncely's docstrings use Sphinx roles (``:class:`X```,
``:meth:`~a.b``, ``:func:``, ``:exc:``, ``:mod:``, ``:data:``, ``:attr:``); mkdocstrings
renders Markdown, so each role becomes an optional cross-reference (a link where the reference
page shows the object, code otherwise) when it names an oncely object, and code otherwise.

A role that names ``oncely…`` (or an unqualified name) that does not exist is reported as a
warning, which ``mkdocs build --strict`` turns into a failed build: a docstring cannot keep
pointing at a name that was renamed or removed.
"""

from __future__ import annotations

import builtins
import logging
import re
from typing import Any

import griffe

log = logging.getLogger("mkdocs.plugins.oncely_roles")

ROLE = re.compile(r":(?:py:)?(class|meth|func|exc|mod|data|attr|obj):`(~?)([^`<>]+?)`")


def _exists(pkg: griffe.Module, path: str) -> bool:
    if not path.startswith(pkg.path + ".") and path != pkg.path:
        return False
    try:
        pkg.modules_collection.get_member(path)
    except (KeyError, ValueError, griffe.AliasResolutionError, griffe.CyclicAliasError):
        return False
    return True


def _candidates(obj: griffe.Object, name: str, root: str) -> list[str]:
    """Where an unqualified name may live: the object's class, its module, then the package."""
    found = [name] if name.startswith(root) else []
    scope: griffe.Object | None = obj
    while scope is not None:
        found.append(f"{scope.path}.{name}")
        scope = scope.parent
    return found


class SphinxRoles(griffe.Extension):
    """Rewrite Sphinx roles in every docstring of the package once it is loaded."""

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        self._walk(pkg, pkg, set())

    def _walk(self, pkg: griffe.Module, obj: griffe.Object, seen: set[str]) -> None:
        if obj.path in seen:
            return
        seen.add(obj.path)
        if obj.docstring is not None:
            obj.docstring.value = ROLE.sub(lambda m: self._role(pkg, obj, m), obj.docstring.value)
        for member in obj.members.values():
            if not member.is_alias:
                self._walk(pkg, member, seen)  # type: ignore[arg-type]

    def _role(self, pkg: griffe.Module, obj: griffe.Object, match: re.Match[str]) -> str:
        _, short, target = match.groups()
        target = target.strip().removesuffix("()")
        shown = target.rsplit(".", 1)[-1] if short else target
        local = target.split(".", 1)[0]
        if target.startswith(pkg.path) or "." not in target or local[:1].isupper():
            for path in _candidates(obj, target, pkg.path):
                if _exists(pkg, path):
                    # optional: a link where the reference renders the object, else plain code
                    return f'<autoref identifier="{path}" optional><code>{shown}</code></autoref>'
            if target.startswith(pkg.path) or not hasattr(builtins, local):
                log.warning("%s: docstring names %r, which does not exist", obj.path, target)
        return f"`{shown}`"
