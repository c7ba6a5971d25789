"""The plan runners of oncely.backends.plans, driven directly (no I/O: a plan is a generator
and an executor is any function, as h11's sans-IO core is tested)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from oncely.backends.plans import Exec, Plan, Sleep, arun, run


class Deadlock(Exception):
    pass


def retrying(attempts: int) -> Plan[str]:
    """Runs one statement, again on Deadlock, at most ``attempts`` times."""
    for attempt in range(1, attempts + 1):
        try:
            rows = yield Exec("claim", {"attempt": attempt})
        except Deadlock:
            if attempt == attempts:
                raise
            continue
        return f"{rows} after {attempt}"
    raise AssertionError("unreachable")


def failing_executor(fail: int) -> tuple[list[Any], Any]:
    seen: list[Any] = []

    def execute(request: Any) -> Any:
        seen.append(request)
        if len(seen) <= fail:
            raise Deadlock
        return "rows"

    return seen, execute


def test_the_reply_of_each_request_goes_back_into_the_plan() -> None:
    seen, execute = failing_executor(0)
    assert run(retrying(3), execute) == "rows after 1"
    assert seen == [Exec("claim", {"attempt": 1})]


def test_an_executor_error_is_thrown_into_the_plan_which_may_handle_it() -> None:
    seen, execute = failing_executor(2)
    assert run(retrying(3), execute) == "rows after 3"
    assert [r.params["attempt"] for r in seen] == [1, 2, 3]


def test_an_error_the_plan_does_not_handle_reaches_the_caller() -> None:
    seen, execute = failing_executor(5)
    with pytest.raises(Deadlock):
        run(retrying(2), execute)
    assert len(seen) == 2


def test_a_plan_that_sends_nothing_returns_its_outcome() -> None:
    def nothing() -> Plan[int]:
        return 7
        yield  # a plan that sends nothing

    assert run(nothing(), lambda request: pytest.fail("nothing to execute")) == 7


def cleaned_up(log: list[str]) -> Plan[str]:
    """Holds a resource across a wait and gives it back whatever happens (a request in finally)."""
    handle = yield "open"
    try:
        yield Sleep(10)
        return "done"
    finally:
        log.append(f"closing {handle}")
        yield ("close", handle)


async def test_a_cancelled_async_run_still_carries_out_the_plans_cleanup() -> None:
    log: list[str] = []
    started = asyncio.Event()

    async def execute(request: Any) -> Any:
        log.append(repr(request))
        if request == "open":
            return "conn-1"
        if isinstance(request, Sleep):
            started.set()
            await asyncio.sleep(request.seconds)
        return None

    task = asyncio.create_task(arun(cleaned_up(log), execute))
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert log[-2:] == ["closing conn-1", "('close', 'conn-1')"]


async def test_the_async_runner_gives_the_same_outcome_as_the_sync_one() -> None:
    seen, execute = failing_executor(1)

    async def aexecute(request: Any) -> Any:
        return execute(request)

    assert await arun(retrying(3), aexecute) == "rows after 2"
    assert len(seen) == 2
