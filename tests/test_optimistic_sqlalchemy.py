"""SQLAlchemy's version_id_col and its bulk-UPDATE trap, on real SQLite, PostgreSQL and MariaDB:
unguarded, a bulk update followed by a stale object's flush loses the bulk change (asserted);
guarded, the bulk update bumps the version (the stale flush fails) or is refused."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import BigInteger, create_engine, select, update
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column
from sqlalchemy.orm.exc import StaleDataError

from oncely.errors import ConfigurationError, StaleVersion, VersionBypass
from oncely.optimistic import retry_on_conflict
from oncely.sql.sqlalchemy import guard_versioned, guarded_tables, unguard_versioned

from sql_fixtures import Db

pytest_plugins = ["sql_fixtures"]


def _models(db: Db) -> tuple[Any, Any, Any]:
    class Base(DeclarativeBase):
        pass

    class Account(Base):
        __tablename__ = db.name("sa_acct")
        id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
        balance: Mapped[int] = mapped_column(BigInteger)
        version: Mapped[int] = mapped_column(BigInteger, nullable=False)
        __mapper_args__ = {"version_id_col": version}

    class Plain(Base):  # not versioned: never touched by the guard
        __tablename__ = db.name("sa_plain")
        id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
        n: Mapped[int] = mapped_column(BigInteger)

    return Base, Account, Plain


def _setup(db: Db) -> tuple[Any, Any, Any, Any]:
    Base, Account, Plain = _models(db)
    engine = create_engine(db.url())
    Base.metadata.create_all(engine)
    with Session(engine) as s, s.begin():
        s.add_all([Account(id=1, balance=0), Plain(id=1, n=0)])
    return engine, Base, Account, Plain


def _row(engine: Any, Account: Any) -> tuple[int, int]:
    with engine.connect() as c:
        balance, version = c.execute(select(Account.balance, Account.version)).one()
    return balance, version


def _loaded(session: Session, Account: Any) -> Any:
    """Row 1 as loaded now, detached with its state (the read transaction ended)."""
    obj = session.get(Account, 1)
    session.expunge(obj)
    session.rollback()
    return obj


def _stale_flush_after_bulk(engine: Any, Account: Any) -> None:
    stale = Session(engine)
    obj = _loaded(stale, Account)  # version 1, balance 0
    with Session(engine) as s, s.begin():
        s.execute(update(Account).where(Account.id == 1).values(balance=500))
    stale.add(obj)
    obj.balance = obj.balance + 1  # computed from what it read before the bulk update
    try:
        stale.commit()
    finally:
        stale.close()


def test_version_id_col_catches_a_concurrent_flush(db: Db) -> None:
    engine, _, Account, _ = _setup(db)
    try:
        s1, s2 = Session(engine), Session(engine)
        a1, a2 = s1.get(Account, 1), _loaded(s2, Account)
        a1.balance = 1
        s1.commit()
        s2.add(a2)
        a2.balance = 2
        with pytest.raises(StaleDataError):
            s2.commit()
        s1.close(), s2.close()
        assert _row(engine, Account) == (1, 2)
    finally:
        engine.dispose()


def test_unguarded_bulk_update_is_lost_to_a_stale_flush(db: Db) -> None:
    """The trap, as SQLAlchemy 2 behaves: no StaleDataError, the bulk change is gone."""
    engine, _, Account, _ = _setup(db)
    try:
        _stale_flush_after_bulk(engine, Account)
        assert _row(engine, Account) == (1, 2)  # 500 overwritten by 0 + 1
    finally:
        engine.dispose()


def test_guard_bumps_so_the_stale_flush_fails(db: Db) -> None:
    engine, Base, Account, Plain = _setup(db)
    tables = guard_versioned(Base)
    try:
        assert [t.name for t in tables] == [Account.__tablename__]
        assert guarded_tables()[Account.__tablename__] == "bump"
        with pytest.raises(StaleDataError):
            _stale_flush_after_bulk(engine, Account)
        assert _row(engine, Account) == (500, 2)  # the bulk change stands, version moved
        # Core statements too, with values() or with execution parameters
        with engine.begin() as c:
            c.execute(update(Account.__table__).values(balance=7))
            c.execute(update(Account.__table__), {"balance": 8})
        assert _row(engine, Account) == (8, 4)
        # a statement that sets the version itself is left alone; so is the opt-out
        with engine.begin() as c:
            c.execute(update(Account.__table__).values(balance=9, version=Account.version + 10))
            c.execute(
                update(Account.__table__)
                .values(balance=10)
                .execution_options(oncely_unversioned=True)
            )
        assert _row(engine, Account) == (10, 14)
        # the unit of work and bulk-by-primary-key keep their own check
        with Session(engine) as s, s.begin():
            s.get(Account, 1).balance = 11
        with Session(engine) as s, s.begin():
            s.execute(update(Account), [{"id": 1, "balance": 12, "version": 15}])
        assert _row(engine, Account) == (12, 16)
        with engine.begin() as c:  # an unversioned table is untouched
            c.execute(update(Plain.__table__).values(n=5))
    finally:
        unguard_versioned(Base)
        engine.dispose()


def test_guard_refuses_and_nothing_is_written(db: Db) -> None:
    engine, _, Account, _ = _setup(db)
    guard_versioned(Account, on_bulk="refuse")
    try:
        with pytest.raises(VersionBypass, match="version"), Session(engine) as s, s.begin():
            s.execute(update(Account).where(Account.id == 1).values(balance=500))
        with pytest.raises(VersionBypass), engine.begin() as c:
            c.execute(update(Account.__table__), {"balance": 8})
        assert _row(engine, Account) == (0, 1)
    finally:
        unguard_versioned(Account)
        engine.dispose()


def test_bad_targets_are_configuration_errors(db: Db) -> None:
    _, _, Plain = _models(db)
    with pytest.raises(ConfigurationError, match="version_id_col"):
        guard_versioned(Plain)
    with pytest.raises(ConfigurationError):
        guard_versioned(42)
    _, Account, _ = _models(db)
    with pytest.raises(ConfigurationError):
        guard_versioned(Account, on_bulk="ignore")  # type: ignore[arg-type]


def test_stale_data_error_retried_by_retry_on_conflict(db: Db) -> None:
    engine, _, Account, _ = _setup(db)
    loaded = Session(engine)
    stale = _loaded(loaded, Account)
    attempts = 0

    @retry_on_conflict(retry_on=(StaleVersion, StaleDataError), base_delay=0.0)
    def deposit() -> None:
        nonlocal attempts
        attempts += 1
        with Session(engine) as s, s.begin():
            obj = s.merge(stale, load=False) if attempts == 1 else s.get(Account, 1)
            obj.balance = obj.balance + 5

    try:
        with engine.begin() as c:  # someone else moves the row on: the first attempt is stale
            c.execute(update(Account.__table__).values(balance=1, version=2))
        deposit()
        assert attempts == 2
        assert _row(engine, Account) == (6, 3)
    finally:
        loaded.close()
        engine.dispose()


async def test_async_engine_is_guarded(make_db: Any) -> None:
    db = make_db("postgresql")
    engine, Base, Account, _ = _setup(db)
    engine.dispose()
    guard_versioned(Base)
    aengine = create_async_engine(db.url("async"))
    try:
        async with AsyncSession(aengine) as s, s.begin():
            await s.execute(update(Account).where(Account.id == 1).values(balance=3))
        async with aengine.connect() as c:
            row = (await c.execute(select(Account.balance, Account.version))).one()
        assert tuple(row) == (3, 2)
    finally:
        unguard_versioned(Base)
        await aengine.dispose()


def _unmoved_statements(Account: Any) -> list[Any]:
    """UPDATEs whose version "assignment" is the version itself: it does not move."""
    from sqlalchemy import cast, column, type_coerce

    table = Account.__table__
    return [
        update(Account).where(Account.id == 1).values(balance=500, version=Account.version),
        update(table).values(balance=500, version=table.c.version),
        update(table).values({table.c.version: table.c.version, "balance": 500}),
        update(table).values(balance=500, version=column("version")),
        update(table).values(balance=500, version=table.c.version.label("v")),
        update(table).values(balance=500, version=cast(table.c.version, BigInteger)),
        update(table).values(balance=500, version=type_coerce(Account.version, BigInteger)),
        update(table).values(balance=500, version=table.c.version.self_group()),
    ]


def test_version_set_to_itself_does_not_count(db: Db) -> None:
    """red team 17 #2: update(Account).values(balance=0, version=Account.version) passed the
    guard as "sets the version itself", but the version never moved: an object loaded before
    flushed without StaleDataError and overwrote the bulk change. As Django's guard treats
    version=F("version"): it does not count; the guard bumps it (or refuses it)."""
    engine, Base, Account, _ = _setup(db)
    guard_versioned(Base)
    try:
        for i, stmt in enumerate(_unmoved_statements(Account)):
            stale = Session(engine)
            obj = _loaded(stale, Account)
            with Session(engine) as s, s.begin():
                s.execute(stmt)
            stale.add(obj)
            obj.balance = obj.balance + 1
            with pytest.raises(StaleDataError):
                stale.commit()
            stale.close()
            assert _row(engine, Account) == (500, i + 2), stmt  # the bulk change stands
        unguard_versioned(Base)
        guard_versioned(Account, on_bulk="refuse")
        before = _row(engine, Account)
        for stmt in _unmoved_statements(Account):
            with pytest.raises(VersionBypass, match="does not count"), engine.begin() as c:
                c.execute(stmt)
        assert _row(engine, Account) == before
        with engine.begin() as c:  # a version that moves is the caller's own: left alone
            c.execute(update(Account.__table__).values(version=Account.version + 1))
        assert _row(engine, Account) == (before[0], before[1] + 1)
    finally:
        unguard_versioned(Base)
        unguard_versioned(Account)
        engine.dispose()
