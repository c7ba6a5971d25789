"""The claim engine, without I/O of its own: the record model (:mod:`oncely.core.records`),
cancel safety (:mod:`oncely.core.cancelsafe`), the one renewal rule
(:mod:`oncely.core.renewal`) and the lease a running call holds (:mod:`oncely.core.lease`).

Every mechanism (``functions``, ``http``, ``tokens``, ``locks``, ``sql``, ...) builds on these
names; ``core`` imports no mechanism and no backend (``tests/test_layers.py`` checks it).
"""
