"""Run by tests/test_sql_django.py in a fresh interpreter (Django settings are process-wide):
oncely.sql.transaction on django.db.connection, alone and inside transaction.atomic()."""

from __future__ import annotations

import sys

from django_target import configure


def main(alias_url: str, table: str, effects: str) -> None:
    configure(alias_url)
    from django.db import connection, transaction

    import oncely.sql
    from oncely.errors import TransactionFailed

    oncely.sql.create_tables(connection, table=table)
    with connection.cursor() as cur:
        cur.execute(f"CREATE TABLE {effects} (k VARCHAR(20) NOT NULL)")

    def count() -> int:
        with connection.cursor() as cur:
            cur.execute(f"SELECT COUNT(*) FROM {effects}")
            return int(cur.fetchone()[0])

    # alone: the block is its own atomic()
    for _ in range(2):
        with oncely.sql.transaction(
            connection, operation="test.op", key="k1", scope="s", table=table
        ) as tx:
            if not tx.replayed:
                with connection.cursor() as cur:
                    cur.execute(f"INSERT INTO {effects} VALUES ('k1')")
                tx.set_result("done")
        assert tx.result == "done"
    assert count() == 1

    if connection.vendor == "postgresql":  # the result UPDATE goes with the COMMIT
        from roundtrips import PgWire

        with (
            PgWire(connection.connection) as wire,
            oncely.sql.transaction(
                connection, operation="test.op", key="k5", scope="s", table=table
            ) as tx,
        ):
            with connection.cursor() as cur:
                cur.execute(f"INSERT INTO {effects} VALUES ('k5')")
            tx.set_result("done")
        # BEGIN, the claim, the body's INSERT, the UPDATE with the COMMIT
        assert wire.trips == 4, wire.queries
        with connection.cursor() as cur:
            cur.execute(f"DELETE FROM {effects} WHERE k = 'k5'")

    # inside the caller's atomic(): a savepoint; an error in it leaves the outer work intact
    with transaction.atomic():
        with connection.cursor() as cur:
            cur.execute(f"INSERT INTO {effects} VALUES ('outer')")
        try:
            with oncely.sql.transaction(
                connection, operation="test.op", key="k2", scope="s", table=table
            ):
                with connection.cursor() as cur:
                    cur.execute(f"INSERT INTO {effects} VALUES ('k2')")
                raise RuntimeError
        except RuntimeError:
            pass

        @oncely.sql.idempotent_transaction(key="key", scope="s", conn=connection, table=table)
        def op(key: str) -> int:
            with connection.cursor() as cur:
                cur.execute(f"INSERT INTO {effects} VALUES ('k3')")
            return 3

        assert op(key="k3") == 3 and op(key="k3") == 3
    assert count() == 3  # k1, outer, k3

    # a failed atomic block is refused with the fix
    if connection.vendor == "postgresql":
        with transaction.atomic():
            try:
                with transaction.atomic(), connection.cursor() as cur:
                    cur.execute("SELECT 1/0")
            except Exception:
                pass
            connection.needs_rollback = True
            try:
                with oncely.sql.transaction(
                    connection, operation="test.op", key="k4", scope="s", table=table
                ):
                    raise AssertionError("ran in a failed transaction")
            except TransactionFailed:
                pass
            else:
                raise AssertionError("no TransactionFailed")
    with connection.cursor() as cur:
        cur.execute(f"DROP TABLE {effects}")
        cur.execute(f"DROP TABLE {table}")
    print("OK")


if __name__ == "__main__":
    main(*sys.argv[1:])
