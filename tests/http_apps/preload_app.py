"""``server_app``'s WSGI app, with its store used once at import: under ``gunicorn --preload``
the master opens the store's connections before it forks the workers (test_fork_safety.py)."""

from __future__ import annotations

from http_apps.server_app import STORE, wsgi_app

STORE.now()  # opens a pooled connection in the process that will fork

__all__ = ["wsgi_app"]
