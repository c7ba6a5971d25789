"""The default key of ``@idempotent`` keeps every argument's type, and the decorator refuses
functions whose return value is work not done yet (a coroutine, a generator).

Red-team inputs (session brief, items 1 and 2): a ``Charge(amount=5)`` and a ``Refund(amount=5)``
got one key, so the refund replayed the charge's result; so did ``Decimal("5")`` and ``"5"``,
``{1: x}`` and ``{"1": x}``, a set and a list. A plain ``def`` returning a coroutine was handed
to the codec.
"""

from __future__ import annotations

import asyncio
import collections
import copy
import dataclasses
import datetime as dt
import enum
import functools
import uuid
from collections.abc import AsyncIterator, Iterator
from decimal import Decimal
from typing import Any, NamedTuple

import attrs
import pydantic
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from oncely import ConfigurationError, IdempotencyKeyMismatch, InvalidKey, idempotent
from oncely.errors import UnfinishedResult
from oncely.functions.keys import typed_canonical
from oncely.stores.memory import MemoryStore

from conftest import stable_id


@dataclasses.dataclass(frozen=True)
class Charge:
    amount: Any


@dataclasses.dataclass(frozen=True)
class Refund:
    amount: Any


class ChargeModel(pydantic.BaseModel):
    amount: Any


class RefundModel(pydantic.BaseModel):
    amount: Any


@attrs.frozen
class ChargeAttrs:
    amount: Any


@attrs.frozen
class RefundAttrs:
    amount: Any


class Color(enum.IntEnum):
    RED = 1


class Mode(str, enum.Enum):
    FAST = "fast"


class Point(NamedTuple):
    x: Any
    y: Any


# -- the red team's inputs, through the decorator ------------------------------------------------
SAME_LOOKING = [
    (Charge(5), Refund(5)),
    (ChargeModel(amount=5), RefundModel(amount=5)),
    (ChargeAttrs(5), RefundAttrs(5)),
    (Charge(5), {"amount": 5}),
    (ChargeModel(amount=5), {"amount": 5}),
    (Decimal("5"), "5"),
    (Decimal("5"), 5),
    ({1: "x"}, {"1": "x"}),
    ({True: "x"}, {"true": "x"}),
    ({1, 2}, [1, 2]),
    (frozenset({1}), {1}),
    ((1, 2), [1, 2]),
    (True, 1),
    ([True], [1]),
    ({True}, {"True"}),
    (1.0, 1),
    ({"a": 1.0}, {"a": 1}),
    (Color.RED, 1),
    (Mode.FAST, "fast"),
    (uuid.UUID(int=5), str(uuid.UUID(int=5))),
    (dt.date(2024, 1, 2), "2024-01-02"),
    (dt.datetime(2024, 1, 2, 3, 4), "2024-01-02T03:04:00"),
    (b"ab", "ab"),
    (Point(1, 2), (1, 2)),
    (collections.OrderedDict(a=1), {"a": 1}),
    (None, "None"),
    ([None], []),
]


RUNS: list[Any] = []


def _pay(operation: Any, note: Any = None) -> int:
    RUNS.append(operation)
    return len(RUNS)


def _payer() -> Any:
    RUNS.clear()
    return idempotent(store=MemoryStore(), name="pay")(_pay)


@pytest.mark.parametrize(("first", "second"), SAME_LOOKING, ids=repr)
def test_calls_that_differ_only_in_type_both_run(first: Any, second: Any) -> None:
    pay, runs = _payer(), RUNS
    assert pay(first) == 1
    assert pay(second) == 2, "the second call replayed the first call's result"
    assert pay(first) == 1 and pay(second) == 2  # each replays its own
    assert len(runs) == 2


@pytest.mark.parametrize(("first", "second"), SAME_LOOKING[:12], ids=repr)
def test_validate_counts_types_too(first: Any, second: Any) -> None:
    @idempotent(store=MemoryStore(), key=["order"], validate=["amount"])
    def pay(order: str, amount: Any) -> str:
        return order

    pay("o-1", first)
    with pytest.raises(IdempotencyKeyMismatch):
        pay("o-1", second)


def test_equal_arguments_in_another_order_or_copy_share_a_key() -> None:
    pay, runs = _payer(), RUNS
    first = {"b": [Charge(Decimal("1.50"))], "a": {3, 1, 2}}
    assert pay(first) == 1
    assert pay({"a": {2, 3, 1}, "b": [Charge(Decimal("1.50"))]}) == 1
    assert pay(copy.deepcopy(first), None) == 1
    assert pay(operation=first) == 1
    assert len(runs) == 1


class Opaque:
    """An object with no exact text form: refused, never keyed by its repr or id."""


@pytest.mark.parametrize(
    "bad",
    [Opaque(), [1, Opaque()], {"k": Opaque()}, Charge(Opaque()), object(), lambda: 1],
    ids=stable_id,
)
def test_an_argument_without_an_exact_text_is_refused_naming_it(bad: Any) -> None:
    pay, runs = _payer(), RUNS
    with pytest.raises(InvalidKey, match="argument 'operation'"):
        pay(bad)
    assert runs == []


def test_an_argument_that_contains_itself_is_refused() -> None:
    loop: list[Any] = []
    loop.append(loop)
    with pytest.raises(InvalidKey, match="contains itself"):
        _payer()(loop)


# -- the property: same key only for equal values of the same types -----------------------------
def typed_equal(a: Any, b: Any) -> bool:
    """Equal, and of the same type at every level (what the key must tell apart)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(typed_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        if len(a) != len(b):
            return False
        for k, v in a.items():
            match = [k2 for k2 in b if typed_equal(k, k2)]
            if len(match) != 1 or not typed_equal(v, b[match[0]]):
                return False
        return True
    if isinstance(a, (set, frozenset)):
        return len(a) == len(b) and all(any(typed_equal(x, y) for y in b) for x in a)
    if dataclasses.is_dataclass(a) or attrs.has(type(a)):
        return typed_equal(
            vars(a) if not attrs.has(type(a)) else attrs.asdict(a, recurse=False),
            vars(b) if not attrs.has(type(b)) else attrs.asdict(b, recurse=False),
        )
    if isinstance(a, pydantic.BaseModel):
        return typed_equal(dict(a), dict(b))
    if isinstance(a, float):
        return repr(a) == repr(b)
    if isinstance(a, Decimal):
        return str(a) == str(b)
    return bool(a == b)


scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 3),
    st.floats(-3, 3, allow_nan=False).map(lambda f: round(f, 1)),
    st.sampled_from(["", "1", "a", "true", "None", "1.0", "x"]),
    st.decimals(-3, 3, places=1, allow_nan=False, allow_infinity=False),
    st.sampled_from([Color.RED, Mode.FAST, uuid.UUID(int=1), dt.date(2024, 1, 1), b"1"]),
)
hashables = st.recursive(scalars, lambda inner: st.frozensets(inner, max_size=3), max_leaves=4)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.lists(inner, max_size=3).map(tuple),
        st.dictionaries(hashables, inner, max_size=3),
        st.sets(hashables, max_size=3),
        st.builds(Charge, inner),
        st.builds(Refund, inner),
        st.builds(ChargeAttrs, inner),
        st.builds(RefundAttrs, inner),
        inner.map(lambda v: ChargeModel(amount=v)),
        inner.map(lambda v: RefundModel(amount=v)),
    ),
    max_leaves=8,
)


def _converted(value: Any) -> list[Any]:
    """Look-alikes of ``value``: same printed form or same JSON, another type."""
    out: list[Any] = [str(value), repr(value)]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        out += [float(value), int(value), Decimal(str(value)), bool(value)]
    if isinstance(value, (list, tuple, set, frozenset)):
        out += [list(value), tuple(value), set(value) if all(map(_hashable, value)) else []]
    if isinstance(value, dict):
        out += [{str(k): v for k, v in value.items()}, list(value.items())]
    if isinstance(value, (Charge, Refund, ChargeAttrs, RefundAttrs)):
        out += [Refund(value.amount), Charge(value.amount), ChargeAttrs(value.amount)]
        out += [RefundModel(amount=value.amount), {"amount": value.amount}]
    return out


def _hashable(value: Any) -> bool:
    try:
        hash(value)
    except TypeError:
        return False
    return True


@settings(max_examples=400, deadline=None)
@given(st.data())
def test_same_key_only_if_equal_and_of_the_same_types(data: st.DataObject) -> None:
    first = data.draw(st.tuples(values, values))
    twin = st.sampled_from([copy.deepcopy(v) for v in first])
    second = data.draw(
        st.one_of(
            st.tuples(values, values),
            st.tuples(st.sampled_from(_converted(first[0])), st.just(first[1])),
            st.tuples(st.just(first[0]), st.sampled_from(_converted(first[1]))),
            st.tuples(twin, twin),
        )
    )
    key = typed_canonical({"a": first[0], "b": first[1]})
    other = typed_canonical({"a": second[0], "b": second[1]})
    if key == other:
        assert typed_equal(first, second), (first, second)
    assert typed_canonical({"a": copy.deepcopy(first[0]), "b": copy.deepcopy(first[1])}) == key


# -- functions whose result is work not done yet (item 2) ----------------------------------------
async def _later() -> int:
    return 5


def test_a_generator_function_is_refused_when_decorated() -> None:
    def numbers(n: int) -> Iterator[int]:
        yield n

    async def anumbers(n: int) -> AsyncIterator[int]:
        yield n

    for fn in (numbers, anumbers, functools.wraps(numbers)(lambda n: numbers(n))):
        with pytest.raises(UnfinishedResult, match="generator function"):
            idempotent(store="memory://", name="gen")(fn)
    assert issubclass(UnfinishedResult, ConfigurationError)


@pytest.mark.filterwarnings("error::RuntimeWarning")  # the coroutine is closed, never leaked
def test_a_plain_def_returning_a_coroutine_or_generator_is_refused_at_the_call() -> None:
    runs: list[int] = []
    inner = MemoryStore()

    @idempotent(store=inner, key=["n"])
    def returns_coroutine(n: int) -> Any:
        runs.append(n)
        return _later()

    @idempotent(store=inner, key=["n"])
    def returns_generator(n: int) -> Any:
        runs.append(n)
        return (i for i in range(n))

    for fn in (returns_coroutine, returns_generator):
        for _ in range(2):  # nothing was stored: the retry runs (and is refused) again
            with pytest.raises(UnfinishedResult, match="has not run yet"):
                fn(3)
    assert len(runs) == 4
    assert all(r.status != "completed" for r in inner.list())

    # An object whose __call__ is async is an async callable (oncely.core.calls): it is decorated
    # with the async face, awaited, and stored; its retry replays without running again.
    class Later:
        async def __call__(self, n: int) -> int:
            runs.append(n)
            return n

    later = idempotent(store=inner, key=["n"], name="later")(Later())
    assert asyncio.run(later(3)) == 3
    assert asyncio.run(later(3)) == 3
    assert len(runs) == 5


@pytest.mark.filterwarnings("error::RuntimeWarning")
def test_an_async_def_returning_a_coroutine_is_refused() -> None:
    @idempotent(store=MemoryStore(), key=["n"])
    async def double_wrapped(n: int) -> Any:
        return _later()

    with pytest.raises(UnfinishedResult, match="await it"):
        asyncio.run(double_wrapped(1))
