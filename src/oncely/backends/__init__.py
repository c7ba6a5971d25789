"""Connections to the servers oncely runs on, and nothing else: no mechanism lives here.

======================  ===============================================================
module                  what it holds
======================  ===============================================================
``registry``            the one URL table: scheme -> store class, lock backend class, extra;
                        store lookup (:func:`~oncely.backends.registry.open_store`, ...)
``urls``                URL helpers every backend shares (scheme, password redaction)
``plans``               sans-IO plans: a store operation written once as a generator of
                        requests, carried out by a sync or an async executor
``loops``               one value per running event loop (async clients and pools)
``lua``                 the one Lua script loader (resource files, ``EVALSHA`` / ``NOSCRIPT``)
``redis``               Redis clients: bounded timeouts, keepalive, per-loop async clients
``postgres``            PostgreSQL conninfo, network defaults, per-loop connection cache
``mysql``               MySQL / MariaDB connect arguments, timeouts, pools
``sqlite``              SQLite files: WAL, the bounded connection pool, busy timeout
======================  ===============================================================

Mechanisms (``oncely.stores``, ``oncely.locks``, ...) build on these modules; the modules
here import no mechanism. Each driver module (``redis``, ``postgres``, ``mysql``) imports its
driver, so import it only where that driver is needed.
"""
