"""Red-team findings (redteam2): MariaDB compares strings with collations, not bytes. The
oncely.sql keys table takes the database default (utf8mb4_general_ci here: case-insensitive,
trailing spaces ignored, every emoji equal), and the messaging tables' utf8mb4_bin is PAD SPACE
(trailing spaces ignored). Each test failed before branch fix2 (xfail reasons: git history)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from oncely.sql import create_tables, transaction

MYSQL_URL = "mysql://root@127.0.0.1:3306/test"


def _my() -> Any:
    import pymysql

    return pymysql.connect(host="127.0.0.1", port=3306, user="root", database="test")


@pytest.fixture
def my_tables() -> Iterator[tuple[str, list[str]]]:
    tag = uuid.uuid4().hex[:10]
    made: list[str] = []
    yield tag, made
    conn = _my()
    try:
        cur = conn.cursor()
        for table in made:
            cur.execute(f"DROP TABLE IF EXISTS {table}")
        conn.commit()
    finally:
        conn.close()


def _pay(conn: Any, keys: str, scope: str) -> tuple[bool, Any]:
    with transaction(conn, operation="test.op", key="order-1", scope=scope, table=keys) as tx:
        if tx.replayed:
            return True, tx.result
        tx.set_result({"charged_for": scope})
    return False, tx.result


@pytest.mark.parametrize(
    "first, second",
    [("Alice", "alice"), ("bob", "bob "), ("\U0001f600", "\U0001f601")],
    ids=["case", "trailing-space", "emoji"],
)
def test_scopes_that_differ_only_by_collation_are_not_shared_mysql(
    my_tables: tuple[str, list[str]], first: str, second: str
) -> None:
    tag, made = my_tables
    keys = f"okeys_{tag}"
    made.append(keys)
    conn = _my()
    try:
        create_tables(conn, table=keys)
        assert _pay(conn, keys, first) == (False, {"charged_for": first})
        assert _pay(conn, keys, second) == (False, {"charged_for": second})
    finally:
        conn.close()


def test_inbox_message_ids_differing_by_a_trailing_space_are_distinct_mysql(
    my_tables: tuple[str, list[str]],
) -> None:
    from oncely.messaging.inbox import Inbox

    tag, made = my_tables
    inbox = Inbox(table=f"inbox_{tag}")
    made.append(f"inbox_{tag}")
    conn = _my()
    try:
        inbox.create_table(conn)
        applied = []
        for mid in ["m-1", "m-1 "]:
            with inbox.receive(conn, consumer="billing", message_id=mid) as first:
                applied.append(first)
        assert applied == [True, True]
    finally:
        conn.close()


def test_dedup_ids_differing_by_a_trailing_space_are_distinct_mysql(
    my_tables: tuple[str, list[str]],
) -> None:
    from oncely.messaging.dedup import Deduplicator

    tag, made = my_tables
    made.append(f"dedup_{tag}")
    dedup = Deduplicator(MYSQL_URL, window=60, namespace=f"rt2-{tag}", table=f"dedup_{tag}")
    try:
        assert dedup.filter_new(["x", "x "]) == ["x", "x "]
    finally:
        dedup.close()


def test_insert_once_without_a_unique_constraint_is_refused_mysql(
    my_tables: tuple[str, list[str]],
) -> None:
    from oncely.errors import ConfigurationError
    from oncely.sql import insert_once

    tag, made = my_tables
    orders = f"orders_{tag}"
    made.append(orders)
    conn = _my()
    try:
        cur = conn.cursor()
        # the migration forgot UNIQUE on order_no
        cur.execute(f"CREATE TABLE {orders} (id INT PRIMARY KEY, order_no VARCHAR(20), amount INT)")
        conn.commit()
        created = []
        for i in (1, 2):
            try:
                _, new = insert_once(
                    conn, orders, {"id": i, "order_no": "A-1", "amount": 10}, unique=("order_no",)
                )
            except ConfigurationError:
                conn.rollback()
                return  # refusing, as on SQLite and PostgreSQL, is right
            conn.commit()
            created.append(new)
        cur.execute(f"SELECT COUNT(*) FROM {orders} WHERE order_no = 'A-1'")
        assert (created, cur.fetchone()[0]) == ([True, False], 1)
    finally:
        conn.close()
