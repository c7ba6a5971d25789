"""Django settings for a test script run in a fresh interpreter (Django settings are
process-wide): ``configure(target)`` with ``sqlite:<path>``, ``postgresql`` or ``mysql`` (the
shared test servers). MySQL/MariaDB: Django's backend needs mysqlclient; without it PyMySQL
stands in (``pymysql.install_as_MySQLdb()``)."""

from __future__ import annotations

import django
from django.conf import settings


def configure(target: str) -> None:
    if target.startswith("sqlite:"):
        db = {"ENGINE": "django.db.backends.sqlite3", "NAME": target[len("sqlite:") :]}
    elif target == "postgresql":
        db = {
            "ENGINE": "django.db.backends.postgresql",
            "NAME": "test",
            "USER": "postgres",
            "HOST": "127.0.0.1",
            "PORT": "5432",
        }
    else:
        try:
            import MySQLdb  # noqa: F401
        except ImportError:
            import pymysql

            pymysql.install_as_MySQLdb()
        db = {
            "ENGINE": "django.db.backends.mysql",
            "NAME": "test",
            "USER": "root",
            "HOST": "127.0.0.1",
            "PORT": "3306",
        }
    settings.configure(DATABASES={"default": db}, INSTALLED_APPS=[], USE_TZ=True)
    django.setup()
