"""Replays have the types of the first result: a property over every type JsonCodec accepts.

Values go through ``@idempotent`` (first call stores, second replays) and are compared
recursively with ``==`` *and* ``type(...) is type(...)``; Decimals also by representation.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime as dt
import enum
import math
import os
import uuid
import zoneinfo
from collections.abc import Callable, Iterator, Mapping, Sequence
from decimal import Decimal
from typing import Annotated, Any, Literal, NamedTuple, NewType, Optional, TypedDict, TypeVar

import pydantic
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from oncely import ConfigurationError, JsonCodec, SerializationError, idempotent
from oncely.stores.memory import MemoryStore

from conftest import stable_id


class Money(NamedTuple):
    amount: Decimal
    currency: str


class Colour(str, enum.Enum):
    RED = "red"
    GREEN = "green"


class Level(enum.IntEnum):
    LOW = 1
    HIGH = 2


class Mixed(enum.Enum):
    ONE = 1
    BEE = "b"
    OFF = None


class Perm(enum.Flag):
    R = 1
    W = 2
    X = 4


class Mode(enum.IntFlag):
    A = 1
    B = 2


@dataclasses.dataclass(frozen=True)
class Line:
    sku: str
    qty: int
    price: Decimal


@dataclasses.dataclass
class Invoice:
    lines: list[Line]
    total: Money
    when: dt.datetime
    status: Colour | None
    tags: frozenset[str]
    note: str = "none"
    computed: int = dataclasses.field(init=False, default=0)


@dataclasses.dataclass
class Node:
    name: str
    children: list[Node]


class Address(TypedDict, total=False):
    street: str
    zip: str
    since: dt.date


class Customer(pydantic.BaseModel):
    id: uuid.UUID
    balance: Decimal
    since: dt.date
    level: Level
    tags: tuple[str, ...]


Point = collections.namedtuple("Point", "x y")
UserId = NewType("UserId", str)

texts = st.text(max_size=8)
decimals = st.decimals(allow_nan=False)
# Whole seconds: a sub-second offset is refused (see NOT_WHAT_THE_ANNOTATION_SAYS).
offsets = st.integers(-23 * 3600, 23 * 3600).map(lambda s: dt.timezone(dt.timedelta(seconds=s)))
zones = st.none() | st.just(dt.timezone.utc) | offsets | st.timezones()
lines = st.builds(Line, texts, st.integers(), decimals)
moneys = st.builds(Money, decimals, texts)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | texts,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(texts, inner, max_size=3),
    max_leaves=6,
)


def nodes(depth: int = 2) -> st.SearchStrategy[Node]:
    children = st.lists(nodes(depth - 1), max_size=2) if depth else st.just([])
    return st.builds(Node, texts, children)


# (annotation, values, may be None)
Pair = tuple[Any, st.SearchStrategy[Any], bool]

HASHABLE: list[Pair] = [
    (str, texts, False),
    (int, st.integers(), False),
    (Decimal, decimals, False),
    (uuid.UUID, st.uuids(), False),
    (dt.date, st.dates(), False),
    (Colour, st.sampled_from(Colour), False),
    (Level, st.sampled_from(Level), False),
    (Money, moneys, False),
    (Line, lines, False),
]
LEAVES: list[Pair] = [
    *HASHABLE,
    (float, st.floats(allow_nan=False) | st.integers(), False),
    (bool, st.booleans(), False),
    (type(None), st.none(), True),
    (Any, json_values, True),
    (dt.datetime, st.datetimes(timezones=zones), False),
    (dt.time, st.times(timezones=st.none() | offsets), False),
    (Mixed, st.sampled_from(Mixed), True),  # Mixed.OFF is stored as null
    (Perm, st.integers(0, 7).map(Perm), False),
    (Mode, st.integers(0, 3).map(Mode), False),
    (Literal["a", 1, True, None, Colour.GREEN], st.sampled_from(["a", 1, True, None]), True),
    (Literal[Level.HIGH, "low"], st.sampled_from([Level.HIGH, "low"]), False),
    (UserId, texts.map(UserId), False),
    (Point, st.builds(Point, json_values, json_values), False),
    (Node, nodes(), False),
    (Address, st.fixed_dictionaries({}, optional={"street": texts, "since": st.dates()}), False),
    (
        Customer,
        st.builds(
            Customer,
            id=st.uuids(),
            balance=st.decimals(allow_nan=False, allow_infinity=False),
            since=st.dates(),
            level=st.sampled_from(Level),
            tags=st.lists(texts, max_size=2).map(tuple),
        ),
        False,
    ),
    (
        Invoice,
        st.builds(
            Invoice,
            lines=st.lists(lines, max_size=2),
            total=moneys,
            when=st.datetimes(timezones=zones),
            status=st.none() | st.sampled_from(Colour),
            tags=st.frozensets(texts, max_size=2),
            note=texts,
        ),
        False,
    ),
    (int | str | Money | None, st.none() | st.integers() | texts | moneys, True),
    (Decimal | int | list[Line], decimals | st.integers() | st.lists(lines, max_size=2), False),
    (Optional[dt.datetime], st.none() | st.datetimes(timezones=zones), True),  # noqa: UP045
]


def containers(inner: st.SearchStrategy[Pair]) -> st.SearchStrategy[Pair]:
    hashable = st.sampled_from(HASHABLE)
    return st.one_of(
        inner.map(lambda p: (list[p[0]], st.lists(p[1], max_size=3), False)),
        inner.map(lambda p: (tuple[p[0], ...], st.lists(p[1], max_size=3).map(tuple), False)),
        st.tuples(inner, inner).map(
            lambda ps: (tuple[ps[0][0], ps[1][0]], st.tuples(ps[0][1], ps[1][1]), False)
        ),
        inner.map(lambda p: (dict[str, p[0]], st.dictionaries(texts, p[1], max_size=3), False)),
        inner.map(
            lambda p: (dict[int, p[0]], st.dictionaries(st.integers(), p[1], max_size=3), False)
        ),
        inner.map(
            lambda p: (
                dict[Colour, p[0]],
                st.dictionaries(st.sampled_from(Colour), p[1], max_size=2),
                False,
            )
        ),
        inner.filter(lambda p: not p[2]).map(lambda p: (p[0] | None, st.none() | p[1], True)),
        inner.map(lambda p: (Annotated[p[0], "doc"], p[1], p[2])),
        hashable.map(lambda p: (frozenset[p[0]], st.frozensets(p[1], max_size=3), False)),
        hashable.map(lambda p: (set[p[0]], st.sets(p[1], max_size=3), False)),
    )


annotated_values = st.recursive(st.sampled_from(LEAVES), containers, max_leaves=4).flatmap(
    lambda p: st.tuples(st.just(p[0]), p[1])
)


def same(a: Any, b: Any, path: str = "value") -> None:
    """``a == b`` and the same type at every level (Decimals: the same digits and exponent)."""
    assert type(a) is type(b), f"{path}: {type(a).__name__} replayed as {type(b).__name__}"
    if isinstance(a, Decimal):
        assert a.compare_total(b) == 0, f"{path}: {a!r} replayed as {b!r}"
    elif isinstance(a, float):
        assert a == b and math.copysign(1, a) == math.copysign(1, b), f"{path}: {a} != {b}"
    elif isinstance(a, (dt.datetime, dt.time)):
        assert a == b and a.isoformat() == b.isoformat(), f"{path}: {a!r} replayed as {b!r}"
        assert type(a.tzinfo) is type(b.tzinfo), f"{path}: tzinfo {a.tzinfo!r} -> {b.tzinfo!r}"
        assert getattr(a.tzinfo, "key", None) == getattr(b.tzinfo, "key", None)
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{path}: {a!r} replayed as {b!r}"
        for i, (x, y) in enumerate(zip(a, b)):
            same(x, y, f"{path}[{i}]")
    elif isinstance(a, (set, frozenset)):
        assert a == b, f"{path}: {a!r} replayed as {b!r}"
        for x in a:
            same(x, next(y for y in b if y == x), f"{path} item")
    elif isinstance(a, dict):
        assert a == b, f"{path}: {a!r} replayed as {b!r}"
        for k, v in a.items():
            kb = next(k2 for k2 in b if k2 == k)
            same(k, kb, f"{path} key")
            same(v, b[kb], f"{path}[{k!r}]")
    elif dataclasses.is_dataclass(a):
        for f in dataclasses.fields(a):
            same(getattr(a, f.name), getattr(b, f.name), f"{path}.{f.name}")
    elif isinstance(a, pydantic.BaseModel):
        assert a == b
        for name in type(a).model_fields:
            same(getattr(a, name), getattr(b, name), f"{path}.{name}")
    else:
        assert a == b, f"{path}: {a!r} replayed as {b!r}"


def returning(hint: Any, value: Any = None) -> Callable[..., Any]:
    def make(k: str) -> Any:
        return value

    make.__annotations__ = {"k": str, "return": hint}
    return make


@settings(
    max_examples=int(os.environ.get("ONCELY_PROPERTY_EXAMPLES", "300")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
@given(annotated_values)
def test_every_accepted_type_replays_as_itself(pair: tuple[Any, Any]) -> None:
    hint, value = pair
    store = MemoryStore()
    fn = idempotent(store=store, name="codec.property", key=["k"])(returning(hint, value))
    first = fn("k")
    replay = fn("k")
    assert first is value
    same(value, replay)
    codec = JsonCodec(hint)
    same(value, codec.decode(codec.encode(value)))


def test_the_issue_examples_replay_as_themselves() -> None:
    store = MemoryStore()

    @idempotent(store=store, key=["k"])
    def price(k: str) -> Money:
        return Money(Decimal("10.50"), "EUR")

    @idempotent(store=store, key=["k"])
    def colour(k: str) -> Colour:
        return Colour.RED

    for fn in (price, colour):
        first, replay = fn("a"), fn("a")
        same(first, replay)
    assert price("a").amount == Decimal("10.50") and str(price("a").amount) == "10.50"
    assert colour("a") is Colour.RED


class Planet(enum.Enum):
    EARTH = (5.97e24, 6.37e6)


class Plain:
    pass


T = TypeVar("T")

REFUSED = [
    bytes,
    Sequence[int],
    Iterator[int],
    Mapping[str, int],
    Callable[[], int],
    Plain,
    T,
    Planet,
    str | Decimal,  # both JSON strings
    Colour | str,
    Line | Invoice,  # both JSON objects
    Money | list[int],  # both JSON arrays
    dict[float, int],
    dict[tuple[int, int], str],
    dict[Literal["a", 1], str],
    Literal[1, Level.LOW],  # the same stored value
    list[Plain],
    Optional[Sequence[int]],  # noqa: UP045
]


@pytest.mark.parametrize("hint", REFUSED, ids=repr)
def test_an_annotation_the_codec_cannot_rebuild_is_refused_when_decorated(hint: Any) -> None:
    with pytest.raises(ConfigurationError, match="return annotation"):
        idempotent(store="memory://", name="codec.refused", key=["k"])(returning(hint))


class OddZone(dt.tzinfo):
    def utcoffset(self, d: dt.datetime | None) -> dt.timedelta:
        return dt.timedelta(hours=1)

    def dst(self, d: dt.datetime | None) -> dt.timedelta:
        return dt.timedelta(0)


class SubLine(Line):
    pass


NOT_WHAT_THE_ANNOTATION_SAYS = [
    (list[int], (1, 2)),
    (tuple[int, int], [1, 2]),
    (tuple[int, int], (1, 2, 3)),
    (dict[str, Any], {"at": dt.datetime(2026, 1, 1)}),
    (dict[str, int], {1: 1}),
    (Any, (1,)),
    (Any, {"n": Decimal(1)}),
    (str, Colour.RED),  # a str enum member would replay as a plain str
    (int, True),
    (Line, SubLine("a", 1, Decimal(1))),
    (Money, ("1", "EUR")),
    (dt.date, dt.datetime(2026, 1, 1)),
    (dt.datetime, dt.datetime(2026, 1, 1, tzinfo=OddZone())),  # neither timezone nor ZoneInfo
    (Literal["a"], "b"),
    # CPython's fromisoformat reads "+00:00:00.000001" as UTC: refused, not stored as UTC.
    (dt.time, dt.time(tzinfo=dt.timezone(dt.timedelta(microseconds=1)))),
    (Address, {"street": "x", "unknown": 1}),
]


@pytest.mark.parametrize(("hint", "value"), NOT_WHAT_THE_ANNOTATION_SAYS, ids=stable_id)
def test_a_value_that_would_replay_as_another_type_is_refused_not_stored(
    hint: Any, value: Any
) -> None:
    runs = []

    def make(k: str) -> Any:
        runs.append(k)
        return value

    make.__annotations__ = {"k": str, "return": hint}
    fn = idempotent(store=MemoryStore(), name="codec.mismatch", key=["k"])(make)
    with pytest.raises(SerializationError, match="cannot be stored"):
        fn("k")
    with pytest.raises(SerializationError, match="already ran"):
        fn("k")
    assert runs == ["k"]


def test_zoneinfo_times_keep_their_zone_and_wall_time_across_dst() -> None:
    paris = zoneinfo.ZoneInfo("Europe/Paris")
    codec = JsonCodec(list[dt.datetime])
    moments = [
        dt.datetime(2026, 10, 25, 2, 30, tzinfo=paris, fold=0),  # ambiguous: first 02:30
        dt.datetime(2026, 10, 25, 2, 30, tzinfo=paris, fold=1),  # ambiguous: second 02:30
        dt.datetime(2026, 3, 29, 2, 30, tzinfo=paris),  # in the spring-forward gap
    ]
    replay = codec.decode(codec.encode(moments))
    for a, b in zip(moments, replay):
        assert b.tzinfo is paris and a.utcoffset() == b.utcoffset()
        same(a, b)
    assert b"[Europe/Paris]" in codec.encode(moments)


def test_a_class_defined_in_a_function_or_later_in_the_module_is_resolved() -> None:
    @dataclasses.dataclass
    class Local:
        amount: Decimal

    @idempotent(store="memory://", key=["k"])
    def local(k: str) -> Local:
        return Local(Decimal("1.5"))

    assert type(local("a")) is Local and local("a") == Local(Decimal("1.5"))
    assert type(later("a")) is DefinedLater and later("a") == DefinedLater(Level.HIGH)


@idempotent(store="memory://", key=["k"])
def later(k: str) -> DefinedLater:
    return DefinedLater(Level.HIGH)


@dataclasses.dataclass
class DefinedLater:
    level: Level


def test_a_name_that_never_resolves_is_a_configuration_error_before_the_body_runs() -> None:
    runs = []

    @idempotent(store="memory://", key=["k"])
    def ghost(k: str) -> NeverDefined:  # type: ignore[name-defined]  # noqa: F821
        runs.append(k)

    with pytest.raises(ConfigurationError, match="NeverDefined"):
        ghost("a")
    assert runs == []


def test_a_circular_or_too_deep_value_is_a_serialization_error() -> None:
    # F09 (redteam3): the codec let a bare RecursionError out.
    circular: dict[str, Any] = {}
    circular["self"] = circular
    deep: list[Any] = []
    for _ in range(5000):
        deep = [deep]
    for value in (circular, deep):
        with pytest.raises(SerializationError, match="circular reference"):
            JsonCodec().encode(value)
