"""Faults an outside red team found in the claim engine's users (the decorator and HTTP flows).

Each test names the fault it reproduces; each failed on the code before its fix. The stores
are real (memory, the reference model, subclassed only to inject a store failure at one
chosen step; or a real PostgreSQL table that does not exist).
"""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from oncely.http import GLOBAL, IdempotencyConfig
from oncely.stores import open_store

from conftest import POSTGRES_URL
from http_apps.harness import FACES

pytestmark = pytest.mark.timeout(60)


def key_header() -> tuple[str, str]:
    return ("Idempotency-Key", f'"{uuid.uuid4()}"')


# -- A5: fail_open covers an unreachable store only ------------------------------------------------
@pytest.mark.parametrize("face_name", ["asgi", "wsgi"])
async def test_fail_open_never_covers_a_missing_schema(face_name: str) -> None:
    # SchemaMissing (or any StoreError other than StoreUnavailable) is a mistake to fix, not an
    # outage to ride out: the request must not run unprotected.
    store = open_store(POSTGRES_URL, table=f"oncely_missing_{uuid.uuid4().hex[:8]}")
    try:
        face: Any = FACES[face_name](IdempotencyConfig(store=store, fail_open=True, scope=GLOBAL))
        reply = await face.request("POST", "/orders", [key_header()], b"{}")
        assert face.calls["/orders"] == 0
        assert reply.status == 503 and reply.problem == "store-unavailable"
    finally:
        store.close()
