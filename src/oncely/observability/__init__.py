"""Metrics, traces and structured logs of oncely's store operations and leases.

One module per backend, each installed by its ``install()`` on the hook of
:mod:`oncely.core.observe` (nothing is recorded, and nothing costs, until one is installed):

- :mod:`oncely.observability.prometheus`: counters and a latency histogram through
  ``prometheus-client`` (extra ``oncely[prometheus]``), plus ``/metrics`` apps for ASGI and WSGI;
- :mod:`oncely.observability.otel`: OpenTelemetry client spans following the database
  semantic conventions (extra ``oncely[otel]``);
- :mod:`oncely.observability.logs`: one structured :mod:`logging` record per store operation,
  carrying the key's digest, never the raw key (standard library only).
"""
