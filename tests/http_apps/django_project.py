"""The Django project real servers run (``DJANGO_SETTINGS_MODULE=http_apps.django_project``;
the applications are in ``http_apps.django_server``), configured like ``server_app``:

* ``SERVER_APP_STORE`` (``django`` for the project's database) and
  ``SERVER_APP_STORE_OPTIONS`` (JSON): the store;
* ``ONCELY_DJANGO_DB``: the SQLite database file;
* ``SERVER_APP_LOG`` / ``SERVER_APP_SLEEP``: see ``http_apps.django_views``.
"""

from __future__ import annotations

import json
import os
import tempfile

from oncely.http import scope_from_header
from oncely.stores import open_store

SECRET_KEY = "tests-only"
DEBUG = False
ALLOWED_HOSTS = ["*"]
ROOT_URLCONF = "http_apps.django_views"
USE_TZ = True
INSTALLED_APPS = ["django.contrib.contenttypes", "django.contrib.auth", "oncely.contrib.django"]
MIDDLEWARE = [
    "django.middleware.csrf.CsrfViewMiddleware",
    "oncely.http.django.IdempotencyMiddleware",
]
DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": os.environ.get("ONCELY_DJANGO_DB")
        or os.path.join(tempfile.gettempdir(), "oncely-django-project.sqlite3"),
    }
}

#: Each API credential its own key space (settings.ONCELY names it by dotted path).
SCOPE = scope_from_header("Authorization")

_url = os.environ.get("SERVER_APP_STORE", "memory://")
ONCELY = {
    "store": _url
    if _url.startswith("django")
    else open_store(_url, **json.loads(os.environ.get("SERVER_APP_STORE_OPTIONS", "{}"))),
    "scope": "http_apps.django_project.SCOPE",
    "lease": 5,
}
