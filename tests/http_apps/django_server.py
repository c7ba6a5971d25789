"""Django's WSGI (Gunicorn) and ASGI (Uvicorn) applications of ``http_apps.django_project``."""

from __future__ import annotations

import os

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "http_apps.django_project")

from django.core.asgi import get_asgi_application
from django.core.wsgi import get_wsgi_application

wsgi = get_wsgi_application()
asgi = get_asgi_application()
