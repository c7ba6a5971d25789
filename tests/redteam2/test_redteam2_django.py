"""Red-team findings (redteam2) on oncely.contrib.django.versioned.VersionedModel (Django's default
SQLite alias of the test site): each test failed before branch fix2."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator

import pytest
from django.db import connections, models

from oncely.errors import StaleVersion, VersionBypass

# isort: off
from http_apps import django_site  # noqa: F401  configures Django before a model is declared
from oncely.contrib.django.versioned import VersionedModel

# isort: on

TAG = uuid.uuid4().hex[:8]


class RtAccount(VersionedModel):
    balance = models.BigIntegerField(default=0)

    class Meta:
        app_label = "contenttypes"
        db_table = f"rt2_dj_acct_{TAG}"


@pytest.fixture
def table() -> Iterator[None]:
    with connections["default"].schema_editor() as editor:
        editor.create_model(RtAccount)
    try:
        yield
    finally:
        with connections["default"].schema_editor() as editor:
            editor.delete_model(RtAccount)


@pytest.mark.usefixtures("table")
def test_bulk_create_upsert_cannot_skip_the_version() -> None:
    RtAccount.objects.create(id=1, balance=100)
    early = RtAccount.objects.get(pk=1)
    try:
        RtAccount.objects.bulk_create(
            [RtAccount(id=1, balance=0)],
            update_conflicts=True,
            unique_fields=["id"],
            update_fields=["balance"],
        )
    except VersionBypass:
        return  # refusing the upsert is right too
    early.balance += 10
    with pytest.raises(StaleVersion):
        early.save()  # computed from balance=100: must not overwrite the upsert's 0


@pytest.mark.usefixtures("table")
def test_a_never_loaded_instance_cannot_overwrite_a_versioned_row() -> None:
    from django.db import IntegrityError

    RtAccount.objects.create(id=1, balance=100)
    early = RtAccount.objects.get(pk=1)
    with contextlib.suppress(StaleVersion, IntegrityError):  # refusing it is right
        RtAccount(id=1, balance=5).save()  # e.g. a deserialised request body
    stored = RtAccount.objects.get(pk=1)
    if stored.balance == 5:  # it was written: then it must have moved the version
        assert stored.version == 2
        early.balance += 1
        with pytest.raises(StaleVersion):
            early.save()
