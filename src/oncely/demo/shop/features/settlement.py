"""The periodic settlement job: pays out paid orders to the merchant, guarded by a distributed
lock with fencing (source §3.5, :mod:`oncely.locks`).

Every settlement process wakes up every ``period`` seconds and, protected, tries the lock
``shop-settlement`` without waiting. The holder reads a batch of paid, unsettled orders, calls
the bank (``latency`` x 10 seconds: the window a pause can hit), checks it still holds the lock
and writes the payout with :func:`oncely.locks.fenced_update` in the same transaction: a holder
paused past its lease (GC, swap, ``SIGSTOP``) while another took the lock over writes nothing
("fenced-out") even if it passed the check just before the pause.

Unprotected there is no lock and no fence: two settlement processes that overlap both pay out
the same orders (a double settlement in the ledger).
"""

from __future__ import annotations

import contextlib
import os
import random
import threading
import time

from oncely.demo.shop.db import ShopDB
from oncely.demo.shop.settings import Settings
from oncely.errors import LockError, OncelyError
from oncely.locks import Lock

__all__ = ["BATCH", "settle_forever", "settle_once"]

BATCH = 200
LOCK_NAME = "shop-settlement"


def _bank_transfer(settings: Settings) -> None:
    time.sleep(max(0.05, settings.latency * 10))


def settle_once(settings: Settings, db: ShopDB, lock: Lock | None) -> str:
    """One settlement attempt; returns its outcome (``busy``, ``empty``, ``written``,
    ``lost-lock``, ``fenced-out``, ``error``)."""
    fence: int | None = None
    if lock is not None:
        try:
            fence = lock.acquire(blocking=False)
        except OncelyError:
            return "error"
        if fence is None:
            return "busy"
    try:
        run, orders = db.start_settlement(os.getpid(), fence, BATCH)
        outcome = "written"
        if orders:
            _bank_transfer(settings)
            if lock is not None:
                try:
                    lock.check()
                except LockError:
                    outcome = "lost-lock"
        return db.finish_settlement(run, orders, fence, outcome)
    finally:
        if lock is not None:
            with contextlib.suppress(LockError):
                lock.release()


def settle_forever(settings: Settings, stop: threading.Event, period: float = 0.25) -> None:
    """The settlement process's loop, until ``stop`` is set."""
    db = ShopDB(settings.shop_db)
    lock: Lock | None = None
    if settings.protected:
        url, options = settings.lock_target()
        lock = Lock(url, LOCK_NAME, ttl=settings.lease, auto_renew=True, **options)
    while not stop.wait(period * random.uniform(0.5, 1.5)):
        try:
            settle_once(settings, db, lock)
            if settings.protected and settings.order_timeout > 0:
                db.expire_unpaid(settings.order_timeout)
        except Exception:  # keep the job alive; the next round tries again
            time.sleep(period)
