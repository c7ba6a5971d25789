"""Faults the storm injects into a shop it runs itself (:class:`~oncely.demo.service.Service`).

Each fault touches only the demo's own processes and connections, never other clients of a
shared server:

* :meth:`Faults.kill_worker` -- SIGKILL one Uvicorn worker (its supervisor starts a new one);
  requests in flight on it die, their keys stay claimed until their lease runs out.
* :meth:`Faults.kill_store_connections` -- PostgreSQL ``pg_terminate_backend`` of the sessions
  whose ``application_name`` is this run's tag; Redis ``CLIENT KILL ID`` of the clients whose
  name is this run's tag (``CLIENT KILL`` has no name filter, so they are listed first).
* :meth:`Faults.pause_lock_holder` -- SIGSTOP the settlement process that holds the lock with a
  batch read and not written, for longer than the lock's lease, then SIGCONT it: another
  process takes the lock over, and the paused one must not write when it wakes.
"""

from __future__ import annotations

import os
import random
import signal
import time

from oncely.demo.service import Service
from oncely.demo.shop.db import ShopDB

__all__ = ["Faults"]


class Faults:
    def __init__(self, service: Service) -> None:
        self.service = service
        self.settings = service.settings

    def kill_worker(self) -> str:
        pids = self.service.worker_pids()
        if not pids:
            return "SIGKILL worker: no worker found"
        pid = random.choice(pids)
        os.kill(pid, signal.SIGKILL)
        return f"SIGKILL of web worker {pid} (the supervisor starts a new one)"

    def kill_store_connections(self) -> str:
        s = self.settings
        if not s.protected:
            return "kill store connections: n/a (oncely is off, no store)"
        if s.scheme in ("postgresql", "postgres"):
            import psycopg

            with psycopg.connect(s.store, autocommit=True, application_name=f"{s.tag}_fault") as c:
                rows = c.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE application_name = %s AND pid <> pg_backend_pid()",
                    (s.tag,),
                ).fetchall()
            return f"pg_terminate_backend of the shop's {len(rows)} PostgreSQL connection(s)"
        if s.scheme in ("redis", "rediss"):
            import redis

            client = redis.Redis.from_url(s.store)
            try:
                ids = [c["id"] for c in client.client_list() if c.get("name") == s.tag]
                for ident in ids:
                    client.client_kill_filter(_id=ident)
            finally:
                client.close()
            return f"CLIENT KILL of the shop's {len(ids)} Redis connection(s)"
        return f"kill store connections: n/a on {s.scheme} (embedded, no connections)"

    def pause_lock_holder(self, seconds: float | None = None, wait: float = 15.0) -> str:
        pause = seconds if seconds is not None else self.settings.lease * 2 + 1
        db = ShopDB(self.settings.shop_db)
        try:
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline:
                found = db.open_settlement()
                if found is not None and found[1] in self.service.settler_pids():
                    pid = found[1]
                    try:
                        os.kill(pid, signal.SIGSTOP)
                    except ProcessLookupError:
                        continue
                    try:
                        time.sleep(pause)
                    finally:
                        os.kill(pid, signal.SIGCONT)
                    return (
                        f"SIGSTOP of settlement process {pid} holding a batch, "
                        f"{pause:.1f} s (lease {self.settings.lease:.1f} s), then SIGCONT"
                    )
                time.sleep(0.01)
        finally:
            db.close()
        return "SIGSTOP lock holder: no settlement run with a batch was seen"
