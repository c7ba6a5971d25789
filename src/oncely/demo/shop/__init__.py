"""The demo shop: a small, real HTTP service that uses every oncely mechanism where a real shop
would (see ``docs/demo.md`` for its HTTP contract).

* :mod:`~oncely.demo.shop.settings` -- how a shop process is configured (environment).
* :mod:`~oncely.demo.shop.db` -- the business database (orders, stock, ledger) in SQLite.
* :mod:`~oncely.demo.shop.web` -- problem+json answers and request parsing shared by features.
* :mod:`~oncely.demo.shop.features` -- one module per shop feature; each names the oncely
  mechanism it uses, and answers 501 while that mechanism is not built yet.
* :mod:`~oncely.demo.shop.app` -- assembles the Starlette app (protected or unprotected).
* :mod:`~oncely.demo.shop.settler` -- the periodic settlement job's process.
"""
