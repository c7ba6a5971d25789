"""Functions run in child processes by the multi-process and crash tests (importable by spawn)."""

from __future__ import annotations

import os
import time
from typing import Any

from oncely.records import New, RecordKey
from oncely.stores import open_store


def claim_once(
    url: str, options: dict[str, Any], scope: str, key: str, start_at: float
) -> tuple[str, int]:
    """Open the store, wait for a shared start instant, claim once; report outcome and pid."""
    store = open_store(url, **options)
    try:
        record_key = RecordKey.of(scope, key)
        store.get(record_key)  # connect before the start line so all claims race together
        while time.time() < start_at:
            time.sleep(0.0005)
        outcome = store.claim(record_key, "fp", 30.0, 60.0)
        return type(outcome).__name__, (outcome.fence if isinstance(outcome, New) else 0)
    finally:
        store.close()


def pid() -> int:
    return os.getpid()
