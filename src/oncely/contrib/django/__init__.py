"""oncely as a Django app: ``INSTALLED_APPS += ["oncely.contrib.django"]``.

* ``settings.ONCELY``: the HTTP configuration (:mod:`oncely.contrib.django.conf`), read by
  ``oncely.http.django.IdempotencyMiddleware`` in ``MIDDLEWARE``;
* ``store="django"`` / ``"django://<alias>"``: records in the project's database
  (:mod:`oncely.contrib.django.database`), table created by ``manage.py migrate oncely``;
* ``manage.py oncely init|check|keys|purge``: the ``oncely`` CLI on the configured store;
* system checks (``manage.py check``): the settings and the middleware's place.

The HTTP side lives in :mod:`oncely.http.django`.
"""
