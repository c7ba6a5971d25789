"""The one rule for user text that a store keeps as text (ids, names, scopes).

Dedup, inbox and outbox message ids, consumer names, record scopes, saga and barrier ids,
state-machine entity ids and keys, lock names: each is bound as SQL text on PostgreSQL, MySQL
and SQLite, or used in a Redis key. Not every store can keep every Python ``str`` exactly:

* a NUL character (``"\\x00"``): PostgreSQL refuses it in ``text``, SQLite's text functions and
  comparisons stop at it (``"a\\x00b"`` was recorded as ``"a"``, and ``"a\\x00c"`` and ``"a"``
  were then taken for duplicates of it);
* a lone surrogate (``"\\ud800"``, from ``surrogateescape`` decoding): it has no UTF-8 form, so
  every driver refuses to send it.

So every mechanism refuses such text with a typed error *before* anything is written, on every
store alike (Redis and memory could keep it, but an id must mean the same on every store):
:func:`stored_text`. Everything else is kept exactly.
"""

from __future__ import annotations

from typing import Final

from oncely.errors import InvalidKey, OncelyError

__all__ = [
    "MAX_SCOPE_BYTES",
    "NUL",
    "literal_bytes",
    "sendable",
    "stored_text",
    "text_problem",
    "utf8",
]

#: The character no store keeps in text.
NUL: Final = "\x00"


def text_problem(text: str) -> str | None:
    """Why ``text`` cannot be kept exactly as text on every store, or None if it can."""
    if NUL in text:
        return (
            "contains a NUL character (\\x00), which stores cannot keep in text (PostgreSQL "
            "refuses it, SQLite cuts the text there)"
        )
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            return "contains a lone surrogate (it has no UTF-8 form, so no driver can send it)"
    return None


#: Longest record scope every store keeps, in UTF-8 bytes: the MySQL store's ``scope`` column is
#: ``VARBINARY(1020)`` (PostgreSQL, SQLite and Redis keep any length). A name that becomes part
#: of a scope (a consumer's name, ``@idempotent(scope=)``, the HTTP namespace, the token scope)
#: is checked against it when its object is built, and :class:`~oncely.core.records.RecordKey`
#: refuses a longer scope made per call before anything is sent.
MAX_SCOPE_BYTES: Final = 1020


def stored_text(
    text: str, what: str, error: type[OncelyError] = InvalidKey, most: int | None = None
) -> str:
    """``text`` itself if every store keeps it exactly, else ``error`` (no I/O).

    :param text: the id, name or scope (already known to be a ``str``).
    :param what: how the message names it, e.g. ``"message id"``.
    :param most: the most UTF-8 bytes every store keeps of it (e.g. :data:`MAX_SCOPE_BYTES`,
        less what the scope adds around the name), if bounded.
    :raises InvalidKey: (or ``error``) ``text`` holds a NUL character or a lone surrogate, or
        is longer than ``most`` bytes.
    """
    problem = text_problem(text)
    if problem is None:
        if most is not None and len(text) * 4 > most and len(text.encode()) > most:
            raise error(
                f"{what} {text[:60]!r}... is {len(text.encode())} bytes in UTF-8; every store "
                f"keeps at most {most} (the MySQL store's scope column holds {MAX_SCOPE_BYTES} "
                "with what oncely adds around it): give a shorter one"
            )
        return text
    raise error(
        f"{what} {text[:60]!r} {problem}; use ids of printable text (a UUID, a number, or the "
        "hex digest of the raw id)"
    )


def sendable(value: object, what: str, error: type[OncelyError] = InvalidKey) -> None:
    """Check a value a store or driver will encode as UTF-8 (a column value, a hash field):
    nothing to do for anything but a ``str``; a ``str`` holding a lone surrogate (no UTF-8
    form, so every driver raises a bare :class:`UnicodeEncodeError`) raises ``error``. No I/O;
    the message names ``what`` and never quotes the value.

    :raises InvalidKey: (or ``error``) a ``str`` with a lone surrogate.
    """
    if isinstance(value, str) and not value.isascii():
        utf8(value, what, error)


def utf8(text: str, what: str, error: type[OncelyError] = InvalidKey) -> bytes:
    """``text`` in UTF-8 (for hashing or signing: a NUL is kept), else ``error`` (no I/O).

    The message names ``what`` but never quotes ``text`` (it may be a secret).

    :raises InvalidKey: (or ``error``) ``text`` holds a lone surrogate, which has no UTF-8 form.
    """
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        raise error(
            f"{what} contains a lone surrogate (it has no UTF-8 form); "
            "pass text that came from valid UTF-8, or bytes"
        ) from None


def literal_bytes(value: str) -> int:
    """Bytes of ``value`` as a quoted, escaped MariaDB/MySQL string literal, as the driver
    sends it (an upper bound): what counts against ``max_allowed_packet``, a statement over
    which the server refuses by closing the connection."""
    return len(value.encode("utf-8")) + sum(value.count(c) for c in "\\'\"\x00\n\r\x1a") + 2
