"""What the "is our row still in this transaction" check costs, per dialect, in one run.

A block that runs user code commits only if the row oncely wrote before it is still in the
transaction (:func:`oncely.sql.connections.commit_if_held`). Three ways to close the same
block (insert the inbox-like row, the user's one write, close), timed on one connection:

* ``plain``: ``BEGIN``, the two ``INSERT`` s, ``COMMIT``: no check at all (the floor);
* ``select``: the same with a ``SELECT count(*)`` of the row before the ``COMMIT`` (what
  SQLite and MariaDB sent before; still sent through SQLAlchemy and Django, and on MySQL);
* ``release``: begun with a savepoint, closed by releasing it (SQLite ``SAVEPOINT`` /
  ``RELEASE SAVEPOINT``; MariaDB ``BEGIN NOT ATOMIC START TRANSACTION; SAVEPOINT ..; END`` /
  ``BEGIN NOT ATOMIC RELEASE SAVEPOINT ..; COMMIT; END``): the check is the commit.

SQLite is a WAL file with ``synchronous=NORMAL`` (no fsync per commit: the statement's own cost
shows) and with ``synchronous=FULL``. Printed per form: the median of ``--passes`` passes in
which the three forms alternate in batches of 25 (a busy moment hits all alike), and the best
batch (the steadier figure on a loaded machine); only ratios within one run mean anything on a
shared machine.

    .venv/bin/python benchmarks/held_check.py [--ops 300] [--passes 5] [--no-mysql]
"""

from __future__ import annotations

import argparse
import sqlite3
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

FORMS = ("plain", "select", "release")


def _sqlite(path: Path, synchronous: str) -> Any:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(f"PRAGMA synchronous={synchronous}")
    return conn


def _forms_sqlite(conn: Any, t: str) -> dict[str, Callable[[int], None]]:
    def plain(i: int) -> None:
        conn.execute("BEGIN IMMEDIATE")
        conn.execute(f"INSERT INTO {t}_rows VALUES (?)", (f"p{i}",))
        conn.execute(f"INSERT INTO {t}_effects VALUES (?)", (f"p{i}",))
        conn.execute("COMMIT")

    def select(i: int) -> None:
        conn.execute("BEGIN IMMEDIATE")
        conn.execute(f"INSERT INTO {t}_rows VALUES (?)", (f"s{i}",))
        conn.execute(f"INSERT INTO {t}_effects VALUES (?)", (f"s{i}",))
        assert conn.execute(f"SELECT count(*) FROM {t}_rows WHERE id = ?", (f"s{i}",)).fetchone()
        conn.execute("COMMIT")

    def release(i: int) -> None:
        conn.execute("SAVEPOINT oncely_sp_1")
        conn.execute(f"INSERT INTO {t}_rows VALUES (?)", (f"r{i}",))
        conn.execute(f"INSERT INTO {t}_effects VALUES (?)", (f"r{i}",))
        conn.execute("RELEASE SAVEPOINT oncely_sp_1")

    return {"plain": plain, "select": select, "release": release}


def _forms_mysql(conn: Any, t: str) -> dict[str, Callable[[int], None]]:
    cur = conn.cursor()

    def plain(i: int) -> None:
        conn.begin()
        cur.execute(f"INSERT INTO {t}_rows VALUES (%s)", (f"p{i}",))
        cur.execute(f"INSERT INTO {t}_effects VALUES (%s)", (f"p{i}",))
        conn.commit()

    def select(i: int) -> None:
        conn.begin()
        cur.execute(f"INSERT INTO {t}_rows VALUES (%s)", (f"s{i}",))
        cur.execute(f"INSERT INTO {t}_effects VALUES (%s)", (f"s{i}",))
        cur.execute(f"SELECT count(*) FROM {t}_rows WHERE id = %s", (f"s{i}",))
        assert cur.fetchone()
        conn.commit()

    def release(i: int) -> None:
        cur.execute("BEGIN NOT ATOMIC START TRANSACTION; SAVEPOINT oncely_sp_1; END")
        cur.execute(f"INSERT INTO {t}_rows VALUES (%s)", (f"r{i}",))
        cur.execute(f"INSERT INTO {t}_effects VALUES (%s)", (f"r{i}",))
        cur.execute("BEGIN NOT ATOMIC RELEASE SAVEPOINT oncely_sp_1; COMMIT; END")

    return {"plain": plain, "select": select, "release": release}


def _measure(
    forms: dict[str, Callable[[int], None]], ops: int, passes: int
) -> tuple[dict[str, float], dict[str, float]]:
    """(median rate of the passes, best batch's rate), operations per second, per form."""
    rates: dict[str, list[float]] = {f: [] for f in FORMS}
    best = dict.fromkeys(FORMS, 0.0)
    n = 0
    batch = 25
    for _ in range(passes):
        spent = dict.fromkeys(FORMS, 0.0)
        for _ in range(ops // batch):
            for form in FORMS:
                start = time.perf_counter()
                for _ in range(batch):
                    n += 1
                    forms[form](n)
                took = time.perf_counter() - start
                spent[form] += took
                best[form] = max(best[form], batch / took)
        for form in FORMS:
            rates[form].append((ops // batch) * batch / spent[form])
    return {f: statistics.median(r) for f, r in rates.items()}, best


def _report(name: str, measured: tuple[dict[str, float], dict[str, float]]) -> None:
    """Microseconds per operation: the median of the passes, and the best batch (what a
    form costs when nothing else runs: the steadier figure on a shared machine)."""
    for label, rates in zip(("median", "best batch"), measured, strict=True):
        per = {f: 1e6 / r for f, r in rates.items()}
        print(
            f"{name:28} {label:10} plain {per['plain']:8.1f} us/op   select "
            f"{per['select']:8.1f} ({per['select'] / per['plain']:.3f}x)   release "
            f"{per['release']:8.1f} ({per['release'] / per['plain']:.3f}x)   select - release "
            f"{per['select'] - per['release']:+.1f} us/op"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ops", type=int, default=300, help="operations per form per pass")
    parser.add_argument("--passes", type=int, default=5)
    parser.add_argument("--no-mysql", action="store_true", help="SQLite only")
    args = parser.parse_args()
    t = f"held_{uuid.uuid4().hex[:8]}"
    with tempfile.TemporaryDirectory() as tmp:
        for synchronous in ("NORMAL", "FULL"):
            conn = _sqlite(Path(tmp) / f"{synchronous}.db", synchronous)
            conn.execute(f"CREATE TABLE {t}_rows (id TEXT PRIMARY KEY)")
            conn.execute(f"CREATE TABLE {t}_effects (id TEXT)")
            rates = _measure(_forms_sqlite(conn, t), args.ops, args.passes)
            _report(f"SQLite WAL sync={synchronous}", rates)
            conn.close()
    if args.no_mysql:
        return
    import pymysql

    conn = pymysql.connect(host="127.0.0.1", port=3306, user="root", database="test")
    cur = conn.cursor()
    try:
        cur.execute(f"CREATE TABLE {t}_rows (id VARCHAR(40) PRIMARY KEY) ENGINE=InnoDB")
        cur.execute(f"CREATE TABLE {t}_effects (id VARCHAR(40)) ENGINE=InnoDB")
        rates = _measure(_forms_mysql(conn, t), args.ops, args.passes)
        version = conn.get_server_info().removeprefix("5.5.5-").split("-")[0]
        _report(f"MariaDB {version} (PyMySQL)", rates)
    finally:
        cur.execute(f"DROP TABLE IF EXISTS {t}_rows, {t}_effects")
        conn.close()


if __name__ == "__main__":
    main()
