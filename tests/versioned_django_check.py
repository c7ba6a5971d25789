"""Run by tests/test_sql_caller_txn_guard.py in a fresh interpreter (Django settings are
process-wide): versioned_update's UnknownColumn / UnknownTable inside the caller's atomic()
keeps the block's earlier write (red team 19 G1)."""

from __future__ import annotations

import sys

from django_target import configure


def main(target: str, table: str) -> None:
    configure(target)
    from django.db import connection, transaction

    from oncely.errors import UnknownColumn, UnknownTable
    from oncely.sql import versioned_update

    with connection.cursor() as cur:
        cur.execute(f"CREATE TABLE {table} (id INTEGER PRIMARY KEY, name VARCHAR(10) NOT NULL)")
    try:
        calls = [
            lambda: versioned_update(connection, table, 1, {"name": "z"}, 1),  # no version
            lambda: versioned_update(connection, f"{table}_none", 1, {}, 1),
        ]
        for n, call in enumerate(calls, 1):
            with transaction.atomic():
                with connection.cursor() as cur:
                    cur.execute(f"INSERT INTO {table} (id, name) VALUES ({n}, 'e{n}')")
                try:
                    call()
                except (UnknownColumn, UnknownTable) as exc:
                    if connection.vendor == "postgresql":
                        assert "still usable" in str(exc), exc
                else:
                    raise AssertionError("no error")
        with connection.cursor() as cur:
            cur.execute(f"SELECT id FROM {table} ORDER BY id")
            ids = [int(r[0]) for r in cur.fetchall()]
        assert ids == [1, 2], ids
    finally:
        with connection.cursor() as cur:
            cur.execute(f"DROP TABLE {table}")
    print("OK")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
