"""The framework-neutral request and response the HTTP flow works on.

Adapters build an :class:`HttpRequest` from an ASGI scope or a WSGI environ; header names are
lower-case bytes and values raw bytes, exactly as they came off the wire. User callables
(``scope=``, ``fingerprint=``, token ``subject=``) receive it; ``raw`` is the ASGI scope or the
WSGI environ for anything framework-specific (``scope["state"]``, ``environ["REMOTE_USER"]``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["HttpRequest", "HttpResponse", "IdempotencyInfo"]

Headers = Sequence[tuple[bytes, bytes]]


@dataclass(slots=True)
class HttpRequest:
    """One request as the middleware sees it, before the application runs."""

    method: str
    path: str
    query: bytes
    headers: Headers
    raw: Any = None

    def header_values(self, name: bytes) -> list[bytes]:
        """Every value of header ``name`` (lower-case bytes), in order."""
        return [value for key, value in self.headers if key == name]

    def header(self, name: str) -> str | None:
        """The first value of header ``name`` as text (Latin-1, as HTTP defines), or None."""
        wanted = name.lower().encode("latin-1")
        for key, value in self.headers:
            if key == wanted:
                return value.decode("latin-1")
        return None

    def content_length(self) -> int | None:
        """The declared body length; None if absent; -1 if not a valid number."""
        for key, value in self.headers:
            if key == b"content-length":
                text = value.strip()
                return int(text) if text.isdigit() and len(text) < 19 else -1
        return None

    def content_type(self) -> bytes:
        for key, value in self.headers:
            if key == b"content-type":
                return value.split(b";", 1)[0].strip().lower()
        return b""


@dataclass(slots=True)
class HttpResponse:
    """A complete response: a problem, a replay, or what a handler sent (as captured)."""

    status: int
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytes = b""


@dataclass(frozen=True, slots=True)
class IdempotencyInfo:
    """What a handler behind the middleware can learn about the request it serves.

    Found in ``scope["oncely.idempotency"]`` (ASGI) or ``environ["oncely.idempotency"]`` (WSGI),
    and through the framework helpers. ``fence`` grows with every claim of the key: pass it to
    writes that must reject a stale holder.
    """

    key: str | None
    scope: str
    fence: int | None
    token_purpose: str | None = None
