"""Run by tests/test_statemachine.py in a fresh interpreter (Django settings are process-wide):
a state machine on a Django model, through django.db.connection, alone and inside atomic(),
and the barrier on the same connection."""

from __future__ import annotations

import sys

import django
from django.conf import settings


def main(path: str) -> None:
    settings.configure(
        DATABASES={"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": path}},
        INSTALLED_APPS=[],
        USE_TZ=True,
    )
    django.setup()
    from django.db import connection, models, transaction

    from oncely.errors import IllegalTransition
    from oncely.statemachine import Machine, Transition
    from oncely.statemachine.barrier import barrier, create_table
    from oncely.statemachine.sql import SqlStateMachine, Table, table_of

    class Shipment(models.Model):
        status = models.CharField(max_length=20, db_column="ship_state")

        class Meta:
            app_label = "sm_check"
            db_table = "shipments"

    with connection.schema_editor() as editor:
        editor.create_model(Shipment)
    assert table_of(Shipment, "status") == Table("shipments", "id", "ship_state")
    machine = Machine(
        "shipment", ["packed", "sent", "lost"], "packed",
        [Transition("send", "packed", "sent"), Transition("lose", ["packed", "sent"], "lost")],
    )  # fmt: skip
    sm = SqlStateMachine(machine, Shipment, state_field="status")
    sm.create_tables(connection)
    create_table(connection)
    one = Shipment.objects.create(status="packed")
    two = Shipment.objects.create(status="packed")

    assert sm.apply(connection, one.pk, "send").applied  # its own atomic block
    assert not sm.apply(connection, one.pk, "send").applied
    one.refresh_from_db()
    assert one.status == "sent"

    try:  # inside the caller's atomic(): rolled back with it
        with transaction.atomic():
            assert barrier(connection, "g1", "b1", "try").run
            assert sm.apply(connection, two.pk, "lose").applied
            raise RuntimeError("caller fails")
    except RuntimeError:
        pass
    two.refresh_from_db()
    assert two.status == "packed"
    with transaction.atomic():
        assert barrier(connection, "g1", "b1", "try").run  # the rolled-back row is gone
    try:
        sm.apply(connection, two.pk, "lose")
        sm.apply(connection, two.pk, "send")
    except IllegalTransition as exc:
        assert exc.current == "lost"
    else:
        raise AssertionError("send after lose must be illegal")
    print("OK")


if __name__ == "__main__":
    main(sys.argv[1])
