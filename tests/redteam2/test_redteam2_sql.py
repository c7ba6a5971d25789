"""Red-team findings (redteam2) on oncely.sql: each test failed before branch fix2 (xfail reasons:
git history). Real SQLite files, PostgreSQL and MariaDB."""

from __future__ import annotations

import sqlite3
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import oncely.sql
from oncely.errors import ConfigurationError, StaleVersion
from oncely.sql import GLOBAL, Operation, create_tables, transaction, versioned_update

PG_URL = "postgresql://postgres@127.0.0.1:5432/test"
APP = "oncely-redteam2"


def _pg(**options: Any) -> Any:
    import psycopg

    return psycopg.connect(PG_URL, application_name=APP, **options)


def _my() -> Any:
    import pymysql

    return pymysql.connect(host="127.0.0.1", port=3306, user="root", database="test")


@pytest.fixture
def tag() -> str:
    return uuid.uuid4().hex[:10]


@pytest.fixture
def lite(tmp_path: Path) -> Iterator[sqlite3.Connection]:
    conn = sqlite3.connect(tmp_path / "rt2.db")
    yield conn
    conn.close()


class Dropper:
    def __init__(self) -> None:
        self.items: list[tuple[Any, str]] = []

    def add(self, connect: Any, table: str) -> str:
        self.items.append((connect, table))
        return table


@pytest.fixture
def dropper() -> Iterator[Dropper]:
    d = Dropper()
    yield d
    for connect, table in d.items:
        conn = connect()
        try:
            conn.rollback()
            cur = conn.cursor()
            cur.execute(f"DROP TABLE IF EXISTS {table}")
            conn.commit()
        finally:
            conn.close()


def _pay(conn: Any, key: str, scope: object, amount: int) -> tuple[bool, Any]:
    with transaction(conn, operation="test.op", key=key, scope=scope) as tx:
        if tx.replayed:
            return True, tx.result
        conn.execute("INSERT INTO payments (amount) VALUES (?)", (amount,))
        tx.set_result({"amount": amount})
    return False, tx.result


def test_scope_star_is_not_the_global_key_space(lite: sqlite3.Connection) -> None:
    lite.execute("CREATE TABLE payments (id INTEGER PRIMARY KEY, amount INT)")
    create_tables(lite)
    assert _pay(lite, "order-1", GLOBAL, 100) == (False, {"amount": 100})
    # a different caller whose tenant id happens to be "*" must get its own key space
    replayed, result = _pay(lite, "order-1", "*", 5)
    assert not replayed and result == {"amount": 5}
    assert lite.execute("SELECT COUNT(*) FROM payments").fetchone() == (2,)


def test_transaction_on_an_operation_key_does_not_replay_its_envelope(
    lite: sqlite3.Connection,
) -> None:
    create_tables(lite)
    op = Operation(f"op_{uuid.uuid4().hex[:6]}")

    @op.phase("only")
    def only(ctx: Any) -> dict[str, Any]:
        return {"op": True}

    assert op.run(lite, key="shared", scope="s", params={"a": 1}) == {"op": True}
    # transaction() keys carry their operation's name: the Operation's key is another record
    with transaction(lite, operation="test.op", key="shared", scope="s") as tx:
        replayed, result = tx.replayed, tx.result
    assert not replayed and result is None, f"replayed {result!r}, the operation's envelope"


def test_mysql_case_variant_version_column_cannot_reset_the_version(
    tag: str, dropper: Dropper
) -> None:
    t = dropper.add(_my, f"acc_{tag}")
    conn = _my()
    try:
        cur = conn.cursor()
        cur.execute(
            f"CREATE TABLE {t} (id INT PRIMARY KEY, balance INT NOT NULL, "
            "version BIGINT NOT NULL DEFAULT 1)"
        )
        cur.execute(f"INSERT INTO {t} VALUES (7, 100, 1)")
        conn.commit()
        # writer A read version 1, sends a body that also names "Version" (an HTTP PATCH
        # body passed as changes, as docs/optimistic.md's handler does)
        try:
            new = versioned_update(conn, t, 7, {"balance": 70, "Version": 0}, 1)
        except ConfigurationError:
            conn.rollback()
            return  # refusing the version column in any case is the right answer
        conn.commit()
        assert new == 2
        cur.execute(f"SELECT version FROM {t} WHERE id = 7")
        stored = cur.fetchone()[0]
        conn.commit()
        # writer B also read version 1: it must lose
        with pytest.raises(StaleVersion):
            versioned_update(conn, t, 7, {"balance": 50}, 1)
        conn.rollback()
        assert stored == new
    finally:
        conn.close()


def test_case_variant_id_column_is_refused_sqlite(lite: sqlite3.Connection) -> None:
    lite.execute(
        "CREATE TABLE acc (id INTEGER PRIMARY KEY, balance INT, version INT NOT NULL DEFAULT 1)"
    )
    lite.execute("INSERT INTO acc VALUES (7, 100, 1)")
    lite.commit()
    with pytest.raises(ConfigurationError):
        versioned_update(lite, "acc", 7, {"ID": 8}, 1)
    lite.rollback()
    assert lite.execute("SELECT id FROM acc").fetchall() == [(7,)]


def test_huge_expected_version_is_stale_not_overflow_sqlite(lite: sqlite3.Connection) -> None:
    lite.execute(
        "CREATE TABLE acc (id INTEGER PRIMARY KEY, balance INT, version INT NOT NULL DEFAULT 1)"
    )
    lite.execute("INSERT INTO acc VALUES (7, 100, 1)")
    lite.commit()
    from oncely.http.conditional import version_of

    expected = version_of('"9999999999999999999"')
    assert expected is not None  # the HTTP layer hands this to versioned_update
    with pytest.raises(StaleVersion):
        versioned_update(lite, "acc", 7, {"balance": 1}, expected)


def test_reap_refuses_a_negative_retention(lite: sqlite3.Connection) -> None:
    lite.execute("CREATE TABLE payments (id INTEGER PRIMARY KEY, amount INT)")
    create_tables(lite)
    _pay(lite, "k-1", "u", 10)
    with pytest.raises(ConfigurationError):
        oncely.sql.reap(lite, retention=-1)
    lite.rollback()
    assert _pay(lite, "k-1", "u", 10) == (True, {"amount": 10})
    assert lite.execute("SELECT COUNT(*) FROM payments").fetchone() == (1,)


def test_wait_false_restores_the_sessions_lock_wait_timeout_mysql(
    tag: str, dropper: Dropper
) -> None:
    keys = dropper.add(_my, f"okeys_{tag}")
    conn = _my()
    try:
        create_tables(conn, table=keys)
        cur = conn.cursor()
        cur.execute("SET SESSION innodb_lock_wait_timeout = 3")
        with transaction(
            conn, operation="test.op", key="a", scope="s", table=keys, wait=False
        ) as tx:
            tx.set_result(1)
        cur.execute("SELECT @@SESSION.innodb_lock_wait_timeout")
        assert cur.fetchone()[0] == 3
    finally:
        conn.close()


def test_wait_false_keeps_the_callers_lock_timeout_postgresql(tag: str, dropper: Dropper) -> None:
    keys = dropper.add(_pg, f"okeys_{tag}")
    conn = _pg()
    try:
        create_tables(conn, table=keys)
        with conn.transaction():
            conn.execute("SET LOCAL lock_timeout = '3s'")
            with transaction(
                conn, operation="test.op", key="z", scope="s", table=keys, wait=False
            ) as tx:
                tx.set_result(1)
            row = conn.execute("SHOW lock_timeout").fetchone()
            assert row is not None and row[0] == "3s"
    finally:
        conn.close()


def _ledger(lite: sqlite3.Connection) -> tuple[Any, Any]:
    lite.execute("CREATE TABLE ledger (id INTEGER PRIMARY KEY, kind TEXT, amount INT)")
    create_tables(lite)

    @oncely.sql.idempotent_transaction(key="request_id", scope="user")
    def transfer(conn: Any, user: str, request_id: str, amount: int) -> int:
        sql = "INSERT INTO ledger (kind, amount) VALUES ('transfer', ?)"
        return int(conn.execute(sql, (amount,)).lastrowid)

    @oncely.sql.idempotent_transaction(key="request_id", scope="user")
    def refund(conn: Any, user: str, request_id: str, amount: int) -> int:
        sql = "INSERT INTO ledger (kind, amount) VALUES ('refund', ?)"
        return int(conn.execute(sql, (amount,)).lastrowid)

    return transfer, refund


def test_two_decorated_functions_do_not_share_a_key_space(lite: sqlite3.Connection) -> None:
    transfer, refund = _ledger(lite)
    assert transfer(lite, user="u1", request_id="req-1", amount=5) == 1
    refund_id = refund(lite, user="u1", request_id="req-1", amount=5)
    kinds = [r[0] for r in lite.execute("SELECT kind FROM ledger ORDER BY id")]
    assert kinds == ["transfer", "refund"], f"refund() returned {refund_id} and wrote nothing"


def test_decorator_key_reused_with_other_arguments_is_a_mismatch(
    lite: sqlite3.Connection,
) -> None:
    from oncely.errors import IdempotencyKeyMismatch

    transfer, _ = _ledger(lite)
    transfer(lite, user="u1", request_id="req-2", amount=7)
    with pytest.raises(IdempotencyKeyMismatch):
        transfer(lite, user="u1", request_id="req-2", amount=999)
