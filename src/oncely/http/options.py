"""Checking the values of :class:`~oncely.http.config.IdempotencyConfig` options, and reading
them from a plain mapping (Django's ``settings.ONCELY``, a Litestar plugin's arguments).

Every option is checked for its type and unit when a configuration is built, so a mistake is
a :class:`~oncely.errors.ConfigurationError` naming the option and a valid example, at
start-up, never a ``TypeError`` on the first request:

* durations are seconds (``ttl``, ``lease``, ``wait``, ``retry_after``): a number or a
  :class:`datetime.timedelta`; a string such as ``"24h"`` is refused with the number to write
  instead (``86400``);
* sizes are bytes (``max_request_body``, ``max_stored_body``): an int; ``"1MB"`` is refused
  the same way;
* flags are ``True``/``False`` (the string ``"false"`` is truthy, so it is refused);
* lists (``methods``, ``include``, …) are lists, never one string.

:func:`config_from_mapping` also rejects unknown option names, suggesting the closest one
(:func:`difflib.get_close_matches`), and imports dotted paths for the options that take
objects (``scope``, ``fingerprint``, ``on_lease_lost``, ``tokens``).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import difflib
import importlib
import math
import re
from collections.abc import Callable, Collection, Mapping
from typing import TYPE_CHECKING, Any

from oncely.errors import ConfigurationError

if TYPE_CHECKING:
    from oncely.http.config import IdempotencyConfig

__all__ = ["check_option", "closest", "config_from_mapping", "import_object", "unknown_option"]

SECONDS = frozenset({"ttl", "lease", "wait", "retry_after"})
BYTES = frozenset({"max_request_body", "max_stored_body"})
INTEGERS = frozenset({"max_key_length"})
FLAGS = frozenset(
    {"required", "allow_bare_key", "store_client_errors", "store_server_errors", "fail_open"}
)
STRING_LISTS = frozenset({"methods", "include", "exclude", "deny_headers"})
STRINGS = frozenset({"header", "problem_base", "replay_header", "namespace"})
#: Options that take an object; in a mapping a string names it by its dotted path.
OBJECTS = frozenset({"scope", "on_lease_lost", "tokens"})

_UNIT = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]+)\s*$")
_SECONDS_PER = {
    "ms": 0.001, "s": 1, "sec": 1, "secs": 1, "second": 1, "seconds": 1,
    "m": 60, "min": 60, "mins": 60, "minute": 60, "minutes": 60,
    "h": 3600, "hr": 3600, "hour": 3600, "hours": 3600, "d": 86400, "day": 86400, "days": 86400,
}  # fmt: skip
_BYTES_PER = {
    "b": 1, "kb": 1000, "k": 1024, "kib": 1024, "mb": 1000**2, "m": 1 << 20, "mib": 1 << 20,
    "gb": 1000**3, "g": 1 << 30, "gib": 1 << 30,
}  # fmt: skip


def closest(name: str, known: Collection[str]) -> str | None:
    """The known name closest to ``name`` (case-insensitively), or None."""
    lowered = {k.lower(): k for k in known}
    match = difflib.get_close_matches(name.lower(), list(lowered), n=1, cutoff=0.6)
    return lowered[match[0]] if match else None


def unknown_option(name: str, known: Collection[str], where: str) -> ConfigurationError:
    """The error for an unknown option ``name``, suggesting the closest known one."""
    guess = closest(name, known)
    hint = f"did you mean {guess!r}? " if guess is not None else ""
    return ConfigurationError(
        f"{where}: unknown option {name!r}; {hint}the options are: {', '.join(sorted(known))}"
    )


def _number_text(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def _unit_hint(value: str, table: Mapping[str, float], unit: str) -> str:
    match = _UNIT.match(value)
    if match is not None and match.group(2).lower() in table:
        amount = float(match.group(1)) * table[match.group(2).lower()]
        return f": write {_number_text(amount)} for {value!r}"
    return ""


def check_option(name: str, value: Any, label: str | None = None) -> Any:
    """``value`` checked for option ``name``; returns it normalised (a timedelta becomes float
    seconds). Options without a rule here are returned unchanged. ``label`` names the option
    in messages (default: ``name``).

    :raises ConfigurationError: the value has the wrong type or unit; the message says which
        type and unit the option takes and, for a string with a unit, the number to write.
    """
    label = label or name
    if name in SECONDS:
        if isinstance(value, dt.timedelta):
            value = value.total_seconds()
        whole = name == "retry_after"
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            hint = _unit_hint(value, _SECONDS_PER, "s") if isinstance(value, str) else ""
            raise ConfigurationError(
                f"{label} is in seconds, as a number (or a datetime.timedelta), not "
                f"{type(value).__name__} {value!r}{hint}"
            )
        if whole and not float(value).is_integer():
            raise ConfigurationError(f"{label} is whole seconds (Retry-After), not {value!r}")
        if not math.isfinite(value):
            raise ConfigurationError(f"{label} must be a finite number of seconds, not {value!r}")
        return int(value) if whole else value
    if name in BYTES or name in INTEGERS:
        if isinstance(value, bool) or not isinstance(value, int):
            what = "bytes, as an int" if name in BYTES else "an int"
            hint = _unit_hint(value, _BYTES_PER, "B") if isinstance(value, str) else ""
            if isinstance(value, float) and value.is_integer():
                hint = f": write {int(value)}"
            raise ConfigurationError(
                f"{label} is {what}, not {type(value).__name__} {value!r}{hint}"
            )
        return value
    if name in FLAGS:
        if not isinstance(value, bool):
            raise ConfigurationError(
                f"{label} takes True or False, not {type(value).__name__} {value!r}"
            )
        return value
    if name in STRING_LISTS:
        if isinstance(value, (str, bytes)) or not isinstance(value, Collection):
            example = "['POST', 'PATCH']" if name == "methods" else "['/health', '/admin/**']"
            raise ConfigurationError(
                f"{label} takes a list of strings, e.g. {example}, not {value!r}"
            )
        bad = [item for item in value if not isinstance(item, str) or not item]
        if bad:
            raise ConfigurationError(f"{label}: every item must be a non-empty string: {bad!r}")
        if name == "methods":
            odd = [m for m in value if not m.isalpha()]
            if odd:
                raise ConfigurationError(f"{label}: {odd!r} are not HTTP methods")
        return value
    if name == "transient_statuses":
        if isinstance(value, (str, bytes)) or not isinstance(value, Collection):
            raise ConfigurationError(f"{label} takes a list of status codes, e.g. [408, 429]")
        bad = [s for s in value if isinstance(s, bool) or not isinstance(s, int)]
        if bad or any(not 100 <= s <= 599 for s in value):
            raise ConfigurationError(f"{label}: every item must be a status code 100-599")
        return value
    if name in STRINGS:
        if not isinstance(value, str):
            raise ConfigurationError(f"{label} takes a string, not {type(value).__name__}")
        return value
    if name == "routes" and not isinstance(value, Mapping):
        raise ConfigurationError(
            f"{label} takes a mapping of path pattern to Rule, e.g. "
            "{'/orders/*': Rule(required=False)}"
        )
    return value


def import_object(path: str, where: str) -> Any:
    """The object a dotted path (``"myproject.idempotency.scope"``) names.

    :raises ConfigurationError: the module or the attribute does not exist.
    """
    module_name, _, attribute = path.rpartition(".")
    if not module_name:
        raise ConfigurationError(
            f"{where}: {path!r} is not a dotted path such as 'myproject.idempotency.scope'"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigurationError(f"{where}: cannot import {module_name!r} ({exc})") from exc
    try:
        return getattr(module, attribute)
    except AttributeError:
        names = [n for n in dir(module) if not n.startswith("_")]
        guess = closest(attribute, names)
        hint = f"; did you mean {module_name}.{guess}?" if guess else ""
        raise ConfigurationError(
            f"{where}: module {module_name!r} has no attribute {attribute!r}{hint}"
        ) from None


def _rule(value: Any, where: str) -> Any:
    from oncely.http.routes import Rule

    if isinstance(value, Rule):
        return value
    if not isinstance(value, Mapping):
        raise ConfigurationError(
            f"{where} takes a Rule or a mapping of its options, e.g. {{'required': False}}"
        )
    known = [f.name for f in dataclasses.fields(Rule)]
    options: dict[str, Any] = {}
    for name, item in value.items():
        if name not in known:
            raise unknown_option(name, known, where)
        if name == "fingerprint" and isinstance(item, str):
            item = import_object(item, f"{where}['fingerprint']")
        label = f"{where}[{name!r}]"
        options[name] = check_option(name, item, label) if item is not None else None
    return Rule(**options)


def config_from_mapping(
    options: Mapping[str, Any],
    where: str = "options",
    *,
    store: Callable[[Any], Any] | None = None,
    also: Collection[str] = (),
    **overrides: Any,
) -> IdempotencyConfig:
    """An :class:`~oncely.http.config.IdempotencyConfig` from a mapping of its option names
    (``settings.ONCELY`` in Django). Strings name objects by dotted path for ``scope``,
    ``on_lease_lost``, ``tokens`` and a string ``fingerprint``; ``routes`` values may be
    mappings of :class:`~oncely.http.routes.Rule` options. ``store`` maps the ``store`` value
    (Django turns ``"django"`` into the database store). ``overrides`` win over ``options``;
    ``also`` are names the caller takes besides the options (only suggested for a typo).

    :raises ConfigurationError: an unknown option (the closest name is suggested), a value of
        the wrong type or unit, a dotted path that does not import, or any error of
        :class:`~oncely.http.config.IdempotencyConfig` itself; ``where`` starts each message.
    """
    from oncely.http.config import IdempotencyConfig

    if not isinstance(options, Mapping):
        raise ConfigurationError(
            f"{where} must be a dict of IdempotencyConfig options, e.g. "
            "{'store': 'redis://localhost:6379/0', 'scope': 'oncely.http.GLOBAL'}, not "
            f"{type(options).__name__}"
        )
    known = [f.name for f in dataclasses.fields(IdempotencyConfig)]
    values: dict[str, Any] = {}
    for name, value in {**options, **overrides}.items():
        if not isinstance(name, str) or name not in known:
            raise unknown_option(str(name), [*known, *also], where)
        label = f"{where}[{name!r}]"
        if isinstance(value, str) and (name in OBJECTS or (name == "fingerprint" and "." in value)):
            value = import_object(value, label)
        elif name == "routes" and isinstance(value, Mapping):
            value = {p: _rule(rule, f"{label}[{p!r}]") for p, rule in value.items()}
        elif name == "store" and store is not None:
            try:
                value = store(value)
            except ConfigurationError as exc:
                raise ConfigurationError(f"{label}: {exc}") from exc
        values[name] = check_option(name, value, label)
    try:
        return IdempotencyConfig(**values)
    except ConfigurationError as exc:
        message = str(exc)
        if not message.startswith(where):
            message = f"{where}: {message}"
        raise ConfigurationError(message) from exc
