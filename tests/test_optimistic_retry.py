"""retry_on_conflict: the retry decision (attempts, full jitter, what counts as a conflict) and
its sync and async faces, decorator and call forms."""

from __future__ import annotations

import asyncio
import functools

import pytest

from oncely.errors import ConfigurationError, StaleVersion
from oncely.optimistic import ConflictRetry, retry_on_conflict


def _stale(n: int = 1) -> StaleVersion:
    return StaleVersion("accounts id=1", n, n + 1)


def test_stale_version_carries_entity_expected_and_current() -> None:
    exc = _stale(4)
    assert (exc.entity, exc.expected, exc.current) == ("accounts id=1", 4, 5)
    assert "retry" in str(exc) and "version 5, not 4" in str(exc)


def test_sync_decorator_retries_until_success_and_counts_attempts() -> None:
    calls: list[int] = []

    @retry_on_conflict(attempts=5, base_delay=0.0)
    def flaky(x: int) -> int:
        calls.append(x)
        if len(calls) < 3:
            raise _stale()
        return x * 2

    assert flaky(21) == 42
    assert calls == [21, 21, 21]
    assert flaky.__name__ == "flaky"


def test_bare_decorator_and_call_form() -> None:
    calls = 0

    @retry_on_conflict
    def once() -> str:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise _stale()
        return "ok"

    assert once() == "ok" and calls == 2

    def add(a: int, b: int) -> int:
        return a + b

    assert retry_on_conflict(add, attempts=2)(1, 2) == 3


def test_gives_up_after_attempts_with_the_last_conflict() -> None:
    calls = 0

    def always() -> None:
        nonlocal calls
        calls += 1
        raise _stale(calls)

    with pytest.raises(StaleVersion) as info:
        retry_on_conflict(always, attempts=4, base_delay=0.0)()
    assert calls == 4
    assert info.value.expected == 4  # the last conflict propagates unchanged


def test_other_errors_propagate_at_once() -> None:
    calls = 0

    @retry_on_conflict(attempts=5)
    def broken() -> None:
        nonlocal calls
        calls += 1
        raise KeyError("no")

    with pytest.raises(KeyError):
        broken()
    assert calls == 1


def test_retry_on_predicate_and_tuple() -> None:
    policy = ConflictRetry(retry_on=lambda e: isinstance(e, OSError) and e.errno == 40001)
    assert policy.retries(OSError(40001, "serialization failure"))
    assert not policy.retries(OSError(1, "other"))
    assert not policy.retries(_stale())
    both = ConflictRetry(retry_on=(StaleVersion, TimeoutError))
    assert both.retries(TimeoutError()) and both.retries(_stale())


def test_full_jitter_delays_stay_within_the_exponential_cap() -> None:
    seen: list[tuple[int, float]] = []
    policy = ConflictRetry(
        attempts=12, base_delay=0.01, max_delay=0.2, on_retry=lambda e, n, d: seen.append((n, d))
    )
    for attempt in range(1, 12):
        for _ in range(200):
            delay = policy.next_delay(_stale(), attempt)
            assert delay is not None
            assert 0.0 <= delay <= min(0.2, 0.01 * 2 ** (attempt - 1))
    assert policy.next_delay(_stale(), 12) is None  # attempts used up
    # full jitter: spread over the whole interval, not clustered at the cap
    delays = [d for n, d in seen if n == 8]
    assert min(delays) < 0.05 and max(delays) > 0.15
    assert seen[0][0] == 1


@pytest.mark.parametrize(
    "options",
    [
        {"attempts": 0},
        {"attempts": True},
        {"attempts": 2.5},
        {"base_delay": -1},
        {"max_delay": "1 jiffy"},
        {"retry_on": int},
        {"retry_on": ()},
        {"retry_on": "StaleVersion"},
        {"base_delay": 2, "max_delay": 1},  # red team 17 #12: the cap would hide the doubling
        {"base_delay": 1},  # above the default max_delay (0.5 s)
    ],
)
def test_bad_options_are_configuration_errors(options: dict[str, object]) -> None:
    with pytest.raises(ConfigurationError):
        retry_on_conflict(**options)  # type: ignore[call-overload]


def test_not_callable_is_refused() -> None:
    with pytest.raises(ConfigurationError):
        retry_on_conflict(42)  # type: ignore[call-overload]


async def test_async_function_gets_an_async_wrapper() -> None:
    calls = 0

    @retry_on_conflict(attempts=3, base_delay=0.0)
    async def flaky(x: int) -> int:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0)
        if calls < 3:
            raise _stale()
        return x

    assert asyncio.iscoroutinefunction(flaky)
    assert await flaky(7) == 7 and calls == 3

    async def always() -> None:
        raise _stale()

    with pytest.raises(StaleVersion):
        await retry_on_conflict(always, attempts=2, base_delay=0.0)()

    partial = functools.partial(flaky)
    calls = 0
    assert await retry_on_conflict(partial, base_delay=0.0)(1) == 1


async def test_async_cancel_during_backoff_propagates() -> None:
    started = asyncio.Event()

    @retry_on_conflict(attempts=5, base_delay=30.0, max_delay=30.0)
    async def conflicted() -> None:
        started.set()
        raise _stale()

    task = asyncio.ensure_future(conflicted())
    await started.wait()
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


def test_generator_functions_are_refused_when_decorated() -> None:
    """red team 17 #12: a generator function was "retried": calling it only built the
    generator, its StaleVersion came out while the caller iterated, outside the retry, and was
    never retried. Refused when decorated, saying why (sync and async generators)."""

    def gen() -> object:
        yield 1
        raise _stale()

    async def agen() -> object:
        yield 1
        raise _stale()

    for fn in (gen, agen, functools.partial(gen)):
        with pytest.raises(ConfigurationError, match="generator"):
            retry_on_conflict(fn)
        with pytest.raises(ConfigurationError, match="generator"):
            retry_on_conflict(attempts=3)(fn)
    # the way the message suggests: a function that runs it to the end is retried
    calls = 0

    def consumed() -> list[int]:
        nonlocal calls
        calls += 1
        items = []
        for item in (1, 2):
            items.append(item)
            if calls < 3:
                raise _stale()
        return items

    assert retry_on_conflict(consumed, base_delay=0.0)() == [1, 2]
    assert calls == 3
