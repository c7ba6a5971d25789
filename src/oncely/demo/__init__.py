"""oncely's main job, shown end to end: a shop service that uses every mechanism, a storm of
duplicates and faults that drives it, a conformance probe, and the report.

Modules:

* :mod:`oncely.demo.shop` -- the shop: a Starlette app (one module per feature under
  ``shop/features/``), its business database, and the settlement job.
* :mod:`oncely.demo.service` -- runs the shop for real (Uvicorn, 2 worker processes, the
  settlement processes) and injects faults into it (:mod:`oncely.demo.faults`).
* :mod:`oncely.demo.storm` -- drives any service that speaks the HTTP contract of
  ``docs/demo.md`` with duplicated operations and verifies its ledger and stock.
* :mod:`oncely.demo.probe` -- checks an API's ``Idempotency-Key`` support against
  draft-ietf-httpapi-idempotency-key-header-06.
* :mod:`oncely.demo.report` -- the terminal table, JSON, and the self-contained HTML report.
* :mod:`oncely.demo.cli` -- the ``oncely demo``, ``oncely storm`` and ``oncely probe`` commands.

Needs ``oncely[demo]`` (Starlette, Uvicorn, HTTPX, Rich); ``--html`` also ``oncely[report]``.
"""
