"""How one shop process is configured: a frozen :class:`Settings`, passed between the demo
runner and the Uvicorn workers and settlement processes through ``ONCELY_DEMO_*`` variables.

=========================  ====================================================================
variable                   meaning
=========================  ====================================================================
``ONCELY_DEMO_DIR``        work directory: the business database ``shop.db`` (and, by default,
                           oncely's store ``oncely.db``)
``ONCELY_DEMO_STORE``      oncely store URL (default ``sqlite:///<dir>/oncely.db``)
``ONCELY_DEMO_PROTECTED``  ``1`` (default): oncely on; ``0``: the same shop with oncely off
``ONCELY_DEMO_RUN``        run id: names the shop's store table / key prefix and its
                           connections (PostgreSQL ``application_name``, Redis client name)
``ONCELY_DEMO_SECRET``     one-time token signing secret (at least 16 bytes)
``ONCELY_DEMO_LEASE``      seconds a request or job holds its key or lock without renewal
``ONCELY_DEMO_LATENCY``    seconds the simulated payment provider and bank take per call
``ONCELY_DEMO_TIMEOUT``    seconds after which the settlement processes cancel an unpaid
                           order and give its stock back (``0``, the default: never)
=========================  ====================================================================
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from oncely.errors import ConfigurationError

__all__ = ["Settings"]

_RUN = re.compile(r"[a-z0-9_]{1,40}")


@dataclass(frozen=True, kw_only=True)
class Settings:
    """One shop's configuration (shared by its web workers and settlement processes)."""

    workdir: Path
    store_url: str = ""
    protected: bool = True
    run: str = "demo"
    secret: str = ""
    lease: float = 3.0
    latency: float = 0.01
    order_timeout: float = 0.0

    def __post_init__(self) -> None:
        if not _RUN.fullmatch(self.run):
            raise ConfigurationError(f"run id {self.run!r}: use 1-40 of a-z, 0-9, _")
        if self.protected and len(self.secret.encode()) < 16:
            raise ConfigurationError("the token secret needs at least 16 bytes")
        if not (self.lease > 0 and 0 <= self.latency < 60):
            raise ConfigurationError("lease must be positive and latency 0-60 seconds")
        if not 0 <= self.order_timeout < 86400 * 365:
            raise ConfigurationError(
                "order_timeout must be 0 (off) or a positive number of seconds"
            )

    @property
    def store(self) -> str:
        """oncely's store URL (the SQLite default lives in the work directory)."""
        return self.store_url or f"sqlite:///{self.workdir / 'oncely.db'}?synchronous=NORMAL"

    @property
    def shop_db(self) -> Path:
        return self.workdir / "shop.db"

    @property
    def queue_db(self) -> Path:
        """The embedded queue shipping goes through (:mod:`oncely.demo.shop.queue`)."""
        return self.workdir / "queue.db"

    @property
    def tag(self) -> str:
        """The name the shop's store connections carry, so faults hit only them."""
        return f"oncely_demo_{self.run}"

    @property
    def scheme(self) -> str:
        return self.store.split("://", 1)[0].split("+", 1)[0].lower()

    def store_options(self) -> dict[str, Any]:
        """Per-run isolation of the shop's records on a shared server, and a connection name."""
        if self.scheme in ("postgresql", "postgres"):
            return {"table": f"{self.tag}_records", "application_name": self.tag}
        if self.scheme in ("mysql", "mariadb"):
            return {"table": f"{self.tag}_records"}
        if self.scheme in ("redis", "rediss"):
            return {"prefix": self.tag, "client_name": self.tag}
        return {}

    def lock_target(self) -> tuple[str, dict[str, Any]]:
        """Lock URL and backend options for the settlement lock (MySQL has no lock backend:
        the lock then lives in the work directory's SQLite file)."""
        if self.scheme in ("postgresql", "postgres"):
            return self.store, {"table": f"{self.tag}_locks", "application_name": self.tag}
        if self.scheme in ("redis", "rediss"):
            return self.store, {"prefix": self.tag, "client_name": self.tag}
        if self.scheme == "sqlite":
            return self.store, {}
        return f"sqlite:///{self.workdir / 'locks.db'}", {}

    def dedup_target(self) -> tuple[str, dict[str, Any]]:
        """Store URL and options of the webhook dedup window (:class:`oncely.messaging.dedup.
        Deduplicator`): oncely's store, in a table / key prefix of this run's own."""
        if self.scheme in ("postgresql", "postgres", "mysql", "mariadb"):
            return self.store, {"table": f"{self.tag}_dedup"}
        if self.scheme in ("redis", "rediss"):
            return self.store, {"prefix": self.tag}
        return f"sqlite:///{self.workdir / 'oncely.db'}", {}

    def to_env(self) -> dict[str, str]:
        return {
            "ONCELY_DEMO_DIR": str(self.workdir),
            "ONCELY_DEMO_STORE": self.store_url,
            "ONCELY_DEMO_PROTECTED": "1" if self.protected else "0",
            "ONCELY_DEMO_RUN": self.run,
            "ONCELY_DEMO_SECRET": self.secret,
            "ONCELY_DEMO_LEASE": repr(self.lease),
            "ONCELY_DEMO_LATENCY": repr(self.latency),
            "ONCELY_DEMO_TIMEOUT": repr(self.order_timeout),
        }

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Settings:
        env = dict(os.environ if env is None else env)
        workdir = env.get("ONCELY_DEMO_DIR")
        if not workdir:
            raise ConfigurationError("ONCELY_DEMO_DIR is not set: run the shop with `oncely demo`")
        return cls(
            workdir=Path(workdir),
            store_url=env.get("ONCELY_DEMO_STORE", ""),
            protected=env.get("ONCELY_DEMO_PROTECTED", "1") != "0",
            run=env.get("ONCELY_DEMO_RUN", "demo"),
            secret=env.get("ONCELY_DEMO_SECRET", ""),
            lease=float(env.get("ONCELY_DEMO_LEASE", "3")),
            latency=float(env.get("ONCELY_DEMO_LATENCY", "0.01")),
            order_timeout=float(env.get("ONCELY_DEMO_TIMEOUT", "0")),
        )
