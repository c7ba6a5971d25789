"""Run by tests/test_sql_caller_txn_guard.py in a fresh interpreter (Django settings are
process-wide): versioned_update's UnknownColumn / UnknownTable inside the caller's atomic()
keeps the block's earlier write (red team 19 G1); a UNIQUE violation on another column on a
later call (no savepoint) carries the "aborted" note on PostgreSQL, none elsewhere, where the
block's earlier write is committed (red team 20 H3)."""

from __future__ import annotations

import sys
from typing import Any

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
        _raw_error_on_a_later_call(connection, transaction, f"{table}_r")
    finally:
        with connection.cursor() as cur:
            cur.execute(f"DROP TABLE {table}")
    print("OK")


def _raw_error_on_a_later_call(connection: Any, transaction: Any, table: str) -> None:
    from django.db import IntegrityError

    from oncely.sql import versioned_update

    with connection.cursor() as cur:
        cur.execute(
            f"CREATE TABLE {table} (id INTEGER PRIMARY KEY, version BIGINT NOT NULL, "
            "email VARCHAR(10) UNIQUE)"
        )
        cur.execute(f"INSERT INTO {table} (id, version, email) VALUES (1, 1, 'a'), (2, 1, 'b')")
    try:
        with transaction.atomic():
            versioned_update(connection, table, 1, {"email": "a"}, 1)  # warm
        with transaction.atomic():
            with connection.cursor() as cur:
                cur.execute(f"INSERT INTO {table} (id, version) VALUES (3, 1)")
            try:
                versioned_update(connection, table, 1, {"email": "b"}, 2)
            except IntegrityError as exc:
                notes = list(getattr(exc, "__notes__", ()))
                said = any("PostgreSQL aborted the transaction" in n for n in notes)
                assert said == (connection.vendor == "postgresql"), notes
                if said:
                    transaction.set_rollback(True)
            else:
                raise AssertionError("no error")
        with connection.cursor() as cur:
            cur.execute(f"SELECT id FROM {table} ORDER BY id")
            ids = [int(r[0]) for r in cur.fetchall()]
        assert ids == ([1, 2] if connection.vendor == "postgresql" else [1, 2, 3]), ids
    finally:
        with connection.cursor() as cur:
            cur.execute(f"DROP TABLE {table}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
