"""``settings.ONCELY``: the :class:`~oncely.http.config.IdempotencyConfig` of a Django project.

::

    ONCELY = {
        "store": "django",                    # the default database; or "django://<alias>",
                                              # or any store URL ("redis://localhost:6379/0")
        "scope": "oncely.http.django.scope_from_user",   # a dotted path, or the object
        "ttl": 86400,                         # seconds (a datetime.timedelta works too)
        "exclude": ["/admin/**"],
    }

The keys are :class:`~oncely.http.config.IdempotencyConfig`'s option names. An unknown name
is refused with the closest known one suggested, a value of the wrong type or unit with the
value to write instead (:mod:`oncely.http.options`); the middleware reads the settings when
Django builds it, so a mistake stops the server at start-up, and ``manage.py check`` reports it.
"""

from __future__ import annotations

from typing import Any

from django.conf import settings  # type: ignore[import-untyped]
from django.core.exceptions import (  # type: ignore[import-untyped]
    ImproperlyConfigured as DjangoImproperlyConfigured,
)

from oncely.contrib.django.database import alias_of, database_store
from oncely.errors import ConfigurationError
from oncely.http.config import IdempotencyConfig
from oncely.http.options import config_from_mapping
from oncely.stores import Store

__all__ = ["SETTING", "ImproperlyConfigured", "idempotency_config", "resolve_store", "store_url"]

#: The name of the Django setting.
SETTING = "ONCELY"


class ImproperlyConfigured(ConfigurationError, DjangoImproperlyConfigured):  # type: ignore[misc]
    """A configuration error in Django terms: both :class:`oncely.errors.ConfigurationError`
    and :class:`django.core.exceptions.ImproperlyConfigured`."""


def resolve_store(value: Any) -> Any:
    """``"django"`` / ``"django://<alias>"`` as the database store; anything else unchanged."""
    alias = alias_of(value)
    return database_store(alias) if alias is not None else value


def _options() -> dict[str, Any]:
    options = getattr(settings, SETTING, None)
    if options is None:
        raise ImproperlyConfigured(
            f"settings.{SETTING} is not set; add e.g. {SETTING} = {{'store': 'django', "
            "'scope': 'oncely.http.django.scope_from_user'}} (the keys are IdempotencyConfig's "
            "options; 'scope' is required: whose key space a request belongs to)"
        )
    if not isinstance(options, dict):
        raise ImproperlyConfigured(
            f"settings.{SETTING} must be a dict of IdempotencyConfig options, not "
            f"{type(options).__name__}"
        )
    return options


def idempotency_config(**overrides: Any) -> IdempotencyConfig:
    """The configuration ``settings.ONCELY`` describes (``overrides`` win).

    :raises ImproperlyConfigured: the setting is missing or wrong (see the module docstring).
    """
    try:
        return config_from_mapping(
            _options(), f"settings.{SETTING}", store=resolve_store, **overrides
        )
    except ImproperlyConfigured:
        raise
    except ConfigurationError as exc:
        raise ImproperlyConfigured(str(exc)) from exc


def store_url(value: str | None = None) -> tuple[str, dict[str, Any]]:
    """The store URL and options for ``value`` (a URL, ``"django"``, ``"django://alias"``) or,
    without one, for ``settings.ONCELY["store"]``: what the ``manage.py oncely`` commands open.

    :raises ImproperlyConfigured: no store is given or configured, or it is not a URL.
    """
    if value is None:
        value = _options().get("store")
        if value is None:
            raise ImproperlyConfigured(
                f"settings.{SETTING} has no 'store'; pass a store URL to the command, or set "
                f"{SETTING}['store'] (e.g. 'django' for the default database)"
            )
        if isinstance(value, Store):
            return value.url, {}
    alias = alias_of(value)
    if alias is not None:
        from oncely.contrib.django.database import database_url

        try:
            return database_url(alias)
        except ConfigurationError as exc:
            raise ImproperlyConfigured(str(exc)) from exc
    if not isinstance(value, str):
        raise ImproperlyConfigured(f"settings.{SETTING}['store'] must be a URL, not {value!r}")
    return value, {}
