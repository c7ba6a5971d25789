"""Hypothesis drives each real store and the pure reference model side by side.

The model is :class:`oncely.stores.memory.MemoryState` with a frozen clock; leases and ttls are
long, so time never decides anything here (expiry has its own tests in the conformance suite).
Fences differ between stores, so each claim's (real fence, model fence) pair is remembered and
operations use a chosen past claim — the latest one or a stale one.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from oncely.core.records import New, RecordKey, Replay
from oncely.errors import LeaseLost
from oncely.stores import Store, open_store
from oncely.stores.memory import MemoryState

from conftest import STORE_KINDS, drop, store_url

LEASE, TTL = 600.0, 600.0
KEYS = st.integers(0, 2)
FPS = st.sampled_from(["a", "b"])
RESULTS = st.binary(max_size=16)


def make_machine(store: Store) -> type[RuleBasedStateMachine]:
    class StoreVersusModel(RuleBasedStateMachine):
        @initialize()
        def setup(self) -> None:
            self.scope = f"model-{uuid.uuid4().hex[:10]}"
            self.model = MemoryState()
            self.claims: dict[int, list[tuple[int, int]]] = {0: [], 1: [], 2: []}

        def key(self, k: int) -> RecordKey:
            return RecordKey.of(self.scope, f"k{k}")

        def pick(self, k: int, stale: bool) -> tuple[int, int] | None:
            claims = self.claims[k]
            if not claims:
                return None
            return claims[0] if stale else claims[-1]

        @rule(k=KEYS, fp=FPS)
        def claim(self, k: int, fp: str) -> None:
            real = store.claim(self.key(k), fp, LEASE, TTL)
            model = self.model.claim(self.key(k), fp, LEASE, TTL, 0.0)
            assert type(real) is type(model), (real, model)
            if isinstance(real, New) and isinstance(model, New):
                if self.claims[k]:
                    assert real.fence > self.claims[k][-1][0]
                self.claims[k].append((real.fence, model.fence))
            if isinstance(real, Replay) and isinstance(model, Replay):
                assert real.record.result == model.record.result

        def both(self, real_op: Any, model_op: Any) -> None:
            outcomes = []
            for op in (real_op, model_op):
                try:
                    op()
                    outcomes.append("ok")
                except LeaseLost:
                    outcomes.append("lost")
            assert outcomes[0] == outcomes[1], outcomes

        @rule(k=KEYS, stale=st.booleans(), result=RESULTS)
        def complete(self, k: int, stale: bool, result: bytes) -> None:
            chosen = self.pick(k, stale)
            if chosen is not None:
                key = self.key(k)
                self.both(
                    lambda: store.complete(key, chosen[0], result, "raw", TTL),
                    lambda: self.model.complete(key, chosen[1], result, "raw", TTL, 0.0),
                )

        @rule(k=KEYS, stale=st.booleans())
        def release(self, k: int, stale: bool) -> None:
            chosen = self.pick(k, stale)
            if chosen is not None:
                key = self.key(k)
                self.both(
                    lambda: store.release(key, chosen[0]),
                    lambda: self.model.release(key, chosen[1], 0.0),
                )

        @rule(k=KEYS, stale=st.booleans())
        def renew(self, k: int, stale: bool) -> None:
            chosen = self.pick(k, stale)
            if chosen is not None:
                key = self.key(k)
                self.both(
                    lambda: store.renew(key, chosen[0], LEASE),
                    lambda: self.model.renew(key, chosen[1], LEASE, 0.0),
                )

        @rule(k=KEYS)
        def delete(self, k: int) -> None:
            assert store.delete(self.key(k)) == self.model.delete(self.key(k))

        @invariant()
        def same_records(self) -> None:
            if not hasattr(self, "model"):
                return
            for k in range(3):
                real, model = store.get(self.key(k)), self.model.get(self.key(k), 0.0)
                assert (real is None) == (model is None), (real, model)
                if real is not None and model is not None:
                    assert (real.status, real.fingerprint, real.result, real.codec) == (
                        model.status,
                        model.fingerprint,
                        model.result,
                        model.codec,
                    )

    return StoreVersusModel


@pytest.mark.parametrize("kind", STORE_KINDS)
def test_store_matches_the_model(kind: str, tmp_path: Path) -> None:
    url, options = store_url(kind, tmp_path)
    store = open_store(url, **options)
    try:
        machine = make_machine(store)
        machine.TestCase.settings = settings(
            max_examples=25,
            stateful_step_count=30,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
        )
        machine.TestCase().runTest()
    finally:
        drop(kind, store)
        store.close()
