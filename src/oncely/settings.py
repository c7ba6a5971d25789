"""Settings: every plain-valued option of oncely, and the one rule that decides its value.

**Precedence** (the same for every option): a value given in code (an argument that is not
``None``) wins; else the environment variable ``ONCELY_<NAME>`` (empty counts as unset); else
the built-in default. The value is parsed and checked when the object that uses it is built
(``@idempotent`` when it decorates, :class:`~oncely.http.IdempotencyConfig`,
:class:`~oncely.tokens.Tokens` and :class:`~oncely.locks.Lock` in their constructors), so a
wrong setting stops the program at start-up with a :class:`~oncely.errors.ConfigurationError`
that names the setting, where the value came from and what would be valid.

>>> from oncely.settings import resolve
>>> resolve("ttl", "24h")
86400.0
>>> resolve("ttl", environ={"ONCELY_TTL": "5m"})
300.0
>>> resolve("ttl", environ={})
86400.0

Value syntax, the same in code, in the environment and in framework settings:

* **durations** are seconds: a number (``30``, ``1.5``) or a number with one unit, ``ms``,
  ``s``, ``m`` (minutes), ``h`` or ``d`` (``500ms``, ``30s``, ``5m``, ``24h``, ``1d``); in
  code also a :class:`datetime.timedelta`;
* **sizes** are bytes: a whole number, or one with ``kB``/``MB``/``GB`` (powers of 1000) or
  ``KiB``/``MiB``/``GiB`` (powers of 1024), e.g. ``1MiB``;
* **booleans** in the environment: ``1``/``true``/``yes``/``on`` or ``0``/``false``/``no``/
  ``off`` (any case); in code, ``True``/``False`` only;
* **lists** in the environment are comma-separated (``POST,PATCH``); in code, a list or tuple.

Every ``ONCELY_*`` variable is checked the first time oncely reads its settings (and again
whenever the ``ONCELY_*`` part of the environment changed): a known one with a bad value raises
:class:`~oncely.errors.ConfigurationError`, an unknown name warns
(:class:`~oncely.errors.SettingWarning`) with the closest known name. Options that are code
(callables, classes, codecs, ``key=``/``scope=``/``name=``) and a lock's URL and name are not
read from the environment. ``docs/settings.md`` lists every setting.

This module imports only the standard library and :mod:`oncely.errors`.
"""

from __future__ import annotations

import datetime as dt
import difflib
import math
import os
import re
import threading
import warnings
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from oncely.errors import ConfigurationError, SettingWarning

__all__ = [
    "MAX_COUNT",
    "MAX_SECONDS",
    "PREFIX",
    "REQUIRED",
    "SETTINGS",
    "UNSET",
    "Setting",
    "check_environment",
    "closest",
    "coerce",
    "count",
    "flag",
    "fraction",
    "names",
    "parse_duration",
    "parse_size",
    "plain_number",
    "resolve",
    "seconds",
    "text",
    "unknown_option",
    "whole",
]

#: Environment variables of oncely start with this.
PREFIX: Final = "ONCELY_"

#: Longest duration any option takes, in seconds (1e9 s, about 31.7 years): a ttl, lease,
#: window, timeout or delay above it is refused when the object that takes it is built. Every
#: store keeps an expiry this far out exactly (Redis takes a ``PX`` only while the expiry, in
#: milliseconds since the epoch, fits in 64 bits: 1e16 s does not), and every wait this long
#: fits :data:`threading.TIMEOUT_MAX` (about 9.2e9 s on Linux).
MAX_SECONDS: Final = 1e9
#: The largest count argument (a batch, a limit) oncely passes to a store: 2**31 - 1, which
#: every driver, SQL ``LIMIT`` and Lua script takes as an exact integer.
MAX_COUNT: Final = 2**31 - 1


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


#: The default of a setting that has none: it must be given in code or in the environment.
REQUIRED: Final = _Required()


class _Unset:
    def __repr__(self) -> str:
        return "UNSET"


#: "Not given": the default of a dataclass field that is a setting (like ``None`` for an
#: argument); typed ``Any`` so a field keeps the type of its effective value.
UNSET: Any = _Unset()

_UNITS = {"": 1.0, "ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION = re.compile(
    r"\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE]([-+]?[0-9]+))?\s*([a-zA-Z]*)\s*", re.ASCII
)
_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
}
_SIZE = re.compile(r"\s*([0-9]+)\s*([a-zA-Z]*)\s*", re.ASCII)
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})
_DURATION_HELP = "give seconds (30, 1.5) or a number with a unit: 500ms, 30s, 5m (minutes), 24h, 1d"


def parse_duration(text: str) -> float:
    """Seconds in ``text``: ``"30"``, ``"1.5"``, ``"500ms"``, ``"30s"``, ``"5m"``, ``"24h"``.

    :raises ValueError: not a number with at most one of the units ``ms s m h d``.
    """
    match = _DURATION.fullmatch(text)
    if match is None:
        raise ValueError(f"not a duration; {_DURATION_HELP}")
    number, exponent, unit = match.groups()
    if unit not in _UNITS:
        raise ValueError(f"unknown unit {unit!r}; {_DURATION_HELP}")
    value = float(number + (f"e{exponent}" if exponent else ""))
    return value * _UNITS[unit]


def parse_size(text: str) -> int:
    """Bytes in ``text``: ``"1048576"``, ``"512KiB"``, ``"1MiB"``, ``"10MB"`` (units: B, kB, MB,
    GB in powers of 1000; KiB, MiB, GiB in powers of 1024; any case).

    :raises ValueError: not a whole number with at most one of those units.
    """
    match = _SIZE.fullmatch(text)
    if match is None:
        raise ValueError("not a size; give bytes (1048576) or a number with a unit: 512KiB, 1MiB")
    number, unit = match.groups()
    factor = _SIZE_UNITS.get(unit.lower())
    if factor is None:
        raise ValueError(f"unknown unit {unit!r}; use B, kB, MB, GB, KiB, MiB or GiB")
    return int(number) * factor


# -- kinds: turn a value (from code) or a text (from the environment) into the setting's value -----
# Each returns the value or raises ValueError with the reason (the caller adds where it came from).
Convert = Callable[[Any, bool], Any]


def plain_number(text: str, whole: bool = False) -> float:
    """The number in ``text`` written with ASCII characters only, as :func:`float` (or, with
    ``whole``, :func:`int`) reads it: ``"30"``, ``" 1.5 "``, ``"-3"``, ``"1e3"``.

    Python's own :func:`int` and :func:`float` also take other scripts' digits (``"٣٠"``),
    full-width digits (U+FF10 to U+FF19) and ``_`` separators (``"1_000"``): a setting is written in
    ASCII decimal, so those are refused.

    :raises ValueError: anything else (the message says why).
    """
    stripped = text.strip()
    if not stripped.isascii():
        raise ValueError(
            "write the number in ASCII digits (0-9), not another script's or full-width digits"
        )
    if "_" in stripped:
        raise ValueError("write the number without '_' separators (1000, not 1_000)")
    try:
        return int(stripped) if whole else float(stripped)
    except ValueError:
        raise ValueError("not a whole number" if whole else "not a number") from None


def _number(value: Any, text: bool, parse: Callable[[str], float]) -> float:
    if isinstance(value, str):
        try:
            return parse(value)
        except ValueError:
            try:  # "-3": a number after all, refused by the range check with a clear reason
                return plain_number(value)
            except ValueError as plain:
                if not value.isascii() or "_" in value:
                    raise plain from None  # say why: digits of another script, or "_"
            raise
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"expected a number, got {type(value).__name__}")
    return float(value)


def _seconds(minimum: float = 0.0, *, above: bool = True, none: bool = False) -> Convert:
    """Seconds above (or at least) ``minimum``; ``none``: also "none"/"forever"/-1 for None."""

    def convert(value: Any, text: bool) -> Any:
        if none and (
            (isinstance(value, str) and value.strip().lower() in ("none", "forever", "-1"))
            or (not isinstance(value, (bool, str)) and value == -1)
        ):
            return None
        if isinstance(value, dt.timedelta):
            value = value.total_seconds()
        seconds = _number(value, text, parse_duration)
        if not math.isfinite(seconds):
            raise ValueError("must be a finite number of seconds")
        if seconds > MAX_SECONDS:
            raise ValueError(f"must be {MAX_SECONDS:g} seconds (about 31.7 years) or less")
        if above and not seconds > minimum:
            raise ValueError(
                "must be positive seconds" if minimum == 0 else f"must be over {minimum:g} seconds"
            )
        if not above and not seconds >= minimum:
            raise ValueError(f"must be {minimum:g} seconds or more")
        return seconds

    return convert


def _whole_seconds(value: Any, text: bool) -> int:
    seconds = _seconds(0.0, above=False)(value, text)
    if seconds != int(seconds):
        raise ValueError("must be a whole number of seconds")
    return int(seconds)


def _integer(low: int, high: int | None = None, *, size: bool = False) -> Convert:
    def convert(value: Any, text: bool) -> int:
        if isinstance(value, str):
            number = parse_size(value) if size else _parse_int(value)
        elif isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"expected a whole number, got {type(value).__name__}")
        else:
            number = value
        if number < low or (high is not None and number > high):
            bound = f"between {low} and {high}" if high is not None else f"{low} or more"
            raise ValueError(f"must be {bound}{' bytes' if size else ''}")
        return number

    return convert


def _parse_int(text: str) -> int:
    return int(plain_number(text, whole=True))


def _boolean(value: Any, text: bool) -> bool:
    if isinstance(value, bool):
        return value
    if text and isinstance(value, str):
        word = value.strip().lower()
        if word in _TRUE:
            return True
        if word in _FALSE:
            return False
        raise ValueError("not a boolean; use 1/true/yes/on or 0/false/no/off")
    raise ValueError(f"expected True or False, got {type(value).__name__}")


def _choice(*choices: str) -> Convert:
    def convert(value: Any, text: bool) -> str:
        word = value.strip() if isinstance(value, str) else value
        if word not in choices:
            raise ValueError(f"must be one of {', '.join(map(repr, choices))}")
        return str(word)

    return convert


def _text(value: Any, text: bool) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {type(value).__name__}")
    if not value.strip():
        raise ValueError("must not be empty")
    return value.strip() if text else value


def _url(value: Any, text: bool) -> Any:
    if not isinstance(value, str):
        return value  # a store or backend object: its consumer checks the type
    url = _text(value, text)
    if "://" not in url:
        raise ValueError("not a URL; e.g. sqlite:///oncely.db, redis://localhost:6379/0")
    return url


def _items(item: Convert | None = None) -> Convert:
    """A list: comma-separated in the environment, a list/tuple/set in code."""

    def convert(value: Any, text: bool) -> tuple[Any, ...]:
        if isinstance(value, str):
            if not text:
                raise ValueError("takes a list (e.g. ['POST', 'PATCH']), not one string")
            parts: Iterable[Any] = [p.strip() for p in value.split(",") if p.strip()]
        elif isinstance(value, (bytes, Mapping)) or not isinstance(value, Collection):
            raise ValueError(f"expected a list, got {type(value).__name__}")
        else:
            parts = value
        return tuple(item(p, text) if item is not None else _text(p, text) for p in parts)

    return convert


_status = _integer(100, 599)


def _secret(value: Any, text: bool) -> Any:
    if isinstance(value, str) and text:
        keys = [p.strip() for p in value.split(",") if p.strip()]
        if not keys:
            raise ValueError("must not be empty")
        return keys
    if isinstance(value, (str, bytes)):
        return value
    if isinstance(value, Collection) and not isinstance(value, Mapping):
        return list(value)
    raise ValueError(f"expected a str, bytes or a list of them, got {type(value).__name__}")


def _log_secret(value: Any, text: bool) -> Any:
    if value is None:
        return None
    if not isinstance(value, (str, bytes)):
        raise ValueError(f"expected a str or bytes, got {type(value).__name__}")
    try:
        raw = value.encode("utf-8") if isinstance(value, str) else value
    except UnicodeEncodeError:
        raise ValueError("contains a lone surrogate (it has no UTF-8 form)") from None
    if len(raw) < 16:
        raise ValueError("must be at least 16 bytes")
    return value


# -- the registry --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Setting:
    """One option: its name, environment variable, default, who reads it and how it is parsed.

    :param name: the registry name (``ttl``, ``http_wait``); the variable is
        ``ONCELY_`` + ``name.upper()``.
    :param default: the built-in default, or :data:`REQUIRED`.
    :param used_by: the arguments it feeds, e.g. ``("@idempotent(ttl=)",)``.
    :param doc: one line: what it means, with its unit.
    :param secret: never print the value in an error.
    """

    name: str
    default: Any
    used_by: tuple[str, ...]
    doc: str
    convert: Convert
    secret: bool = False

    @property
    def env(self) -> str:
        """The environment variable: ``ONCELY_<NAME>``."""
        return PREFIX + self.name.upper()

    def show(self, value: Any) -> str:
        return "<hidden>" if self.secret else repr(value)


def _setting(
    name: str, default: Any, used_by: str, doc: str, convert: Convert, secret: bool = False
) -> tuple[str, Setting]:
    return name, Setting(name, default, tuple(used_by.split("; ")), doc, convert, secret)


_IDEM = "@idempotent"
_HTTP = "IdempotencyConfig"

#: Every setting, by name (``docs/settings.md`` shows the same table).
SETTINGS: Final[Mapping[str, Setting]] = dict(
    [
        # shared by the decorator and HTTP (and the token store)
        _setting(
            "store",
            "sqlite:///oncely.db",
            f"{_IDEM}(store=); {_HTTP}(store=); Tokens(store=)",
            "store URL; the default is a SQLite file in the working directory",
            _url,
        ),
        _setting(
            "ttl",
            86400.0,
            f"{_IDEM}(ttl=); {_HTTP}(ttl=)",
            "seconds a completed result or response is kept for replay (24 h, as Stripe)",
            _seconds(),
        ),
        _setting(
            "lease",
            30.0,
            f"{_IDEM}(lease=); {_HTTP}(lease=)",
            "seconds a running call holds its key without renewal; renewed every lease/3",
            _seconds(),
        ),
        _setting(
            "fail_open",
            False,
            f"{_IDEM}(fail_open=); {_HTTP}(fail_open=)",
            "with the store unreachable, run unprotected instead of failing (closed)",
            _boolean,
        ),
        # @idempotent only
        _setting(
            "on_duplicate",
            "wait",
            f"{_IDEM}(on_duplicate=)",
            "a duplicate of a running call: 'wait' for its result or 'raise' InFlightError",
            _choice("wait", "raise"),
        ),
        _setting(
            "wait_timeout",
            30.0,
            f"{_IDEM}(wait_timeout=)",
            "seconds a duplicate waits for the running call before InFlightError",
            _seconds(above=False),
        ),
        _setting(
            "cache_size",
            0,
            f"{_IDEM}(cache_size=)",
            "completed results kept in process (0: off)",
            _integer(0),
        ),
        # HTTP only
        _setting(
            "http_methods",
            ("POST", "PATCH"),
            f"{_HTTP}(methods=)",
            "methods the Idempotency-Key applies to",
            _items(),
        ),
        _setting(
            "http_include",
            (),
            f"{_HTTP}(include=)",
            "path patterns to protect (empty: all paths); * one segment, ** any",
            _items(),
        ),
        _setting(
            "http_exclude", (), f"{_HTTP}(exclude=)", "path patterns never protected", _items()
        ),
        _setting(
            "http_required",
            True,
            f"{_HTTP}(required=)",
            "a protected request without the header gets 400",
            _boolean,
        ),
        _setting(
            "http_header",
            "Idempotency-Key",
            f"{_HTTP}(header=)",
            "the request header carrying the key",
            _text,
        ),
        _setting(
            "http_allow_bare_key",
            True,
            f"{_HTTP}(allow_bare_key=)",
            "accept an unquoted key besides the Structured Field string",
            _boolean,
        ),
        _setting(
            "http_max_key_length",
            255,
            f"{_HTTP}(max_key_length=)",
            "longest key accepted, in characters (1 to 4096)",
            _integer(1, 4096),
        ),
        _setting(
            "http_wait",
            0.0,
            f"{_HTTP}(wait=)",
            "seconds a duplicate waits for the first request, then gets its replay (0: 409)",
            _seconds(above=False),
        ),
        _setting(
            "http_retry_after",
            1,
            f"{_HTTP}(retry_after=)",
            "Retry-After on 409 and 503, whole seconds",
            _whole_seconds,
        ),
        _setting(
            "http_store_client_errors",
            True,
            f"{_HTTP}(store_client_errors=)",
            "store and replay 4xx responses",
            _boolean,
        ),
        _setting(
            "http_store_server_errors",
            True,
            f"{_HTTP}(store_server_errors=)",
            "store and replay 5xx responses and handler exceptions (false: release the key)",
            _boolean,
        ),
        _setting(
            "http_transient_statuses",
            (408, 425, 429),
            f"{_HTTP}(transient_statuses=)",
            "statuses never stored (the key is released)",
            _items(_status),
        ),
        _setting(
            "http_deny_headers",
            (),
            f"{_HTTP}(deny_headers=)",
            "response headers never stored, on top of the built-in list",
            _items(),
        ),
        _setting(
            "http_max_request_body",
            1 << 20,
            f"{_HTTP}(max_request_body=)",
            "larger request bodies get 413 before the handler runs (bytes)",
            _integer(0, size=True),
        ),
        _setting(
            "http_max_stored_body",
            1 << 20,
            f"{_HTTP}(max_stored_body=)",
            "larger responses are sent but stored as not replayable (bytes)",
            _integer(0, size=True),
        ),
        _setting(
            "http_problem_base",
            "https://oncely.dev/problems/",
            f"{_HTTP}(problem_base=)",
            "prefix of problem+json type URIs",
            _text,
        ),
        _setting(
            "http_replay_header",
            "Idempotent-Replayed",
            f"{_HTTP}(replay_header=)",
            "header added to replayed responses",
            _text,
        ),
        _setting(
            "http_namespace",
            "http",
            f"{_HTTP}(namespace=)",
            "store scope prefix of HTTP records",
            _text,
        ),
        # one-time tokens
        _setting(
            "token_secret",
            REQUIRED,
            "Tokens(secret=)",
            "signing keys, at least 16 bytes each; comma-separated, the first signs",
            _secret,
            secret=True,
        ),
        _setting(
            "token_ttl",
            900.0,
            "Tokens(default_ttl=)",
            "lifetime of a token when issue() gets none",
            _seconds(),
        ),
        _setting(
            "token_scope",
            "oncely-tokens",
            "Tokens(scope=)",
            "store scope under which consumed tokens are recorded (bound into every token "
            "issued: a Tokens of another scope refuses it)",
            _text,
        ),
        # observability
        _setting(
            "log_key",
            None,
            "oncely.core.observe.set_log_key(secret=)",
            "secret of the key digest in logs and spans (HMAC-SHA256), at least 16 bytes; "
            "unset: plain SHA-256",
            _log_secret,
            secret=True,
        ),
        # locks
        _setting(
            "lock_ttl",
            30.0,
            "Lock(ttl=)",
            "seconds a lock outlives a crashed holder (renewed every ttl/3 with auto_renew)",
            _seconds(0.001, above=False),
        ),
        _setting(
            "lock_timeout",
            None,
            "Lock(timeout=)",
            "seconds `with lock:` waits; none/forever/-1: as long as it takes",
            _seconds(above=False, none=True),
        ),
        _setting(
            "lock_auto_renew",
            False,
            "Lock(auto_renew=)",
            "renew the lock every ttl/3 while it is held",
            _boolean,
        ),
    ]
)


# -- resolution ----------------------------------------------------------------------------------
def closest(name: str, known: Iterable[str]) -> str | None:
    """The known name closest to ``name`` (difflib), or ``None`` if none is close."""
    found = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    return found[0] if found else None


def unknown_option(name: str, known: Iterable[str], where: str) -> ConfigurationError:
    """The error for an option name that does not exist, suggesting the closest known one."""
    known = sorted(known)
    near = closest(name, known)
    hint = f"did you mean {near!r}? " if near is not None else ""
    return ConfigurationError(
        f"{where}: unknown option {name!r}; {hint}known options: {', '.join(known)}"
    )


def _where(setting: Setting, where: str, param: str | None) -> str:
    arg = f"{param or setting.name}="
    return f"{where}: {arg}" if where else arg


def coerce(name: str, value: Any, *, where: str = "", param: str | None = None) -> Any:
    """Check and convert a value given in code for setting ``name`` (no environment involved).

    :param where: what is being configured, for the message (``"@idempotent billing.charge"``).
    :param param: the argument's name there, if it is not the setting's (``"default_ttl"``).
    :raises ConfigurationError: the value has the wrong type, unit or range; the message names
        the argument and the value.
    """
    setting = SETTINGS[name]
    try:
        return setting.convert(value, False)
    except ValueError as exc:
        raise ConfigurationError(
            f"{_where(setting, where, param)}{setting.show(value)} is not valid: {exc}"
        ) from None


def seconds(
    value: Any,
    param: str,
    *,
    where: str = "",
    minimum: float = 0.0,
    above: bool = True,
    maximum: float | None = None,
    none: bool = False,
) -> Any:
    """A duration argument that is not a named setting (``IdempotentConsumer(wait_timeout=)``,
    ``Deduplicator(window=)``, ``Inbox.purge(older_than=)``, a lock's ``ttl`` ...), read by the
    same rule as every setting: seconds as a number, a text with one unit (``"500ms"``,
    ``"30s"``, ``"5m"``, ``"24h"``, ``"1d"``) or a :class:`datetime.timedelta`; returned as
    float seconds.

    :param param: the argument's name, for the message.
    :param where: what is being configured, for the message.
    :param minimum: the smallest value; ``above``: strictly above it (default) or at least it.
    :param maximum: the largest value allowed, if lower than :data:`MAX_SECONDS` (which
        bounds every duration).
    :param none: ``None`` (and ``"none"``/``"forever"``/``-1``) is allowed and returned as None.
    :raises ConfigurationError: the value has the wrong type, unit or range; the message names
        the argument and the value.
    """
    if none and value is None:
        return None
    label = f"{where}: {param}=" if where else f"{param}="
    try:
        result = _seconds(minimum, above=above, none=none)(value, False)
        if maximum is not None and result is not None and result > maximum:
            raise ValueError(f"must be {maximum:g} seconds or less")
    except ValueError as exc:
        raise ConfigurationError(f"{label}{value!r} is not valid: {exc}") from None
    return result


def _check_value(convert: Convert, value: Any, param: str, where: str, none: bool) -> Any:
    if none and value is None:
        return None
    try:
        return convert(value, False)
    except ValueError as exc:
        label = f"{where}: {param}=" if where else f"{param}="
        raise ConfigurationError(f"{label}{value!r} is not valid: {exc}") from None


def text(value: Any, param: str, *, where: str = "", none: bool = False) -> Any:
    """A string argument that is not a named setting (a table or column name, a prefix, a
    topic, a path): a non-empty :class:`str`, returned as given.

    :param none: ``None`` is allowed and returned as None.
    :raises ConfigurationError: not a string, or an empty one; the message names ``param``.
    """
    return _check_value(_text, value, param, where, none)


def flag(value: Any, param: str, *, where: str = "", none: bool = False) -> Any:
    """A boolean argument (``create_schema=``, ``bloom=``): ``True`` or ``False`` only (not
    ``1``, not ``"yes"``).

    :raises ConfigurationError: anything else; the message names ``param``.
    """
    return _check_value(_boolean, value, param, where, none)


def whole(
    value: Any,
    param: str,
    *,
    where: str = "",
    minimum: int = 0,
    maximum: int | None = None,
    none: bool = False,
) -> Any:
    """A count argument (a pool size, a batch, workers, attempts): an :class:`int` or its
    text (``"8"``, as in the environment), not a bool or a float, from ``minimum`` to
    ``maximum``; returned as an int.

    :raises ConfigurationError: another type or out of range; the message names ``param``.
    """
    return _check_value(_integer(minimum, maximum), value, param, where, none)


def count(value: Any, param: str, *, where: str = "", minimum: int = 1) -> int:
    """A batch or limit argument sent to a store (``purge_expired(limit)``, ``batch=``,
    ``--limit``): an :class:`int` from ``minimum`` to :data:`MAX_COUNT`.

    Not its text: these are Python arguments (the command line's ``--limit`` and ``--batch``
    arrive parsed as ints, environment variables are read by :func:`resolve`), and a ``"5"``
    passed in Python is a mistake that every store refuses alike.

    :raises ConfigurationError: another type (a str, a float, a bool, None) or out of range;
        the message names ``param``.
    """
    if isinstance(value, str):
        label = f"{where}: {param}=" if where else f"{param}="
        raise ConfigurationError(
            f"{label}{value!r} is not valid: expected an int, got str (a count passed in "
            f"Python is an int, e.g. {param}=1000)"
        )
    result: int = whole(value, param, where=where, minimum=minimum, maximum=MAX_COUNT)
    return result


def fraction(value: Any, param: str, *, where: str = "") -> float:
    """A probability argument (``error_rate=``): a number strictly between 0 and 1.

    :raises ConfigurationError: another type, NaN or out of range; the message names ``param``.
    """

    def convert(value: Any, text: bool) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"expected a number, got {type(value).__name__}")
        if not 0 < value < 1:
            raise ValueError("must be above 0 and below 1")
        return float(value)

    result: float = _check_value(convert, value, param, where, False)
    return result


def names(value: Any, param: str, *, where: str = "", none: bool = False) -> Any:
    """A list-of-strings argument (``methods=``, ``purposes=``): a list, tuple or set of
    non-empty strings (one string is refused: ``"POST"`` is not ``["POST"]``); returned as a
    tuple.

    :raises ConfigurationError: not such a collection; the message names ``param``.
    """
    return _check_value(_items(), value, param, where, none)


def _from_text(setting: Setting, text: str) -> Any:
    try:
        return setting.convert(text, True)
    except ValueError as exc:
        users = ", ".join(setting.used_by)
        raise ConfigurationError(
            f"environment variable {setting.env}={setting.show(text)} is not valid: {exc} "
            f"(it sets {users}; unset it or fix the value)"
        ) from None


def resolve(
    name: str,
    value: Any = None,
    *,
    where: str = "",
    param: str | None = None,
    environ: Mapping[str, str] | None = None,
) -> Any:
    """The value of setting ``name``: ``value`` if given (not ``None`` nor :data:`UNSET`), else
    ``$ONCELY_<NAME>``, else the default; parsed and checked either way (the syntax is in the
    module's docstring).

    :param environ: the environment to read (default :data:`os.environ`).
    :raises ConfigurationError: a bad value (the message names the argument or the variable),
        a required setting given nowhere, or a bad value in any ``ONCELY_*`` variable.
    :raises KeyError: ``name`` is not a setting (a bug in the caller).
    """
    setting = SETTINGS[name]
    env = os.environ if environ is None else environ
    _check_once(env)
    if value is not None and value is not UNSET:
        return coerce(name, value, where=where, param=param)
    text = env.get(setting.env, "")
    if text.strip():
        return _from_text(setting, text)
    if setting.default is REQUIRED:
        arg = param or setting.name
        raise ConfigurationError(
            f"{where + ': ' if where else ''}{arg}= is required: pass it, or set the "
            f"environment variable {setting.env}"
        )
    return setting.default


def check_environment(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Check every ``ONCELY_*`` variable: return the parsed values of the known ones.

    Unknown names warn (:class:`~oncely.errors.SettingWarning`, once per name and process) with
    the closest known name.

    :raises ConfigurationError: a known variable has a bad value (the first one found).
    """
    env = os.environ if environ is None else environ
    by_env = {s.env: s for s in SETTINGS.values()}
    values: dict[str, Any] = {}
    for key in sorted(k for k in env if k.startswith(PREFIX)):
        setting = by_env.get(key)
        if setting is None:
            _warn_unknown(key, by_env)
            continue
        if env[key].strip():
            values[setting.name] = _from_text(setting, env[key])
    return values


_warned: set[str] = set()
_checked: tuple[tuple[str, str], ...] | None = None
_check_lock = threading.Lock()


def _warn_unknown(key: str, by_env: Mapping[str, Setting]) -> None:
    with _check_lock:
        if key in _warned:
            return
        _warned.add(key)
    near = closest(key, by_env)
    hint = f"did you mean {near}? " if near is not None else ""
    warnings.warn(
        f"environment variable {key} is not an oncely setting and is ignored; {hint}"
        "the settings are listed in docs/settings.md",
        SettingWarning,
        stacklevel=4,
    )


def _check_once(env: Mapping[str, str]) -> None:
    """:func:`check_environment` unless the ``ONCELY_*`` variables are the ones last checked."""
    global _checked
    snapshot = tuple(sorted((k, v) for k, v in env.items() if k.startswith(PREFIX)))
    if snapshot == _checked:
        return
    check_environment(env)
    _checked = snapshot
