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

from oncely.core.frozen import quick_init

__all__ = [
    "ENTRY_KEY",
    "HandlerEntry",
    "HttpRequest",
    "HttpResponse",
    "IdempotencyInfo",
    "is_json_media_type",
]

Headers = Sequence[tuple[bytes, bytes]]

#: ASGI scope / WSGI environ key of the :class:`HandlerEntry` of a request the middleware runs.
ENTRY_KEY = "oncely.entry"


def is_json_media_type(media_type: bytes) -> bool:
    """``application/json`` or any ``application/*+json`` (RFC 6839 §3.1); ``media_type`` is
    lower-case, without parameters (as :meth:`HttpRequest.content_type` returns it)."""
    return media_type == b"application/json" or (
        media_type.startswith(b"application/") and media_type.endswith(b"+json")
    )


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

    def cookie(self, name: str) -> str | None:
        """The value of cookie ``name`` from the ``Cookie`` header(s) (RFC 6265 §5.4), or None."""
        for key, value in self.headers:
            if key != b"cookie":
                continue
            for pair in value.decode("latin-1").split(";"):
                cookie_name, eq, cookie_value = pair.strip().partition("=")
                if eq and cookie_name == name:
                    return cookie_value.strip().strip('"')
        return None

    def content_type(self) -> bytes:
        """The media type of the body, lower-case and without parameters (b"" if absent)."""
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


@quick_init
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


class HandlerEntry:
    """Whether the application's handler (endpoint or view function) started on a request.

    Stripe saves a result only once the endpoint started executing, so that a request the
    framework refuses *before* the handler runs (routing 404/405, FastAPI request validation,
    Django's CSRF check) does not use up the key: the refusal is sent as it is and the key is
    released, so the client can fix the request and retry with the same key.

    The middleware puts one in ``scope["oncely.entry"]`` / ``environ["oncely.entry"]`` before it
    runs the application; framework integrations call :meth:`started` when the handler begins
    and :meth:`rejected` when the framework refuses the request before it. With
    ``expected=True`` (the integration reports every start: Flask and Django ``install()``) a
    handler that never reported counts as not started; otherwise the request counts as
    handled unless :meth:`rejected` was called. A start wins over a rejection: once the handler
    ran, its effects happened and its response is kept.

    Integrations whose framework turns an exception of the handler into its own 500 page
    (Flask, Django, Litestar) call :meth:`raised`: that 500 is then kept as the documented
    ``handler-failed`` problem, as on faces where the exception reaches the middleware.
    """

    __slots__ = ("_state", "expected", "failed")

    def __init__(self, expected: bool = False) -> None:
        self.expected = expected
        self._state: bool | None = None
        #: The handler raised an exception the framework answers with its generic 500.
        self.failed = False

    def started(self) -> None:
        """The handler begins (it may have effects from now on)."""
        self._state = True

    def rejected(self) -> None:
        """The framework refused the request before its handler ran."""
        if self._state is None:
            self._state = False

    def raised(self) -> None:
        """The handler raised an exception that the framework answers with its own 500 (not
        an HTTP error it raised on purpose): a 500 response is kept as ``handler-failed``."""
        self.failed = True

    @property
    def handled(self) -> bool:
        """True if the handler ran (or nobody says otherwise and no report was expected)."""
        return self._state if self._state is not None else not self.expected

    def __repr__(self) -> str:
        return f"HandlerEntry(expected={self.expected}, state={self._state}, failed={self.failed})"
