"""Run by tests/test_saga.py in a fresh interpreter (Django settings are process-wide): the
saga's pivot rule through django.db.connection (SQLite): a step after the pivot that fails for
good leaves the saga 'pivoted', abort() compensates nothing, a rerun completes it; a pivot
step that fails rolls back and the saga is compensated."""

from __future__ import annotations

import sys
from typing import Any


def main(path: str) -> None:
    import django
    from django.conf import settings

    settings.configure(
        DATABASES={"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": path}},
        INSTALLED_APPS=[],
        USE_TZ=True,
    )
    django.setup()
    from django.db import connection

    from oncely.errors import SagaFailed, SagaStuck
    from oncely.sql.connections import adapt
    from oncely.statemachine.saga import Saga, Step

    with connection.cursor() as cur:
        cur.execute("CREATE TABLE moves (saga VARCHAR(20), step VARCHAR(20), op VARCHAR(20))")
    fail: dict[str, int] = {}

    def step(ctx: Any) -> None:
        adapt(ctx.conn).execute(
            "INSERT INTO moves VALUES (:s, :st, :op)",
            {"s": ctx.saga_id, "st": ctx.step, "op": ctx.op},
        )
        if fail.get(ctx.step, 0) > 0:
            fail[ctx.step] -= 1
            raise ValueError("down")

    saga = Saga("dj", [Step("reserve", step, step), Step("pay", step, attempts=1),
                       Step("ship", step, attempts=1)])  # fmt: skip
    saga.create_tables(connection)

    def moves(saga_id: str) -> list[tuple[str, str]]:
        with connection.cursor() as cur:
            cur.execute("SELECT step, op FROM moves WHERE saga = %s ORDER BY 1, 2", [saga_id])
            return [(str(a), str(b)) for a, b in cur.fetchall()]

    fail["ship"] = 1
    try:
        saga.run(connection, "d1", {"n": 1})
    except SagaStuck as exc:
        assert exc.step == "ship", exc
    else:
        raise AssertionError("a step after the pivot that fails must raise SagaStuck")
    aborted = saga.abort(connection, "d1")
    assert aborted.state == "pivoted" and aborted.compensated == (), aborted
    assert saga.run(connection, "d1").state == "completed"
    assert moves("d1") == [("pay", "action"), ("reserve", "action"), ("ship", "action")]

    fail["pay"] = 1  # the pivot itself fails: rolled back, the saga is compensated
    try:
        saga.run(connection, "d2", {"n": 1})
    except SagaFailed as exc:
        assert exc.step == "pay", exc
    else:
        raise AssertionError("a pivot that fails must roll the saga back")
    assert moves("d2") == [("reserve", "action"), ("reserve", "compensate")], moves("d2")
    assert saga.abort(connection, "d2").state == "compensated"
    print("OK")


if __name__ == "__main__":
    main(sys.argv[1])
