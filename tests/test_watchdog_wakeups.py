"""The renewal scheduler is not woken by calls that end before their first renewal.

A call registers its lease with the watchdog (a heap push) and cancels it when it ends. When
every earlier call had ended, the scheduler had popped their entries and slept with no timeout,
so each new call's push woke it: a thread switch (and a GIL hand-over) per call, ~8 futex calls
per HTTP request on the memory store. Now the scheduler wakes by itself at least every
``IDLE_TICK`` seconds while calls come, and a push due after that needs no notify.
"""

from __future__ import annotations

import threading
import time

import pytest

from oncely.core.renewal import IDLE_TICK, Watchdog


class _Entry:
    """A lease entry (the ``Due`` protocol) that records when it ran."""

    def __init__(self, due: float) -> None:
        self.due = due
        self.held_until = due + 60.0
        self.active = True
        self.lane = _LANE
        self.ran = threading.Event()

    def run(self) -> float | None:
        self.ran.set()
        return None

    def expire(self) -> None:
        pass


_LANE = object()


class _CountingCondition(threading.Condition):
    def __init__(self, lock: threading.Lock) -> None:
        super().__init__(lock)
        self.waits = 0

    def wait(self, timeout: float | None = None) -> bool:
        self.waits += 1
        return super().wait(timeout)


def _watchdog() -> tuple[Watchdog, _CountingCondition]:
    dog = Watchdog()
    cond = _CountingCondition(dog._mutex)
    dog._cond = cond
    return dog, cond


@pytest.mark.serial  # asserts a wall-clock bound: run alone, after the parallel phase
def test_short_calls_do_not_wake_the_scheduler() -> None:
    dog, cond = _watchdog()
    calls = 200
    started = time.monotonic()
    for _ in range(calls):
        entry = _Entry(time.monotonic() + 30.0)
        dog.schedule(entry)
        dog.cancel(entry)
        time.sleep(0.001)  # let the scheduler thread run if the push woke it
    elapsed = time.monotonic() - started
    # The scheduler waits once when it starts, then once per idle tick; before, once per call.
    assert cond.waits <= 2 + elapsed / IDLE_TICK, (cond.waits, elapsed)


def test_an_entry_due_before_the_idle_tick_still_runs_on_time() -> None:
    dog, _ = _watchdog()
    warm = _Entry(time.monotonic() + 30.0)
    dog.schedule(warm)
    dog.cancel(warm)  # the scheduler now idles with a tick of IDLE_TICK seconds
    time.sleep(0.01)
    entry = _Entry(time.monotonic() + 0.05)
    dog.schedule(entry)
    assert entry.ran.wait(IDLE_TICK / 2), "a push due before the scheduler's tick must wake it"
