"""VersionedModel on Django's ORM (SQLite and PostgreSQL): save() checks and bumps the version,
save(update_fields=...) and QuerySet.update() cannot skip it (the trap is shown first), and 100
concurrent increments through save() + retry_on_conflict end at exactly +100."""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from django.db import connections, models
from django.db.models import F

from oncely.errors import ConfigurationError, NotFound, StaleVersion, VersionBypass
from oncely.optimistic import retry_on_conflict

# isort: off
from http_apps import django_site  # configures Django before a model is declared
from oncely.contrib.django.versioned import VersionedModel

# isort: on

pytestmark = pytest.mark.timeout(120)
TAG = uuid.uuid4().hex[:8]


class Account(VersionedModel):
    balance = models.BigIntegerField(default=0)

    class Meta:
        app_label = "contenttypes"  # an installed app without oncely's migrations
        db_table = f"opt_dj_acct_{TAG}"


class StrictAccount(VersionedModel):
    balance = models.BigIntegerField(default=0)
    oncely_on_bulk = "refuse"

    class Meta:
        app_label = "contenttypes"
        db_table = f"opt_dj_strict_{TAG}"


@pytest.fixture(params=["default", "pg"])
def alias(request: pytest.FixtureRequest) -> Iterator[str]:
    name: str = request.param
    schema = django_site.PG_SCHEMA
    if name == "pg":
        import psycopg

        from conftest import POSTGRES_URL

        with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
            conn.execute(f"CREATE SCHEMA IF NOT EXISTS {schema}")
    with connections[name].schema_editor() as editor:
        editor.create_model(Account)
        editor.create_model(StrictAccount)
    try:
        yield name
    finally:
        with connections[name].schema_editor() as editor:
            editor.delete_model(Account)
            editor.delete_model(StrictAccount)
        connections[name].close()
        if name == "pg":
            import psycopg

            from conftest import POSTGRES_URL

            with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
                conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")


def _row(alias: str, model: Any = Account) -> tuple[int, int]:
    obj = model.objects.using(alias).get(pk=1)
    return obj.balance, obj.version


def test_save_checks_and_bumps_the_version(alias: str) -> None:
    a = Account.objects.using(alias).create(id=1, balance=0)
    assert a.version == 1
    b = Account.objects.using(alias).get(pk=1)
    a.balance = 10
    a.save(using=alias)
    assert a.version == 2
    b.balance = 99
    with pytest.raises(StaleVersion) as info:
        b.save(using=alias)
    assert (info.value.expected, info.value.current) == (1, 2)
    assert b.version == 1  # the failed save leaves the instance as it was
    assert _row(alias) == (10, 2)
    b.refresh_from_db(using=alias)
    b.balance = 11
    b.save(using=alias)
    assert _row(alias) == (11, 3)


def test_update_fields_without_the_version_still_checks_it(alias: str) -> None:
    Account.objects.using(alias).create(id=1, balance=0)
    a = Account.objects.using(alias).get(pk=1)
    b = Account.objects.using(alias).get(pk=1)
    a.balance = 5
    a.save(using=alias, update_fields=["balance"])  # django-concurrency's FAQ case
    assert a.version == 2 and _row(alias) == (5, 2)
    b.balance = 7
    with pytest.raises(StaleVersion):
        b.save(using=alias, update_fields=["balance"])
    assert _row(alias) == (5, 2)


def test_the_queryset_update_trap_and_its_guard(alias: str) -> None:
    Account.objects.using(alias).create(id=1, balance=0)
    # The trap: a bulk update that does not move the version is lost to a stale save.
    stale = Account.objects.using(alias).get(pk=1)
    Account.objects.using(alias).filter(pk=1).update_unversioned(balance=500)
    stale.balance += 1
    stale.save(using=alias)
    assert _row(alias) == (1, 2), "the unguarded bulk change should have been lost"
    # Guarded: update() bumps the version, so the stale save fails and the bulk change stays.
    stale = Account.objects.using(alias).get(pk=1)
    assert Account.objects.using(alias).filter(pk=1).update(balance=500) == 1
    stale.balance += 1
    with pytest.raises(StaleVersion):
        stale.save(using=alias)
    assert _row(alias) == (500, 3)
    # An update that sets the version itself is left alone.
    Account.objects.using(alias).filter(pk=1).update(balance=501, version=F("version") + 5)
    assert _row(alias) == (501, 8)


def test_bulk_update_bumps_and_reads_the_versions_back(alias: str) -> None:
    objs = [Account.objects.using(alias).create(id=i, balance=0) for i in (1, 2)]
    stale = Account.objects.using(alias).get(pk=1)
    for o in objs:
        o.balance = 9
    Account.objects.using(alias).bulk_update(objs, ["balance"])
    assert [o.version for o in objs] == [2, 2]
    with pytest.raises(StaleVersion):
        stale.save(using=alias)
    objs[0].balance = 10
    objs[0].save(using=alias)  # the instances carry their new version
    assert _row(alias) == (10, 3)


def test_refuse_mode_writes_nothing(alias: str) -> None:
    StrictAccount.objects.using(alias).create(id=1, balance=0)
    with pytest.raises(VersionBypass, match="update"):
        StrictAccount.objects.using(alias).filter(pk=1).update(balance=5)
    with pytest.raises(VersionBypass, match="update"):  # "sets the version" to itself
        StrictAccount.objects.using(alias).filter(pk=1).update(balance=5, version=F("version"))
    assert _row(alias, StrictAccount) == (0, 1)
    # bulk_update() is checked row by row now: no bypass, so refuse mode lets it through
    obj = StrictAccount.objects.using(alias).get(pk=1)
    obj.balance = 6
    assert StrictAccount.objects.using(alias).bulk_update([obj], ["balance"]) == 1
    assert _row(alias, StrictAccount) == (6, 2) and obj.version == 2


# -- red team round 5: bulk_update() and delete() of a stale instance ------------------------
def test_stale_bulk_update_raises_and_writes_nothing(alias: str) -> None:
    """A stale bulk_update() overwrote a concurrent save(): balance 50 at version 2 became 10
    at version 3, no StaleVersion. Now every row is compared in the UPDATE itself; one stale
    row and nothing of the call is written, the error names it."""
    objs = [Account.objects.using(alias).create(id=i, balance=100) for i in (1, 2, 3)]
    other = Account.objects.using(alias).get(pk=2)
    other.balance = 50
    other.save(using=alias)
    for o in objs:
        o.balance = 10
    with pytest.raises(StaleVersion) as info:
        Account.objects.using(alias).bulk_update(objs, ["balance"], batch_size=1)
    assert info.value.expected == {2: 1} and info.value.current == {2: 2}
    assert "pk in [2]" in info.value.entity
    rows = dict(Account.objects.using(alias).values_list("pk", "balance"))
    assert rows == {1: 100, 2: 50, 3: 100}  # batch 1 rolled back with the rest
    assert [o.version for o in objs] == [1, 1, 1]  # the instances are left as loaded
    assert _row(alias) == (100, 1)


@pytest.mark.parametrize("batch_size", [None, 2])
def test_stale_bulk_update_reports_only_the_stale_rows(alias: str, batch_size: int | None) -> None:
    """Red team 6: only row 3 moved on, but the error, read inside the failed transaction
    that saw its own bumps, said rows 1-5 were at version 2. Now read after the rollback."""
    objs = [Account.objects.using(alias).create(id=i, balance=100) for i in range(1, 6)]
    other = Account.objects.using(alias).get(pk=3)
    other.balance = 50
    other.save(using=alias)
    for o in objs:
        o.balance = 10
    with pytest.raises(StaleVersion) as info:
        Account.objects.using(alias).bulk_update(objs, ["balance"], batch_size=batch_size)
    assert info.value.expected == {3: 1} and info.value.current == {3: 2}
    assert "pk in [3]" in info.value.entity
    assert dict(Account.objects.using(alias).values_list("pk", "version")) == {
        1: 1,
        2: 1,
        3: 2,
        4: 1,
        5: 1,
    }


def test_bulk_update_leaves_rows_its_queryset_filters_out(alias: str) -> None:
    """Rows this queryset's own filter excludes are left alone, as Django does, not taken for
    stale (they are at their version); the others are written and bumped."""
    objs = [Account.objects.using(alias).create(id=i, balance=i) for i in range(1, 4)]
    for o in objs:
        o.balance = 7
    qs = Account.objects.using(alias).filter(balance__gte=2)
    assert qs.bulk_update(objs, ["balance"]) == 2
    assert dict(Account.objects.using(alias).values_list("pk", "version")) == {1: 1, 2: 2, 3: 2}


def test_bulk_update_checks_the_version_even_when_fields_name_it(alias: str) -> None:
    stale = Account.objects.using(alias).create(id=1, balance=100)
    other = Account.objects.using(alias).get(pk=1)
    other.balance = 50
    other.save(using=alias)
    stale.balance = 10
    with pytest.raises(StaleVersion):
        Account.objects.using(alias).bulk_update([stale], ["balance", "version"])
    assert _row(alias) == (50, 2)


def test_bulk_update_of_a_deleted_row_is_not_found(alias: str) -> None:
    gone = Account.objects.using(alias).create(id=1, balance=100)
    Account.objects.using(alias).filter(pk=1).delete()
    gone.balance = 1
    with pytest.raises(NotFound):
        Account.objects.using(alias).bulk_update([gone], ["balance"])
    assert not Account.objects.using(alias).filter(pk=1).exists()


def test_bulk_update_refuses_two_instances_of_one_row(alias: str) -> None:
    a = Account.objects.using(alias).create(id=1, balance=100)
    b = Account.objects.using(alias).get(pk=1)
    with pytest.raises(ConfigurationError, match="two instances"):
        Account.objects.using(alias).bulk_update([a, b], ["balance"])


def test_stale_delete_raises_and_keeps_the_row(alias: str) -> None:
    """A stale delete() deleted the row with no version check."""
    Account.objects.using(alias).create(id=1, balance=100)
    stale = Account.objects.using(alias).get(pk=1)
    other = Account.objects.using(alias).get(pk=1)
    other.balance = 80
    other.save(using=alias)
    with pytest.raises(StaleVersion) as info:
        stale.delete(using=alias)
    assert (info.value.expected, info.value.current) == (1, 2)
    assert _row(alias) == (80, 2)
    assert other.delete(using=alias)[0] == 1  # the current instance deletes it
    assert not Account.objects.using(alias).filter(pk=1).exists()
    with pytest.raises(NotFound):
        stale.delete(using=alias)


def test_concurrent_delete_and_save_one_wins(alias: str) -> None:
    """Many threads each hold an instance loaded at version 1; half delete, half save. Exactly
    one wins; every other gets StaleVersion or NotFound (never a silent overwrite or delete)."""
    Account.objects.using(alias).create(id=1, balance=0)
    loaded = [Account.objects.using(alias).get(pk=1) for _ in range(6)]
    barrier = threading.Barrier(len(loaded))
    results: list[str] = []
    lock = threading.Lock()

    def work(i: int) -> None:
        obj = loaded[i]
        barrier.wait()
        try:
            if i % 2:
                obj.delete(using=alias)
                outcome = "deleted"
            else:
                obj.balance = i + 1
                obj.save(using=alias)
                outcome = "saved"
        except (StaleVersion, NotFound) as exc:
            outcome = type(exc).__name__
        except Exception as exc:  # SQLite's "database is locked": a loser too
            outcome = "busy:" + type(exc).__name__
        finally:
            connections[alias].close()
        with lock:
            results.append(outcome)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(loaded))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [r for r in results if r in ("deleted", "saved")]
    assert len(winners) == 1, results
    row = list(Account.objects.using(alias).filter(pk=1).values_list("version", flat=True))
    assert row == ([] if winners[0] == "deleted" else [2])


def test_a_deleted_row_is_not_found_not_recreated(alias: str) -> None:
    Account.objects.using(alias).create(id=1, balance=0)
    a = Account.objects.using(alias).get(pk=1)
    Account.objects.using(alias).filter(pk=1).delete()
    a.balance = 3
    with pytest.raises(NotFound):
        a.save(using=alias)
    assert not Account.objects.using(alias).filter(pk=1).exists()


def test_100_increments_from_10_threads(alias: str) -> None:
    Account.objects.using(alias).create(id=1, balance=0)
    barrier = threading.Barrier(10)
    conflicts = 0
    lock = threading.Lock()

    def counted(*_: Any) -> None:
        nonlocal conflicts
        with lock:
            conflicts += 1

    @retry_on_conflict(attempts=5000, base_delay=0.001, max_delay=0.02, on_retry=counted)
    def deposit() -> None:
        obj = Account.objects.using(alias).get(pk=1)
        obj.balance += 1
        obj.save(using=alias)

    def worker() -> None:
        try:
            barrier.wait()
            for _ in range(10):
                deposit()
        finally:
            connections.close_all()

    threads = [threading.Thread(target=worker) for _ in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert _row(alias) == (100, 101)
    assert conflicts > 0, "no thread ever lost a race: the test proves nothing"


async def test_asave_goes_through_the_check(alias: str) -> None:
    def setup() -> tuple[Any, Any]:
        Account.objects.using(alias).create(id=1, balance=0)
        return Account.objects.using(alias).get(pk=1), Account.objects.using(alias).get(pk=1)

    from asgiref.sync import sync_to_async

    a, b = await sync_to_async(setup)()
    a.balance = 1
    await a.asave(using=alias)
    b.balance = 2
    with pytest.raises(StaleVersion):
        await b.asave(using=alias)
    await asyncio.sleep(0)


def test_update_setting_the_version_to_itself_still_moves_it(alias: str) -> None:
    """update(..., version=F("version")) counted as "sets the version itself": the version
    stayed at 1 and an instance loaded before saved over the change."""
    Account.objects.using(alias).create(id=1, balance=100)
    stale = Account.objects.using(alias).get(pk=1)
    Account.objects.using(alias).filter(pk=1).update(balance=77, version=F("version"))
    assert _row(alias) == (77, 2)
    stale.balance = 5
    with pytest.raises(StaleVersion):
        stale.save(using=alias)
    assert _row(alias) == (77, 2)
