"""A count passed in Python is an int on every store (docs/settings.md, "Counts sent to a
store"): ``purge_expired("5")`` and ``list(limit="5")`` were taken as 5 by every store, though
the docs say counts are ints. Now each store refuses the text alike, before anything is sent;
environment variables (text) are read by the settings and stay as they were."""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path
from typing import Any

import pytest

from oncely.errors import ConfigurationError
from oncely.settings import count, resolve
from oncely.stores import open_store

URLS = [
    "memory://",
    "sqlite:///{tmp}/count-types.db",
    "redis://127.0.0.1:1/0",  # refused before anything is sent: no server needed
    "postgresql://127.0.0.1:5432/test",
    "mysql://root@127.0.0.1:3306/test",
]


@pytest.mark.parametrize("url", URLS, ids=lambda u: u.split(":", 1)[0])
@pytest.mark.parametrize("value", ["5", "1000", ""])
def test_every_store_refuses_a_count_given_as_text(url: str, value: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        store: Any = open_store(url.format(tmp=tmp))
        try:
            for call in (
                lambda: store.purge_expired(value),
                lambda: store.list(limit=value),
                lambda: asyncio.run(store.apurge_expired(value)),
                lambda: asyncio.run(store.alist(limit=value)),
            ):
                with pytest.raises(ConfigurationError, match="expected an int, got str"):
                    call()
        finally:
            store.close()


def test_an_int_count_still_works_and_the_environment_is_still_text(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store: Any = open_store(f"sqlite:///{tmp_path}/ok.db")
    try:
        assert store.purge_expired(5) == 0
        assert store.list(limit=5) == []
    finally:
        store.close()
    assert count(7, "limit") == 7
    monkeypatch.setenv("ONCELY_LEASE", "30")
    assert resolve("lease") == 30.0
