"""After ``fork()``: a child never uses, closes or finishes what its parent opened.

A process forked while a store or lock backend has connections open (Gunicorn ``--preload``,
``multiprocessing`` with the fork start method, Celery's prefork pool) inherits them: the same
sockets in two processes. Statements from both interleave on one connection, so one process
reads the other's reply (a claim answered with someone else's fence, a result read as another
call's), and SQLite forbids carrying a connection across ``fork()`` at all
(https://sqlite.org/howtocorrupt.html §2.6). Threads do not survive a fork either: pool
workers and the renewal scheduler are gone in the child, and a ``threading.Lock`` another
thread held at the fork stays locked forever there.

So each object that holds connections, pools, worker threads or locks registers a reset with
:func:`after_fork`. In the child, ``os.register_at_fork`` runs every reset before any other
code: it hands the parent's connections and pools to :func:`inherit` (kept referenced for the
child's lifetime, so garbage collection never closes or finishes them from the child: closing
a SQLite connection, or sending PostgreSQL's Terminate message, would hurt the parent) and
makes fresh locks; connections and threads are opened again lazily, on first use. The renewal
scheduler (:mod:`oncely.core.renewal`) resets itself the same way and starts its threads again
when the child's first lease needs renewing.
"""

from __future__ import annotations

import logging
import os
import weakref
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["after_fork", "inherit", "inherited_count"]

log = logging.getLogger("oncely")

T = TypeVar("T")

#: (weak reference to an owner, its reset); owners that died are skipped and pruned.
_resets: list[tuple[weakref.ref[Any], Callable[[Any], None]]] = []
#: What this process inherited from its parent at a fork: never closed, never used.
_inherited: list[Any] = []


def after_fork(owner: T, reset: Callable[[T], None]) -> None:
    """Run ``reset(owner)`` in every child forked later, for as long as ``owner`` lives.

    ``reset`` runs first thing in the child (one thread, no other code yet): it must only drop
    references (through :func:`inherit`) and make new locks, never do I/O.
    """
    global _resets
    if len(_resets) > 64 and len(_resets) & (len(_resets) - 1) == 0:  # now and then: prune
        _resets = [entry for entry in _resets if entry[0]() is not None]
    _resets.append((weakref.ref(owner), reset))  # list.append is atomic under the GIL


def inherit(*things: Any) -> None:
    """Keep ``things`` (the parent's connections, pools, executors) referenced for the rest of
    this process, so the child never closes or finishes them. Call it from a reset only."""
    _inherited.extend(thing for thing in things if thing is not None)


def inherited_count() -> int:
    """How many objects this process inherited from its parent (for tests and diagnostics)."""
    return len(_inherited)


def _in_child() -> None:
    live = []
    for entry in _resets:
        owner = entry[0]()
        if owner is None:
            continue
        try:
            entry[1](owner)
        except BaseException:  # a reset must not stop the others (or the child)
            log.exception("oncely: resetting %r after fork() failed", owner)
        live.append(entry)
    _resets[:] = live


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_in_child)
