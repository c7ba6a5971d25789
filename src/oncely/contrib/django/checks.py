"""System checks (``manage.py check``, and every ``runserver``/``migrate``): ``settings.ONCELY``
and the place of oncely's middleware in ``MIDDLEWARE``.

The middleware refuses to start on the same errors (Django builds it at start-up), so these
checks only say it earlier, all at once, with Django's ids: ``oncely.E001`` listed twice,
``oncely.E002`` a ``process_view`` middleware after it, ``oncely.E003`` ``scope_from_user``
without ``AuthenticationMiddleware`` before it, ``oncely.E004`` ``GZipMiddleware`` after it,
``oncely.E010`` ``settings.ONCELY`` is wrong,
``oncely.W001`` ``ViewStartMiddleware`` is not needed.
"""

from __future__ import annotations

from typing import Any

from django.conf import settings  # type: ignore[import-untyped]
from django.core import checks  # type: ignore[import-untyped]

from oncely.contrib.django.conf import SETTING, idempotency_config
from oncely.errors import ConfigurationError
from oncely.http.config import IdempotencyConfig
from oncely.http.django import MIDDLEWARE_PATH, middleware_problems

__all__ = ["check_oncely"]


@checks.register()  # type: ignore[untyped-decorator]
def check_oncely(app_configs: Any = None, **kwargs: Any) -> list[Any]:
    """The settings and the middleware's place; see the module docstring."""
    names = [str(n) for n in getattr(settings, "MIDDLEWARE", None) or ()]
    messages: list[Any] = []
    config: IdempotencyConfig | None = None
    if hasattr(settings, SETTING) or MIDDLEWARE_PATH in names:
        try:
            config = idempotency_config()
        except ConfigurationError as exc:
            messages.append(checks.Error(str(exc), id="oncely.E010", obj=f"settings.{SETTING}"))
    for ident, message, hint in middleware_problems(names, config):
        kind = checks.Error if ".E" in ident else checks.Warning
        messages.append(kind(message, hint=hint, id=ident, obj="settings.MIDDLEWARE"))
    return messages
