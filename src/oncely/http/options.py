"""Reading :class:`~oncely.http.config.IdempotencyConfig` options from a plain mapping
(Django's ``settings.ONCELY``, a Litestar plugin's arguments).

:func:`config_from_mapping` rejects unknown option names, suggesting the closest one
(:func:`difflib.get_close_matches`), imports dotted paths for the options that take objects
(``scope``, ``fingerprint``, ``on_lease_lost``, ``tokens``) and builds the configuration; every
value is then checked for its type and unit by :mod:`oncely.settings`, the one place that reads
options (the same rules and messages as in code and in ``ONCELY_*`` variables).
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Collection, Mapping
from typing import TYPE_CHECKING, Any

from oncely.errors import ConfigurationError
from oncely.settings import closest, unknown_option

if TYPE_CHECKING:
    from oncely.http.config import IdempotencyConfig

__all__ = ["closest", "config_from_mapping", "import_object", "unknown_option"]

#: Options that take an object; in a mapping a string names it by its dotted path.
OBJECTS = frozenset({"scope", "on_lease_lost", "tokens"})


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
        options[name] = item
    try:
        return Rule(**options)
    except ConfigurationError as exc:
        raise ConfigurationError(f"{where}: {exc}") from exc


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
        values[name] = value
    try:
        return IdempotencyConfig(**values)
    except ConfigurationError as exc:
        message = str(exc)
        if not message.startswith(where):
            message = f"{where}: {message}"
        raise ConfigurationError(message) from exc
