"""The Django app: ``INSTALLED_APPS += ["oncely.contrib.django"]`` (label ``oncely``)."""

from __future__ import annotations

from django.apps import AppConfig  # type: ignore[import-untyped]


class OncelyConfig(AppConfig):  # type: ignore[misc]
    """Gives the project the records table migration, ``manage.py oncely`` and the system
    checks of ``settings.ONCELY`` and of the middleware's place in ``MIDDLEWARE``."""

    name = "oncely.contrib.django"
    label = "oncely"
    verbose_name = "oncely"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        import oncely.contrib.django.checks  # noqa: F401  (registers the checks)
