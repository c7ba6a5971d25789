"""Red team 18 (F2, F3, F8): a statement oncely sends in the caller's transaction that fails on
PostgreSQL aborts that transaction, and psycopg's ``commit()`` of an aborted transaction sends
``COMMIT``, which the server answers with ``ROLLBACK``, without an error: the caller's earlier
writes were silently gone after a *typed* oncely error (a missing inbox/outbox/barrier table, a
values column that does not exist), after a stale per-connection check (insert_once's unique
constraint dropped, the search_path switched) and raw driver errors came out of insert_once for
refused values.

Now every such mechanism runs its statements through
:func:`oncely.sql.connections.first_use_guarded`: the first use per connection and (mechanism,
table, columns) in a savepoint (the state machine's mechanism), later uses as one plain
statement (no round trip more); a later failure says the transaction is aborted and forgets the
check. Refused values are :class:`~oncely.errors.ValueRefused` through the one translation
:func:`oncely.sql.connections.value_refused` (as ``versioned_update``). Real databases only."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from oncely.errors import BarrierTableMissing, ConfigurationError, OncelyError, ValueRefused
from oncely.messaging.inbox import Inbox
from oncely.messaging.outbox import Outbox
from oncely.sql import insert_once, versioned_update
from oncely.statemachine.barrier import barrier
from oncely.statemachine.barrier import create_table as create_barrier_table

from sql_fixtures import Db

pytest_plugins = ["sql_fixtures"]

KEPT = "still usable"
ABORTED = "aborted the transaction"


def _mark(db: Db) -> str:
    return "?" if db.dialect == "sqlite" else "%s"


def _setup(db: Db) -> tuple[str, Any]:
    """A table with one business column, and a connection whose transaction already wrote
    its row 'earlier'."""
    table = db.name("biz")
    db.run(f"CREATE TABLE {table} (id INTEGER PRIMARY KEY, name VARCHAR(10) NOT NULL UNIQUE)")
    conn = db.connect()
    return table, conn


def _write_earlier(db: Db, conn: Any, table: str, n: int = 1) -> None:
    cur = conn.cursor()
    cur.execute(f"INSERT INTO {table} (id, name) VALUES ({_mark(db)}, {_mark(db)})", (n, f"e{n}"))
    cur.close()


def _ids(db: Db, table: str) -> list[int]:
    return sorted(int(r[0]) for r in db.run(f"SELECT id FROM {table}"))


def _calls(db: Db, table: str) -> dict[str, Callable[[Any], Any]]:
    missing = f"nothere_{db.tag}"
    return {
        "inbox.accept, missing table": lambda c: Inbox(table=missing).accept(c, "c", "m1"),
        "outbox.add, missing table": lambda c: Outbox(table=missing).add(c, "t", b"x"),
        "barrier, missing table": lambda c: barrier(c, "g", "b", "try", table=missing),
        "insert_once, unknown values column": lambda c: insert_once(
            c, table, {"id": 5, "name": "x", "nope": 1}, unique=("name",)
        ),
        # the business table has no version column (rt19 G1)
        "versioned_update, unknown column": lambda c: versioned_update(
            c, table, 1, {"name": "z"}, 1
        ),
        "versioned_update, missing table": lambda c: versioned_update(c, missing, 1, {}, 1),
    }


@pytest.mark.parametrize(
    "case",
    [
        "inbox.accept, missing table",
        "outbox.add, missing table",
        "barrier, missing table",
        "insert_once, unknown values column",
        "versioned_update, unknown column",
        "versioned_update, missing table",
    ],
)
def test_a_typed_error_keeps_the_callers_earlier_write(db: Db, case: str) -> None:
    """F2: the typed error, then the caller's commit(): its earlier write is committed (every
    database; PostgreSQL used to lose it without an error), and the message says so."""
    table, conn = _setup(db)
    _write_earlier(db, conn, table)
    with pytest.raises((ConfigurationError, BarrierTableMissing)) as info:  # UnknownTable/Column
        _calls(db, table)[case](conn)
    if db.dialect == "postgresql":
        assert KEPT in str(info.value), info.value
    # the transaction goes on: another write, then both commit
    _write_earlier(db, conn, table, 2)
    conn.commit()
    assert _ids(db, table) == [1, 2]


def test_later_calls_send_no_savepoint_and_no_extra_round_trip(make_db: Any) -> None:
    """The guard costs the first use per connection and key a SAVEPOINT and a RELEASE; every
    later call is what it was before: one statement, one round trip (counted on the wire)."""
    from roundtrips import PgWire

    db = make_db("postgresql")
    table, conn = _setup(db)
    inbox, outbox = Inbox(table=db.name("ib")), Outbox(table=db.name("ob"))
    inbox.create_table(conn)
    outbox.create_table(conn)
    bar = db.name("bar")
    create_barrier_table(conn, bar)
    vt = db.name("vt")
    conn.execute(f"CREATE TABLE {vt} (id INTEGER PRIMARY KEY, n INTEGER, version BIGINT NOT NULL)")
    conn.execute(f"INSERT INTO {vt} (id, n, version) VALUES (1, 0, 1), (2, 0, 1), (3, 0, 1)")
    conn.commit()
    calls: dict[str, Callable[[int], Any]] = {
        "inbox": lambda n: inbox.accept(conn, "c", f"m{n}"),
        "outbox": lambda n: outbox.add(conn, "t", b"x", message_id=f"m{n}"),
        "barrier": lambda n: barrier(conn, f"g{n}", "b", "try", table=bar),
        "insert_once": lambda n: insert_once(
            conn, table, {"id": 10 + n, "name": f"n{n}"}, unique=("name",)
        ),
        "versioned_update": lambda n: versioned_update(conn, vt, n, {"n": n}, 1),
    }
    for what, call in calls.items():
        _write_earlier(db, conn, table, 100 + len(what))  # a transaction is open
        with PgWire(conn) as first:
            call(1)
        assert "SAVEPOINT" in first.queries[0], (what, first.queries)
        assert "RELEASE" in first.queries[-1], (what, first.queries)
        assert first.trips == 3, (what, first.queries)
        for n in (2, 3):
            with PgWire(conn) as later:
                call(n)
            assert later.trips == 1, (what, later.queries)
            assert not any("SAVEPOINT" in q for q in later.queries), (what, later.queries)
        conn.commit()


def test_insert_once_stale_check_says_aborted_and_checks_again(make_db: Any) -> None:
    """F3: the unique constraint is dropped after a connection's first insert_once. The next
    call fails on the server (no arbiter): the error says the transaction is aborted and must
    be rolled back (it used to say nothing, and commit() dropped the earlier write), and the
    connection forgets its check: after the rollback, the same call runs in a savepoint again,
    so the error leaves the earlier write of the new transaction in place."""
    db = make_db("postgresql")
    table, conn = _setup(db)
    db.run(f"ALTER TABLE {table} ADD COLUMN k VARCHAR(10)")
    db.run(f"ALTER TABLE {table} ADD CONSTRAINT {table}_k UNIQUE (k)")
    insert_once(conn, table, {"id": 50, "name": "a", "k": "a"}, unique=("k",))
    conn.commit()
    db.run(f"ALTER TABLE {table} DROP CONSTRAINT {table}_k")
    _write_earlier(db, conn, table)
    with pytest.raises(ConfigurationError, match="no unique constraint") as info:
        insert_once(conn, table, {"id": 51, "name": "b", "k": "b"}, unique=("k",))
    assert ABORTED in str(info.value) and "roll it back" in str(info.value)
    conn.rollback()
    _write_earlier(db, conn, table)
    with pytest.raises(ConfigurationError, match="no unique constraint") as info:
        insert_once(conn, table, {"id": 51, "name": "b", "k": "b"}, unique=("k",))
    assert KEPT in str(info.value)
    conn.commit()
    assert _ids(db, table) == [1, 50]


def test_insert_once_search_path_switch_says_aborted_and_checks_again(make_db: Any) -> None:
    """F3: the search_path switches to a schema whose same-named table has no unique
    constraint: the remembered check is stale, the error says aborted; after the rollback the
    call is checked again in a savepoint."""
    db = make_db("postgresql")
    table, conn = _setup(db)
    schema = f"sch_{db.tag}"
    db.run(f"CREATE SCHEMA {schema}")
    try:
        db.run(f"CREATE TABLE {schema}.{table} (id INTEGER PRIMARY KEY, name VARCHAR(10))")
        insert_once(conn, table, {"id": 50, "name": "a"}, unique=("name",))
        conn.commit()
        conn.execute(f"SET search_path TO {schema}, public")
        conn.commit()
        conn.execute(f"INSERT INTO {table} (id, name) VALUES (1, 'e')")
        with pytest.raises(ConfigurationError) as info:
            insert_once(conn, table, {"id": 51, "name": "b"}, unique=("name",))
        assert ABORTED in str(info.value)
        conn.rollback()
        conn.execute(f"INSERT INTO {table} (id, name) VALUES (1, 'e')")
        with pytest.raises(ConfigurationError) as info:
            insert_once(conn, table, {"id": 51, "name": "b"}, unique=("name",))
        assert KEPT in str(info.value)
        conn.commit()
        assert db.run(f"SELECT id FROM {schema}.{table}") == [(1,)]
    finally:
        conn.close()
        db.run(f"DROP SCHEMA {schema} CASCADE")


_REFUSED: dict[str, dict[str, Any]] = {
    "value too long": {"id": 7, "name": "y" * 50},
    "NULL into NOT NULL": {"id": 7, "name": None, "other": "q"},
    "bad id type": {"id": "abc", "name": "y"},
    "conflict on another unique column": {"id": 1, "name": "other"},
}


@pytest.mark.parametrize("case", list(_REFUSED))
@pytest.mark.parametrize("warm", [False, True], ids=["first-use", "later-use"])
def test_insert_once_refused_values_are_value_refused(db: Db, case: str, warm: bool) -> None:
    """F8: values the database refuses are ValueRefused (a ValueError, the driver's error as
    __cause__), as versioned_update's, not raw driver errors. On PostgreSQL a first use runs in
    a savepoint (the earlier write is kept, the message says so); a later use is one plain
    statement, and the message says the transaction is aborted and must be rolled back. SQLite
    and MariaDB refuse only the statement: the transaction goes on, nothing is said."""
    table, conn = _setup(db)
    db.run(f"ALTER TABLE {table} ADD COLUMN other VARCHAR(10)")
    values = dict(_REFUSED[case])
    unique = ("other",) if case == "NULL into NOT NULL" else ("name",)
    if unique == ("other",):
        db.run(f"CREATE UNIQUE INDEX {table}_o ON {table} (other)")
    if db.dialect == "sqlite" and case in ("value too long", "bad id type"):
        pytest.skip("SQLite stores any text in a VARCHAR(10) and 'abc' in an INTEGER key")
    if warm:  # the same table and columns once, committed: the check is remembered
        good = {col: {"id": 90}.get(col, "w") for col in values}  # the same columns
        insert_once(conn, table, good, unique=unique)
        conn.commit()
    _write_earlier(db, conn, table)
    with pytest.raises(ValueRefused) as info:
        insert_once(conn, table, values, unique=unique)
    assert isinstance(info.value, ValueError)
    assert info.value.__cause__ is not None
    assert not isinstance(info.value.__cause__, ValueRefused)
    message = str(info.value)
    if db.dialect == "postgresql" and warm:
        assert ABORTED in message and "roll it back" in message, message
        conn.rollback()
        assert _ids(db, table) == [90]
        return
    if db.dialect == "postgresql":
        assert KEPT in message, message
    else:
        assert ABORTED not in message
    conn.commit()
    assert _ids(db, table) == ([1, 90] if warm else [1])


@pytest.mark.parametrize("dialect", ["postgresql", "mysql"])
def test_state_machine_value_refused(make_db: Any, dialect: str) -> None:
    """F8 for the state machine: a state its column cannot hold (longer than the column) is
    ValueRefused, not a raw driver error; the transition ran in a savepoint, the caller's
    earlier write stays."""
    from oncely.statemachine import Machine, Transition
    from oncely.statemachine.sql import SqlStateMachine, Table

    db = make_db(dialect)  # SQLite stores any text in a VARCHAR(3)
    table = db.name("ent")
    db.run(f"CREATE TABLE {table} (id INTEGER PRIMARY KEY, st VARCHAR(3) NOT NULL)")
    db.run(f"INSERT INTO {table} (id, st) VALUES (1, 'a')")
    machine = Machine("rt18", ["a", "toolongstate"], "a", [Transition("go", "a", "toolongstate")])
    sm = SqlStateMachine(machine, Table(table, "id", "st"), history_table=db.name("hist"))
    conn = db.connect()
    sm.create_tables(conn)
    conn.commit()
    cur = conn.cursor()
    cur.execute(f"INSERT INTO {table} (id, st) VALUES (2, 'a')")
    cur.close()
    with pytest.raises(ValueRefused) as info:
        sm.apply(conn, 1, "go")
    assert info.value.__cause__ is not None
    conn.commit()
    assert sorted(r[0] for r in db.run(f"SELECT id FROM {table}")) == [1, 2]


async def test_async_faces_keep_the_callers_earlier_write(make_db: Any) -> None:
    """F2 on psycopg's AsyncConnection: aaccept, aadd, abarrier and ainsert_once go through the
    same guard."""
    from oncely.sql import ainsert_once, aversioned_update
    from oncely.statemachine.barrier import abarrier

    db = make_db("postgresql")
    table = db.name("biz")
    db.run(f"CREATE TABLE {table} (id INTEGER PRIMARY KEY, name VARCHAR(10) NOT NULL UNIQUE)")
    missing = f"nothere_{db.tag}"
    conn = await db.aconnect()
    calls = [
        lambda: Inbox(table=missing).aaccept(conn, "c", "m1"),
        lambda: Outbox(table=missing).aadd(conn, "t", b"x"),
        lambda: abarrier(conn, "g", "b", "try", table=missing),
        lambda: ainsert_once(conn, table, {"id": 5, "name": "x", "nope": 1}, unique=("name",)),
        lambda: aversioned_update(conn, table, 1, {"name": "z"}, 1),  # no version column
        lambda: aversioned_update(conn, missing, 1, {}, 1),
    ]
    for n, call in enumerate(calls, 1):
        await conn.execute(f"INSERT INTO {table} (id, name) VALUES ({n}, 'e{n}')")
        with pytest.raises((ConfigurationError, BarrierTableMissing)) as info:
            await call()
        assert KEPT in str(info.value)
        await conn.commit()
    assert _ids(db, table) == [1, 2, 3, 4, 5, 6]
    await db.aclose()


def _versioned_table(db: Db) -> str:
    vt = db.name("vt")
    db.run(f"CREATE TABLE {vt} (id INTEGER PRIMARY KEY, n INTEGER, version BIGINT NOT NULL)")
    db.run(f"INSERT INTO {vt} (id, n, version) VALUES (1, 0, 1)")
    return vt


def test_versioned_update_later_call_says_aborted_and_checks_again(make_db: Any) -> None:
    """rt19 G1: versioned_update went through no guard: its UnknownColumn / UnknownTable aborted
    the caller's PostgreSQL transaction without saying so, and commit() dropped the earlier
    write. Now the first use per connection and (table, columns) runs in a savepoint; a later
    call that fails (the column dropped since) says the transaction is aborted, and the
    connection checks again after the rollback."""
    from oncely.errors import UnknownColumn

    db = make_db("postgresql")
    table, conn = _setup(db)
    vt = _versioned_table(db)
    assert versioned_update(conn, vt, 1, {"n": 1}, 1) == 2  # warm: remembered
    conn.commit()
    db.run(f"ALTER TABLE {vt} DROP COLUMN n")
    _write_earlier(db, conn, table)
    with pytest.raises(UnknownColumn) as info:
        versioned_update(conn, vt, 1, {"n": 2}, 2)
    assert ABORTED in str(info.value) and "roll it back" in str(info.value), info.value
    conn.rollback()
    _write_earlier(db, conn, table)
    with pytest.raises(UnknownColumn) as info:
        versioned_update(conn, vt, 1, {"n": 2}, 2)
    assert KEPT in str(info.value), info.value
    conn.commit()
    assert _ids(db, table) == [1]


def test_versioned_update_sqlalchemy_connection_keeps_the_earlier_write(db: Db) -> None:
    """rt19 G1 on a SQLAlchemy Connection (pooled: the first use is remembered on the DB-API
    connection): the error keeps the earlier write on every database; on PostgreSQL it says the
    transaction is still usable."""
    import sqlalchemy as sa

    from oncely.errors import UnknownColumn, UnknownTable

    table = db.name("biz")
    db.run(f"CREATE TABLE {table} (id INTEGER PRIMARY KEY, name VARCHAR(10) NOT NULL UNIQUE)")
    engine = sa.create_engine(db.url())
    try:
        with engine.connect() as conn:
            for n, call in enumerate(
                [
                    lambda: versioned_update(conn, table, 1, {"name": "z"}, 1),
                    lambda: versioned_update(conn, f"nothere_{db.tag}", 1, {}, 1),
                ],
                1,
            ):
                conn.execute(sa.text(f"INSERT INTO {table} (id, name) VALUES ({n}, 'e{n}')"))
                with pytest.raises((UnknownColumn, UnknownTable)) as info:
                    call()
                if db.dialect == "postgresql":
                    assert KEPT in str(info.value), info.value
                else:
                    assert ABORTED not in str(info.value)
                conn.commit()
    finally:
        engine.dispose()
    assert _ids(db, table) == [1, 2]


@pytest.mark.parametrize("vendor", ["sqlite", "postgresql", "mysql"])
def test_versioned_update_django_atomic_keeps_the_earlier_write(vendor: str, tmp_path: Any) -> None:
    """rt19 G1 in Django's atomic(): the UnknownColumn caught inside the block, the block exits
    normally and its earlier write is committed (PostgreSQL used to drop it silently)."""
    import subprocess
    import sys
    import uuid
    from pathlib import Path

    pytest.importorskip("django")
    if vendor == "mysql":
        pytest.importorskip("MySQLdb", reason="Django's MySQL backend needs mysqlclient")
    here = Path(__file__).resolve().parent
    tag = uuid.uuid4().hex[:10]
    target = f"sqlite:{tmp_path / 'dj.db'}" if vendor == "sqlite" else vendor
    out = subprocess.run(
        [sys.executable, str(here / "versioned_django_check.py"), target, f"rt19v_{tag}"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=here.parent,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("OK"), out.stdout


def test_versioned_update_driver_refusal_on_a_later_call_says_still_usable(make_db: Any) -> None:
    """A later (unguarded) call whose value psycopg refuses before sending it (a dict): the
    transaction is not aborted, and the message says so (transaction_noted, the one helper of
    these notes); commit() keeps the earlier write."""
    db = make_db("postgresql")
    table, conn = _setup(db)
    vt = _versioned_table(db)
    db.run(f"ALTER TABLE {vt} ADD COLUMN note VARCHAR(20)")
    assert versioned_update(conn, vt, 1, {"note": "a"}, 1) == 2  # warm
    conn.commit()
    _write_earlier(db, conn, table)
    with pytest.raises(ValueRefused) as info:
        versioned_update(conn, vt, 1, {"note": {"a": 1}}, 2)
    assert "still usable" in str(info.value) and ABORTED not in str(info.value), info.value
    conn.commit()
    assert _ids(db, table) == [1]


def test_reap_in_the_callers_transaction_keeps_the_earlier_write(db: Db) -> None:
    """rt19 (the same kind as G1): reap() in the caller's open transaction ran its DELETE with no
    savepoint; on PostgreSQL a missing table aborted the transaction and commit() dropped the
    earlier write. Now its first use per connection and table there is guarded too."""
    from oncely.sql.phases import reap

    table, conn = _setup(db)
    _write_earlier(db, conn, table)
    with pytest.raises(Exception, match="nothere"):
        reap(conn, table=f"nothere_{db.tag}")
    conn.commit()
    assert _ids(db, table) == [1]


# -- red team 20 H3: errors oncely does not type, on a later (unguarded) call -------------------
ABORTED_NOTE_TEXT = "PostgreSQL aborted the transaction"


def _notes(exc: BaseException) -> list[str]:
    return list(getattr(exc, "__notes__", ()))


def _raw_error_tables(db: Db) -> tuple[str, str]:
    """A versioned table and an insert_once table whose other columns the server checks (a
    UNIQUE on another column, a CHECK); on PostgreSQL also a foreign key and a trigger that
    raises."""
    vt, it = db.name("rvt"), db.name("rit")
    db.run(
        f"CREATE TABLE {vt} (id INTEGER PRIMARY KEY, version BIGINT NOT NULL, "
        "email VARCHAR(20) UNIQUE, qty INTEGER CHECK (qty >= 0))"
    )
    db.run(f"INSERT INTO {vt} (id, version, email, qty) VALUES (1, 1, 'a', 5), (2, 1, 'b', 5)")
    db.run(
        f"CREATE TABLE {it} (k VARCHAR(20) PRIMARY KEY, email VARCHAR(20) UNIQUE, "
        "qty INTEGER CHECK (qty >= 0))"
    )
    if db.dialect == "postgresql":
        db.run(f"ALTER TABLE {vt} ADD COLUMN ref INTEGER REFERENCES {vt} (id)")
        db.run(f"ALTER TABLE {vt} ADD COLUMN frozen BOOLEAN")
        db.run(
            f"CREATE FUNCTION {vt}_f() RETURNS trigger AS $$ BEGIN IF NEW.frozen THEN "
            "RAISE EXCEPTION 'account frozen'; END IF; RETURN NEW; END $$ LANGUAGE plpgsql"
        )
        db.run(
            f"CREATE TRIGGER {vt}_t BEFORE UPDATE ON {vt} FOR EACH ROW EXECUTE FUNCTION {vt}_f()"
        )
    return vt, it


def _raw_cases(db: Db, vt: str, it: str) -> dict[str, tuple[Callable[[Any], Any], Any]]:
    """name -> (the failing call, a call on the same key that works: warms the connection)."""
    cases: dict[str, tuple[Callable[[Any], Any], Any]] = {
        "versioned_update, unique on another column": (
            lambda c: versioned_update(c, vt, 1, {"email": "b"}, 2),
            lambda c: versioned_update(c, vt, 1, {"email": "a"}, 1),
        ),
        "versioned_update, check": (
            lambda c: versioned_update(c, vt, 1, {"qty": -1}, 2),
            lambda c: versioned_update(c, vt, 1, {"qty": 5}, 1),
        ),
        "insert_once, unique on another column": (
            lambda c: insert_once(c, it, {"k": "k2", "email": "e1"}, unique=("k",)),
            lambda c: insert_once(c, it, {"k": "k1", "email": "e1"}, unique=("k",)),
        ),
        "insert_once, check": (
            lambda c: insert_once(c, it, {"k": "k2", "qty": -1}, unique=("k",)),
            lambda c: insert_once(c, it, {"k": "k1", "qty": 1}, unique=("k",)),
        ),
    }
    if db.dialect == "postgresql":
        cases["versioned_update, foreign key"] = (
            lambda c: versioned_update(c, vt, 1, {"ref": 99}, 2),
            lambda c: versioned_update(c, vt, 1, {"ref": 2}, 1),
        )
        cases["versioned_update, trigger raise"] = (
            lambda c: versioned_update(c, vt, 1, {"frozen": True}, 2),
            lambda c: versioned_update(c, vt, 1, {"frozen": False}, 1),
        )
    return cases


def test_raw_server_errors_on_a_later_call_say_the_transaction_is_aborted(db: Db) -> None:
    """rt20 H3: on a later (unguarded) call an error oncely does not type (a UNIQUE violation
    on another column, a CHECK, a foreign key, a trigger's RAISE) came out raw with no word
    that PostgreSQL had aborted the caller's transaction, and commit() then dropped its
    earlier write without an error. Now the error keeps its type and message and carries
    the ABORTED note (exc.add_note) on PostgreSQL; SQLite and MariaDB roll back only the
    statement: no note, the earlier write is committed."""
    table, _ = _setup(db)
    vt, it = _raw_error_tables(db)
    cases = _raw_cases(db, vt, it)
    expected = []
    for n, (name, (fail, warm)) in enumerate(cases.items(), 1):
        db.run(f"DELETE FROM {it}")
        db.run(f"UPDATE {vt} SET version = 1, email = 'a', qty = 5 WHERE id = 1")
        if db.dialect == "postgresql":
            db.run(f"UPDATE {vt} SET ref = NULL, frozen = NULL WHERE id = 1")
        conn = db.connect()
        warm(conn)  # remembered: the next call is one plain statement
        conn.commit()
        _write_earlier(db, conn, table, n)
        with pytest.raises(Exception) as info:
            fail(conn)
        notes = _notes(info.value)
        if isinstance(info.value, OncelyError):  # typed by oncely: the note is in its message
            assert not notes, (name, notes)
            said = ABORTED in str(info.value)
        else:  # the driver's own error, its type kept
            assert type(info.value).__module__.split(".")[0] in ("psycopg", "pymysql", "sqlite3")
            assert len(notes) <= 1, notes
            said = any(ABORTED_NOTE_TEXT in x for x in notes)
        if db.dialect == "postgresql":
            assert said, (name, repr(info.value), notes)
            conn.rollback()
        else:
            assert not said, (name, repr(info.value), notes)
            conn.commit()
            expected.append(n)
        conn.close()
    assert _ids(db, table) == expected


def test_raw_server_error_on_a_first_use_is_not_noted_aborted(make_db: Any) -> None:
    """The first use ran in a savepoint, rolled back: the transaction is not aborted, so no
    ABORTED note, and commit() keeps the earlier write."""
    db = make_db("postgresql")
    table, conn = _setup(db)
    vt, _ = _raw_error_tables(db)
    _write_earlier(db, conn, table)
    with pytest.raises(Exception) as info:
        versioned_update(conn, vt, 1, {"qty": -1}, 1)
    assert not any(ABORTED_NOTE_TEXT in x for x in _notes(info.value))
    conn.commit()
    assert _ids(db, table) == [1]


def test_raw_server_error_later_call_sqlalchemy_says_aborted(make_db: Any) -> None:
    """rt20 H3 through SQLAlchemy (Connection and Session): the wrapped error
    (sqlalchemy.exc.IntegrityError) keeps its type and carries the ABORTED note."""
    import sqlalchemy as sa
    from sqlalchemy.orm import Session

    db = make_db("postgresql")
    vt, _ = _raw_error_tables(db)
    engine = sa.create_engine(db.url(), pool_size=1, max_overflow=0)
    try:
        for kind in ("connection", "session"):
            db.run(f"UPDATE {vt} SET version = 1, email = 'a' WHERE id = 1")
            holder: Any = engine.connect() if kind == "connection" else Session(engine)
            with holder as conn:
                versioned_update(conn, vt, 1, {"email": "a"}, 1)  # warm
                conn.commit()
                with pytest.raises(sa.exc.IntegrityError) as info:
                    versioned_update(conn, vt, 1, {"email": "b"}, 2)
                assert any(ABORTED_NOTE_TEXT in x for x in _notes(info.value)), kind
                conn.rollback()
    finally:
        engine.dispose()


async def test_cancelled_later_call_says_the_transaction_is_aborted(make_db: Any) -> None:
    """rt20 H3: asyncio.wait_for cancelling a later aversioned_update waiting on a row lock:
    psycopg cancels the statement, PostgreSQL aborts the transaction (commit() would drop the
    earlier write). The CancelledError (the TimeoutError's cause) carries the ABORTED note."""
    import asyncio

    from oncely.sql import aversioned_update

    db = make_db("postgresql")
    table, _ = _setup(db)
    vt, _ = _raw_error_tables(db)
    conn = await db.aconnect()
    await aversioned_update(conn, vt, 2, {"qty": 1}, 1)  # warm
    await conn.commit()
    holder = db.connect()
    holder.execute(f"SELECT id FROM {vt} WHERE id = 1 FOR UPDATE")
    try:
        await conn.execute(f"INSERT INTO {table} (id, name) VALUES (1, 'e1')")
        with pytest.raises((asyncio.TimeoutError, asyncio.CancelledError)) as info:
            await asyncio.wait_for(aversioned_update(conn, vt, 1, {"qty": 2}, 1), 0.3)
        assert conn.info.transaction_status.name == "INERROR"
        chain = [info.value, info.value.__cause__, info.value.__context__]
        assert any(
            e is not None and any(ABORTED_NOTE_TEXT in x for x in _notes(e)) for e in chain
        ), [(type(e), _notes(e)) for e in chain if e is not None]
        await conn.rollback()
    finally:
        holder.rollback()
        holder.close()
        await db.aclose()


def test_sqlalchemy_new_session_per_call_sends_no_savepoint_after_the_first(make_db: Any) -> None:
    """rt20 H5: the first-use memory under a SQLAlchemy Session was kept on the Session, so a
    new Session per unit of work (the usual pattern) sent SAVEPOINT + statement + RELEASE on
    every call. Now it is kept on the pooled DB-API connection: after the first call, one
    statement per call (versioned_update, insert_once, inbox.accept)."""
    import sqlalchemy as sa
    from sqlalchemy.orm import Session

    from roundtrips import PgWire

    db = make_db("postgresql")
    table = db.name("biz")
    db.run(f"CREATE TABLE {table} (id INTEGER PRIMARY KEY, name VARCHAR(10) NOT NULL UNIQUE)")
    vt = _versioned_table(db)
    db.run(f"INSERT INTO {vt} (id, n, version) VALUES (2, 0, 1), (3, 0, 1), (4, 0, 1)")
    inbox = Inbox(table=db.name("ib"))
    setup = db.connect()
    inbox.create_table(setup)
    setup.commit()
    engine = sa.create_engine(db.url(), pool_size=1, max_overflow=0)
    calls: dict[str, Callable[[Any, int], Any]] = {
        "versioned_update": lambda s, n: versioned_update(s, vt, n, {"n": n}, 1),
        "insert_once": lambda s, n: insert_once(
            s, table, {"id": n, "name": f"n{n}"}, unique=("name",)
        ),
        "inbox.accept": lambda s, n: inbox.accept(s, "c", f"m{n}"),
    }
    try:
        for what, call in calls.items():
            per_call = []
            for n in (1, 2, 3, 4):
                with Session(engine) as session:
                    session.execute(sa.text("SELECT 1"))  # the transaction is open
                    driver = session.connection().connection.dbapi_connection
                    with PgWire(driver) as wire:
                        call(session, n)
                    per_call.append(wire.trips)
                    assert (n == 1) == any("SAVEPOINT" in q for q in wire.queries), wire.queries
                    session.commit()
            assert per_call == [3, 1, 1, 1], (what, per_call)
    finally:
        engine.dispose()


def test_sqlalchemy_async_connection_reused_sends_no_savepoint_after_the_first(
    make_db: Any,
) -> None:
    """rt21 I3: SQLAlchemy's async dialects pool an adapter that takes no weak reference, so
    the first-use memory under an ``AsyncConnection`` never stuck: SAVEPOINT + statement +
    RELEASE on every call. It is kept on the driver's connection under the adapter now."""
    import asyncio

    import sqlalchemy as sa
    from sqlalchemy.ext.asyncio import create_async_engine

    from oncely.sql import aversioned_update
    from roundtrips import PgWire

    db = make_db("postgresql")
    vt = _versioned_table(db)
    db.run(f"INSERT INTO {vt} (id, n, version) VALUES (2, 0, 1), (3, 0, 1), (4, 0, 1)")

    async def scenario() -> list[int]:
        engine = create_async_engine(db.url(), pool_size=1, max_overflow=0)
        per_call = []
        try:
            async with engine.connect() as conn:
                raw = await conn.get_raw_connection()
                driver = raw.driver_connection
                for n in (1, 2, 3, 4):
                    async with conn.begin():
                        await conn.execute(sa.text("SELECT 1"))  # the transaction is open
                        with PgWire(driver) as wire:
                            await aversioned_update(conn, vt, n, {"n": n}, 1)
                        per_call.append(wire.trips)
        finally:
            await engine.dispose()
        return per_call

    per_call = asyncio.run(scenario())
    assert per_call == [3, 1, 1, 1], per_call
