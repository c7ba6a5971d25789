"""A background completion still retrying when its event loop ends is cancelled by
``asyncio.run``; that must be logged as an error (the key is then left to its lease, and a
retry after it runs the call again), not dropped silently: the double run of
``test_a_moved_ask_storm_…[plain-tasks]`` was such a completion, without a word in the logs."""

from __future__ import annotations

import asyncio
import logging

import pytest

from oncely.core.settle import asettle_later
from oncely.errors import StoreUnavailable


def test_a_background_completion_cut_off_by_the_loop_ending_is_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    ended: list[bool] = []
    tries: list[int] = []

    async def write() -> None:
        tries.append(1)
        raise StoreUnavailable("down")

    async def main() -> None:
        asettle_later(write, lambda: ended.append(True), "the result of f")
        while not tries:  # the first write has failed: the plan now pauses 0.1 s
            await asyncio.sleep(0)

    with caplog.at_level(logging.ERROR, logger="oncely"):
        asyncio.run(main())
    assert ended == [True]
    assert any("storing the result of f was abandoned" in r.getMessage() for r in caplog.records), (
        caplog.text
    )
