"""Parsing the ``Idempotency-Key`` request header (an RFC 9651 Structured Field string).

This is the only module that imports ``http-sf`` (the ``oncely[http]`` extra): when a
middleware is built (:func:`require_parser`), never when ``oncely.http`` is imported.

Accepted (draft-ietf-httpapi-idempotency-key-header-06, §2):

* a Structured Field *String* item, e.g. ``Idempotency-Key: "8e03978e-40d5-43e8"``; item
  parameters are not part of the key and are ignored, as RFC 9651 asks of unknown parameters
  (``"abc";x=1`` and ``"abc";x=2`` are both the key ``abc``);
* with ``allow_bare=True`` (the default) also a bare value, because most clients send one:
  any run of the characters ``A-Z a-z 0-9 ! # $ % & ' * + - . ^ _ ` | ~ : / =`` (an sf-token
  such as ``abc123``, a bare UUID), kept exactly as sent. A bare value with ``;`` is refused:
  ``;`` starts parameters, so ``batch;first`` would otherwise be cut to ``batch`` and merged
  with ``batch;second``; such a key must be quoted (``"batch;first"``).

Refused with :class:`~oncely.errors.InvalidKey`: an empty key, a key longer than
``max_length`` characters (255 by default, as Stripe), anything outside printable ASCII,
several header lines or list members, and any other Structured Field type (integer, byte
sequence, …) unless it reads as a bare value.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

from oncely.errors import ConfigurationError, InvalidKey

__all__ = ["parse_key", "require_parser"]

_BARE = re.compile(rb"[A-Za-z0-9!#$%&'*+\-.^_`|~:/=]+")
#: A Structured Field String with nothing to unescape and no parameters (RFC 9651 §3.3.3:
#: ``unescaped = %x20-21 / %x23-5B / %x5D-7E``): what http-sf would return is the text between
#: the quotes, so the common case skips the general parser.
_PLAIN_STRING = re.compile(rb'"[\x20\x21\x23-\x5b\x5d-\x7e]*"')
_parse: Callable[..., Any] | None = None


def require_parser() -> Callable[..., Any]:
    """Import ``http-sf`` (once); called when a middleware is built.

    :raises ConfigurationError: ``http-sf`` is not installed (with the install line).
    """
    global _parse
    if _parse is None:
        try:
            import http_sf
        except ImportError as exc:
            raise ConfigurationError(
                "the HTTP middleware parses Idempotency-Key with http-sf, which is not "
                "installed; install it with: pip install 'oncely[http]'"
            ) from exc
        _parse = http_sf.parse
    return _parse


def parse_key(values: Sequence[bytes], *, allow_bare: bool = True, max_length: int = 255) -> str:
    """The idempotency key carried by the header lines ``values`` (at least one)."""
    raw = values[0] if len(values) == 1 else b", ".join(values)
    key: str | None = None
    if _PLAIN_STRING.fullmatch(raw):
        value: Any = raw[1:-1].decode("ascii")
    else:
        parse = require_parser()
        try:
            value, _params = parse(raw, tltype="item")
        except Exception:  # http_sf raises StructuredFieldError (a ValueError); be defensive
            value = None
    if isinstance(value, str):
        key = value
    elif allow_bare:
        # The text as sent, never what the Structured Field parser made of it: it reads
        # ``batch;first`` as the token ``batch`` with a parameter, which would merge the
        # client's keys ``batch;first`` and ``batch;second`` into one.
        bare = raw.strip(b" \t")
        if _BARE.fullmatch(bare):
            key = bare.decode("ascii")
    if key is None:
        if not raw.strip(b" \t"):
            raise InvalidKey(
                "the Idempotency-Key header is empty; send a unique value, e.g. a UUID"
            )
        if allow_bare and b";" in raw and not raw.lstrip(b" \t").startswith(b'"'):
            raise InvalidKey(
                "the Idempotency-Key header holds a ';', which starts Structured Field "
                "parameters (not part of the key); send a key with ';' quoted, e.g. "
                "Idempotency-Key: \"a;b\", or send a key without ';'"
            )
        how = "a quoted string or a bare token" if allow_bare else 'a quoted string, e.g. "a1b2"'
        raise InvalidKey(
            "the Idempotency-Key header is not a valid Structured Field string: send one value, "
            f"{how}, of printable ASCII characters"
        )
    if not key:
        raise InvalidKey("the Idempotency-Key is empty; send a unique value, e.g. a UUID")
    if len(key) > max_length:
        raise InvalidKey(
            f"the Idempotency-Key has {len(key)} characters; at most {max_length} are allowed"
        )
    return key
