"""Optimistic locking for Django models: a version column checked on every save, and the
bulk writes that would skip it bumped (or refused).

Django has no optimistic locking of its own: ``save()`` writes every field whatever happened
since the object was read, the lost update of source §3.3. Subclass :class:`VersionedModel`
(an abstract model, import it from your ``models.py``)::

    from oncely.contrib.django.versioned import VersionedModel

    class Account(VersionedModel):
        balance = models.BigIntegerField(default=0)

* ``save()`` of an existing row runs ``UPDATE … SET …, version = :v + 1 WHERE id = :id AND
  version = :v``, with ``:v`` the version the instance was loaded with; zero rows raises
  :class:`~oncely.errors.StaleVersion` (``current`` is the row's version now) or
  :class:`~oncely.errors.NotFound` (the row was deleted), never a silent overwrite nor the
  re-insert Django would otherwise try. ``asave()`` goes through ``save()``.
* ``save(update_fields=[...])`` without the version field (django-concurrency's FAQ: "skip
  update version number") gets it added: the check and the bump always happen.
* ``bulk_update(objs, fields)`` is checked as ``save()`` is: one ``UPDATE`` per batch writes
  a row only if it is at the version its instance holds (``… AND version = CASE pk WHEN …
  END``) and bumps it, all batches in one transaction; a stale or deleted row raises
  :class:`~oncely.errors.StaleVersion` (or :class:`~oncely.errors.NotFound`) naming the rows
  and nothing is written.
* ``delete()`` compares and locks the row (``UPDATE … SET version = version + 1 WHERE pk =
  :pk AND version = :v``) before Django's delete, in one transaction: a stale instance
  raises :class:`~oncely.errors.StaleVersion` and deletes nothing.
* ``Account.objects.filter(…).update(…)`` (``QuerySet.update()`` skips ``save()``) gets
  ``version = F("version") + 1`` added unless it sets the version itself (``F("version")``
  does not count), so an instance loaded before it fails its next save instead of
  overwriting the bulk change. With ``oncely_on_bulk = "refuse"`` on the model it raises
  :class:`~oncely.errors.VersionBypass` instead; ``.update_unversioned(…)`` is the explicit
  way around. ``QuerySet.update()`` and ``QuerySet.delete()`` compare no version (they have
  none to compare): they write or delete whatever matches.
* ``bulk_create(update_conflicts=True)`` (an upsert) raises
  :class:`~oncely.errors.VersionBypass` unless ``update_fields`` names the version.
* A new instance given an existing pk (``Account(id=1, ...).save()``, never loaded) updates
  the row only if its version (1 by default) is the row's, and bumps it; otherwise Django's
  INSERT follows and the primary key refuses it (``IntegrityError``).

Retry conflicts with :func:`oncely.optimistic.retry_on_conflict` (read the row inside the
retried function). The check rides on Django's ``Model._do_update`` hook, as
django-optimistic-lock and django-concurrency do.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, ClassVar

from django.db import models  # type: ignore[import-untyped]
from django.db.models import F  # type: ignore[import-untyped]

from oncely.errors import (
    ConfigurationError,
    NotFound,
    StaleVersion,
    UnversionedRow,
    VersionBypass,
)

__all__ = ["VersionedManager", "VersionedModel", "VersionedQuerySet"]


def _version_field(model: Any) -> str:
    name: str = getattr(model, "oncely_version_field", "version")
    return name


def _bypass(model: Any, what: str, field: str) -> VersionBypass:
    return VersionBypass(
        f"{model.__name__}: {what} without {field!r} skips optimistic locking (an instance "
        f"loaded before it could then overwrite it); set {field}=F({field!r}) + 1, save the "
        "instances one by one, call update_unversioned() if you mean it, or set "
        'oncely_on_bulk = "bump" on the model'
    )


def _unmoved(value: Any, field: str) -> bool:
    """``version=F("version")``: "sets the version itself" to what it is, so it does not move
    and an instance loaded before could save over the change."""
    return isinstance(value, F) and value.name == field


def _loaded_version(obj: Any, attname: str, name: str) -> int:
    version = getattr(obj, attname)
    if isinstance(version, bool) or not isinstance(version, int):
        raise ConfigurationError(
            f"{type(obj).__name__}.{name} is {version!r}, not the int version it was "
            "loaded with; reload the instance (refresh_from_db) before saving"
        )
    return version


class VersionedQuerySet(models.QuerySet):  # type: ignore[misc]
    """``update()`` that moves the version and ``bulk_update()`` that checks it (see the
    module docstring)."""

    def update(self, **kwargs: Any) -> int:
        field = _version_field(self.model)
        if field not in kwargs or _unmoved(kwargs[field], field):
            if getattr(self.model, "oncely_on_bulk", "bump") == "refuse":
                raise _bypass(self.model, "QuerySet.update()", field)
            kwargs[field] = F(field) + 1
        rows: int = super().update(**kwargs)
        return rows

    def update_unversioned(self, **kwargs: Any) -> int:
        """``QuerySet.update()`` as Django does it: the version does not move."""
        rows: int = super().update(**kwargs)
        return rows

    def bulk_create(self, objs: Iterable[Any], *args: Any, **kwargs: Any) -> list[Any]:
        """``bulk_create()``; an upsert (``update_conflicts=True``) must name the version in
        ``update_fields`` (its ``ON CONFLICT DO UPDATE`` cannot add one to it), else
        :class:`~oncely.errors.VersionBypass`: it would change rows without moving their
        version, and an instance loaded before would save over it."""
        if kwargs.get("update_conflicts"):
            field = _version_field(self.model)
            if field not in list(kwargs.get("update_fields") or ()):
                raise _bypass(self.model, "bulk_create(update_conflicts=True)", field)
        created: list[Any] = super().bulk_create(objs, *args, **kwargs)
        return created

    def bulk_update(
        self, objs: Iterable[Any], fields: Iterable[str], batch_size: int | None = None
    ) -> int:
        """``bulk_update()`` checked as ``save()`` is: each row is written only if it is still
        at the version its instance holds, and its version is bumped. One ``UPDATE`` per batch
        (``SET … = CASE pk …, version = version + 1 WHERE pk IN (…) AND version = CASE pk WHEN
        … THEN <its version> END``), every batch in one transaction: if any row moved on (or
        was deleted) nothing is written and :class:`~oncely.errors.StaleVersion` (or
        :class:`~oncely.errors.NotFound`) names those rows. The instances then hold their new
        versions. The version is never written from the instances, even if ``fields`` names
        it. Returns the number of rows written.

        :raises StaleVersion: rows moved on since their instances were loaded (``expected``
            and ``current`` map each such pk to its version; ``current`` None: deleted).
        :raises NotFound: every such row was deleted meanwhile.
        :raises ConfigurationError: an instance whose version is not an int, or two instances
            of one row (one would overwrite the other unchecked).
        """
        from django.db import connections

        model = self.model
        name = _version_field(model)
        vfield = model._meta.get_field(name)
        attname = vfield.attname
        objs, given = list(objs), list(fields)
        if not given:
            raise ValueError("Field names must be given to bulk_update().")
        if batch_size is not None and batch_size <= 0:
            raise ValueError("Batch size must be a positive integer.")
        fields = [f for f in given if f not in (name, attname)]
        expected: dict[Any, int] = {}
        for obj in objs:
            if obj.pk is None:
                raise ValueError("All bulk_update() objects must have a primary key set.")
            version = _loaded_version(obj, attname, name)
            if obj.pk in expected:
                raise ConfigurationError(
                    f"{model.__name__}: two instances of pk={obj.pk!r} in one bulk_update(); "
                    "the second would be written over the first unchecked: pass each row once"
                )
            expected[obj.pk] = version
        if not objs:
            return 0
        pk = model._meta.pk
        written = [model._meta.get_field(f) for f in fields]
        size = connections[self.db].ops.bulk_batch_size([pk, pk, pk, vfield, *written], objs)
        size = max(1, min(batch_size, size) if batch_size else size)
        rows = 0
        try:
            rows = self._bulk_checked(objs, fields, name, attname, vfield, expected, size)
        except _Stale as stale:
            # the report is read after the rollback: inside the failed transaction every row
            # this call bumped read as moved on (1-5 "at version 2" when only 3 was)
            error = self._stale_rows(stale.batch, expected, attname, name) or stale.error
            raise error from None
        for obj in objs:
            setattr(obj, attname, expected[obj.pk] + 1)
        return rows

    def _bulk_checked(
        self,
        objs: list[Any],
        fields: list[str],
        name: str,
        attname: str,
        vfield: Any,
        expected: dict[Any, int],
        size: int,
    ) -> int:
        """The batches of :meth:`bulk_update`, in one transaction; raises :class:`_Stale`
        (after which the transaction is rolled back) when a batch wrote fewer rows than it has
        for another reason than this queryset's own filter."""
        from django.db import transaction
        from django.db.models import Case, Value, When

        rows = 0
        with transaction.atomic(using=self.db):
            for start in range(0, len(objs), size):
                batch = objs[start : start + size]
                check = Case(
                    *[When(pk=o.pk, then=Value(expected[o.pk])) for o in batch],
                    output_field=vfield,
                )
                checked = self.filter(**{attname: check})
                for obj in batch:
                    setattr(obj, attname, F(name) + 1)
                try:
                    count: int = models.QuerySet.bulk_update(
                        checked, batch, [*fields, name], batch_size=size
                    )
                finally:
                    for obj in batch:
                        setattr(obj, attname, expected[obj.pk])
                if count != len(batch):
                    self._check_batch(batch, expected, attname, name, count)
                rows += count
        return rows

    def _check_batch(
        self, batch: list[Any], expected: dict[Any, int], attname: str, name: str, count: int
    ) -> None:
        """Inside the batch's transaction, after its ``UPDATE`` wrote ``count`` rows: raise
        :class:`_Stale` unless every row left out is still at its expected version (excluded
        by this queryset's own filter, as Django's ``bulk_update()`` leaves them). A row this
        ``UPDATE`` wrote reads one above its expected version here; so does one a concurrent
        save() bumped, so when more rows read so than were written, some are stale."""
        found = dict(
            self.model._base_manager.using(self.db)
            .filter(pk__in=[o.pk for o in batch])
            .values_list("pk", attname)
        )
        bumped = [o.pk for o in batch if found.get(o.pk) == expected[o.pk] + 1]
        left = [o.pk for o in batch if found.get(o.pk) != expected[o.pk]]
        if len(bumped) == count and len(left) == count:
            return  # every row not written is at its version: excluded by the filter
        error = self._stale_rows(batch, expected, attname, name, ignore=bumped[:count])
        raise _Stale(batch, error or StaleVersion(self.model._meta.db_table, {}, {}))

    def _stale_rows(
        self,
        batch: list[Any],
        expected: dict[Any, int],
        attname: str,
        name: str,
        ignore: Iterable[Any] = (),
    ) -> Exception | None:
        """The error for the rows of ``batch`` (but ``ignore``) not at their expected version,
        read now, or None if all are."""
        found = dict(
            self.model._base_manager.using(self.db)
            .filter(pk__in=[o.pk for o in batch])
            .values_list("pk", attname)
        )
        table = self.model._meta.db_table
        unversioned = [o.pk for o in batch if o.pk in found and found[o.pk] is None]
        if unversioned:
            entity = f"{table} pk in {unversioned!r}"
            return UnversionedRow(
                entity,
                f"{entity} have a NULL {name!r}; backfill it (UPDATE … SET {name} = 1 WHERE "
                f"{name} IS NULL) and keep the column NOT NULL",
            )
        skip = set(ignore)
        stale = {
            o.pk: found.get(o.pk)
            for o in batch
            if o.pk not in skip and found.get(o.pk) != expected[o.pk]
        }
        if not stale:
            return None
        entity = f"{table} pk in {list(stale)!r}"
        if all(v is None for v in stale.values()):
            return NotFound(entity, f"{entity} were deleted meanwhile; nothing was written")
        want = {k: expected[k] for k in stale}
        return StaleVersion(
            entity,
            want,
            stale,
            f"{entity} moved on since their instances were loaded (versions now {stale!r}, "
            f"loaded at {want!r}; None: deleted); nothing was written: reload them and redo "
            "the change (oncely.optimistic.retry_on_conflict)",
        )


class _Stale(Exception):
    """Carries a stale batch out of :meth:`VersionedQuerySet.bulk_update`'s transaction (its
    exit rolls every batch back); ``error`` is the report read inside, used only if the read
    after the rollback finds nothing stale."""

    def __init__(self, batch: list[Any], error: Exception) -> None:
        super().__init__("stale batch")
        self.batch, self.error = batch, error


VersionedManager = models.Manager.from_queryset(VersionedQuerySet)
VersionedManager.__doc__ = "The manager of :class:`VersionedQuerySet`."


class VersionedModel(models.Model):  # type: ignore[misc]
    """Abstract model with a ``version`` (positive big integer, 1 for a new row) checked and
    bumped by every ``save()`` of an existing row (see the module docstring).

    Class attributes: ``oncely_version_field`` (default ``"version"``: to use a field of your
    own, declare it and name it here) and ``oncely_on_bulk`` (``"bump"`` or ``"refuse"``).

    :raises ~oncely.errors.StaleVersion: from ``save()``: the row moved on since this instance
        was loaded (reload it and redo the change).
    :raises ~oncely.errors.NotFound: from ``save()``: the row was deleted meanwhile.
    """

    version = models.PositiveBigIntegerField(default=1)

    oncely_version_field: ClassVar[str] = "version"
    oncely_on_bulk: ClassVar[str] = "bump"

    objects = VersionedManager()

    class Meta:
        abstract = True

    def save(self, *args: Any, **kwargs: Any) -> None:
        field = _version_field(type(self))
        update_fields = kwargs.get("update_fields")
        if update_fields is not None and not self._state.adding:
            names = list(update_fields)
            if names and field not in names:
                kwargs["update_fields"] = [*names, field]
        super().save(*args, **kwargs)

    def delete(self, using: Any = None, keep_parents: bool = False) -> Any:
        """``delete()`` checked as ``save()`` is: in one transaction, one ``UPDATE … SET
        version = version + 1 WHERE pk = :pk AND version = :v`` (the compare, which also
        locks the row so nothing can move it before the delete), then Django's delete (its
        signals and cascades). Zero rows: :class:`~oncely.errors.StaleVersion` (the row moved
        on since this instance was loaded) or :class:`~oncely.errors.NotFound` (already
        deleted), and nothing is deleted."""
        from django.db import router, transaction

        if self.pk is None:
            return super().delete(using=using, keep_parents=keep_parents)
        name = _version_field(type(self))
        attname = self._meta.get_field(name).attname
        expected = _loaded_version(self, attname, name)
        using = using or router.db_for_write(type(self), instance=self)
        base = type(self)._base_manager.using(using)
        with transaction.atomic(using=using):
            moved = base.filter(pk=self.pk, **{attname: expected}).update(
                **{attname: F(attname) + 1}
            )
            if not moved:
                entity = f"{self._meta.db_table} pk={self.pk!r}"
                found = list(base.filter(pk=self.pk).values_list(attname, flat=True)[:1])
                if not found:
                    raise NotFound(entity, f"{entity} was deleted meanwhile")
                if found[0] is None:
                    raise UnversionedRow(
                        entity,
                        f"{entity} has a NULL {name!r}; backfill it (UPDATE … SET {name} = 1 "
                        f"WHERE {name} IS NULL) and keep the column NOT NULL",
                    )
                raise StaleVersion(
                    entity,
                    expected,
                    found[0],
                    f"{entity} is at version {found[0]!r}, not {expected!r}: someone wrote it "
                    "since this instance was loaded, so it was not deleted; reload it and "
                    "decide again",
                )
            return super().delete(using=using, keep_parents=keep_parents)

    def _do_update(
        self,
        base_qs: Any,
        using: Any,
        pk_val: Any,
        values: list[tuple[Any, Any, Any]],
        update_fields: Any,
        forced_update: Any,
        *args: Any,
        **kwargs: Any,
    ) -> Any:
        name = _version_field(type(self))
        field = self._meta.get_field(name)
        expected = _loaded_version(self, field.attname, name)
        new_values = [(f, m, v) for f, m, v in values if f is not field]
        new_values.append((field, None, expected + 1))
        updated = super()._do_update(
            base_qs.filter(**{field.attname: expected}),
            using,
            pk_val,
            new_values,
            update_fields,
            forced_update,
            *args,
            **kwargs,
        )
        if updated:
            setattr(self, field.attname, expected + 1)
            return updated
        if self._state.adding:
            # a new instance given an existing pk (never loaded, e.g. a deserialised body)
            # updated nothing unless its version matched the row's: Django now INSERTs, which
            # the primary key refuses (IntegrityError) when the row exists, or creates it.
            return updated
        entity = f"{self._meta.db_table} pk={pk_val!r}"
        found = list(base_qs.filter(pk=pk_val).values_list(field.attname, flat=True)[:1])
        if not found:
            raise NotFound(
                entity, f"{entity} was deleted meanwhile; this save() would have re-created it"
            )
        if found[0] is None:
            raise UnversionedRow(
                entity,
                f"{entity} has a NULL {name!r}; backfill it (UPDATE … SET {name} = 1 WHERE "
                f"{name} IS NULL) and keep the column NOT NULL",
            )
        raise StaleVersion(entity, expected, found[0])
