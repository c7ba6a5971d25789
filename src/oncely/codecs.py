"""How results are stored: bytes plus a codec name, JSON by default (never pickle by default).

:class:`JsonCodec` is bound to a function's return annotation. Binding compiles the annotation
into a plan that writes the value as JSON and rebuilds *exactly* the same types on replay; an
annotation it cannot rebuild raises :class:`~oncely.errors.ConfigurationError` when the codec
is made (that is, when the function is decorated), and a value that does not fit the
annotation raises :class:`~oncely.errors.SerializationError` instead of being stored in a
form that would replay as something else.

=====================================================  ==========================================
Annotation                                             Stored as
=====================================================  ==========================================
``str``, ``int``, ``float`` (an ``int`` too), ``bool``  itself
``None``, no annotation, ``Any``, ``object``           JSON values only (str, int, float, bool,
                                                       None, list, dict with str keys)
``Decimal``                                            ``str(value)``: digits and exponent kept
``datetime``, ``date``, ``time``                       ISO 8601; a ``zoneinfo`` zone is kept as
                                                       an RFC 9557 suffix ``…+01:00[Europe/Paris]``
``uuid.UUID``                                          its string
``Enum`` (``str``/``int`` mixins, ``IntEnum``,         the member's value (member values must be
``Flag``, ``IntFlag``)                                 str, int, float, bool or None)
``Literal[...]`` of those values or of enum members    the value
``list[T]``, ``tuple[T, ...]``, ``tuple[A, B]``,       a JSON array (sets sorted)
``set[T]``, ``frozenset[T]``, ``NamedTuple``
``dict[K, V]`` (``K``: ``str``, ``int``, ``UUID``,      a JSON object
enums, ``Literal``); ``TypedDict``; dataclasses;
pydantic v2 models
``A | B``, ``Optional[A]``                             the arm's form; arms must be told apart by
                                                       their JSON kind (``Decimal | str`` is
                                                       refused: both are JSON strings)
``Annotated[T, ...]``, ``NewType``                     as ``T``
=====================================================  ==========================================

Anything else (``bytes``: use :class:`RawCodec`; abstract types such as ``Sequence[int]``;
plain classes; ``TypeVar``) is refused. Types are matched exactly: a ``tuple`` returned where
the annotation says ``list[int]``, or a subclass of a dataclass, is refused, because the replay
would give back another type.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import itertools
import json
import math
import types
import typing
import uuid
import zoneinfo
from collections.abc import Callable, Iterable, Mapping
from decimal import Decimal
from typing import Any, Protocol, Union

from oncely.errors import ConfigurationError, SerializationError

__all__ = [
    "Codec",
    "JsonCodec",
    "RawCodec",
    "encode_result",
    "plain_json_problem",
    "plan_for",
    "rebuild",
    "stored_json",
    "to_jsonable",
]


class Codec(Protocol):
    """Turns results into bytes and back. ``name`` is stored with each record.

    A codec may also define ``bind(type_hint, localns) -> Codec``: ``@idempotent`` then calls
    it once, when decorating, with the function's return annotation (as :class:`JsonCodec`
    does), and uses the codec it returns.
    """

    name: str

    def encode(self, value: Any) -> bytes: ...

    def decode(self, data: bytes, type_hint: Any = None) -> Any: ...


_TOO_DEEP = (
    "the result cannot be stored: it refers to itself (a circular reference) or is nested too "
    "deeply to encode"
)


def encode_result(codec: Codec, value: Any) -> bytes:
    """``codec.encode(value)``, with every failure to encode made a
    :class:`~oncely.errors.SerializationError`.

    The one way oncely encodes a value it must store after the work ran (``@idempotent``
    results, ``tx.set_result``): whatever a codec raises -- its own ``SerializationError``, a
    ``RecursionError`` from a circular or very deep value, a custom codec's ``KeyError`` --
    means "ran, result not storable", never an error that would leave the key claimed until
    its lease runs out (and a retry run the work again). ``BaseException`` that is not an
    ``Exception`` (``KeyboardInterrupt``, cancellation) passes through.

    :raises SerializationError: the value cannot be encoded (the cause is chained).
    """
    try:
        return codec.encode(value)
    except SerializationError:
        raise
    except RecursionError as exc:
        raise SerializationError(_TOO_DEEP) from exc
    except Exception as exc:
        raise SerializationError(
            f"the result cannot be stored: {type(codec).__name__}.encode raised "
            f"{type(exc).__name__}: {exc}"
        ) from exc


def to_jsonable(value: Any) -> Any:
    """``json.dumps`` ``default=`` hook rendering common types (used to render keys)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    dump = getattr(value, "model_dump", None)
    if callable(dump):  # pydantic v2 model
        return dump(mode="json")
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, (dt.datetime, dt.date, dt.time)):
        return value.isoformat()
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, (set, frozenset)):
        return sorted(value, key=repr)
    if isinstance(value, (bytes, bytearray)):
        raise TypeError("bytes are not JSON; return str, or use codec=RawCodec() for raw bytes")
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


def plain_json_problem(value: Any, path: str) -> str | None:
    """Where ``value`` is not plain JSON (what a JSON round trip gives back unchanged: dict
    with str keys, list, str, int, finite float, bool, None, of exactly those types), or None."""
    kind = type(value)
    if value is None or kind in (str, int, bool):
        return None
    if kind is float:
        return None if math.isfinite(value) else f"{path} is {value!r} (JSON has no NaN/Infinity)"
    if kind is list:
        for i, item in enumerate(value):
            found = plain_json_problem(item, f"{path}[{i}]")
            if found:
                return found
        return None
    if kind is dict:
        for key, item in value.items():
            if type(key) is not str:
                back = str(key)
                return (
                    f"{path} has the key {key!r} (JSON keys are str: it would come back {back!r})"
                )
            found = plain_json_problem(item, f"{path}[{key!r}]")
            if found:
                return found
        return None
    text = repr(value)
    text = text if len(text) <= 120 else text[:117] + "..."
    return (
        f"{path} is {text} ({kind.__name__}: it would come back as another type; "
        "pass str, int, float, bool, None, list or dict)"
    )


def stored_json(
    value: Any,
    what: str,
    *,
    plain: bool = False,
    path: str = "data",
    why: str = "",
    default: Callable[[Any], Any] | None = None,
    sort_keys: bool = False,
    separators: tuple[str, str] | None = None,
) -> str:
    """``value`` as the JSON text oncely stores or sends (an outbox payload, saga data,
    recovery-point state): the one place caller data becomes stored JSON, so every mechanism
    refuses the same things with the same error, before anything is written.

    Refused: NaN and Infinity (``allow_nan=False``: they are not JSON, and a strict consumer,
    PostgreSQL ``jsonb`` or another language cannot read them), objects JSON has no form for
    (after ``default``), and, with ``plain=True``, anything a JSON round trip does not give
    back unchanged (:func:`plain_json_problem`: a Decimal, a tuple, a datetime...).

    :param what: names the value in the message (``"saga s 'id': data"``); ``path`` names it
        where :func:`plain_json_problem` points inside it.
    :param why: appended to "must be (plain) JSON" in the message.
    :raises ConfigurationError: ``value`` cannot be stored as JSON (the message says where).
    """
    try:
        found = plain_json_problem(value, path) if plain else None
        if found is None:
            return json.dumps(
                value,
                default=default,
                allow_nan=False,
                sort_keys=sort_keys,
                separators=separators,
            )
    except ValueError as exc:  # allow_nan=False: a NaN or Infinity (possibly from default)
        found = f"{exc} (JSON has no NaN/Infinity)"
    except (TypeError, RecursionError) as exc:
        found = f"{type(exc).__name__}: {exc}"
    raise ConfigurationError(
        f"{what} must be {'plain JSON' if plain else 'JSON'}{why}: {found}; "
        "it was not written (nor anything with it)"
    )


# -- plans: one compiled (dump, load) pair per annotation ------------------------------------

#: The JSON kinds a decoded value can have; a union dispatches on them.
_ALL_KINDS = frozenset({"null", "bool", "int", "float", "string", "array", "object"})
_NATIVE = (str, int, float, bool, type(None))
_KIND_OF: dict[type, str] = {
    type(None): "null",
    bool: "bool",
    int: "int",
    float: "float",
    str: "string",
    list: "array",
    dict: "object",
}


def _is(value: Any, cls: type) -> bool:
    """``type(value) is cls``, without narrowing ``value`` for the type checker."""
    return type(value) is cls


def _name(hint: Any) -> str:
    return hint.__qualname__ if isinstance(hint, type) else repr(hint).replace("typing.", "")


class _Refused(Exception):
    """A value ``dump`` cannot store; ``where`` collects the path on the way out (innermost
    first), so the common case builds no path strings at all."""

    def __init__(self, problem: str) -> None:
        super().__init__(problem)
        self.problem, self.where = problem, list[str]()

    def at(self, segment: str) -> _Refused:
        self.where.append(segment)
        return self

    def error(self) -> SerializationError:
        where = "the result" + "".join(reversed(self.where))
        return SerializationError(f"{where} cannot be stored: {self.problem}")


def _refuse(expected: str, value: Any, hint: str = "") -> _Refused:
    return _Refused(
        f"the return annotation says {expected}, but it is a {type(value).__qualname__}, which "
        f"the replay would not give back{hint}. Return what the annotation says, or fix the "
        "annotation"
    )


def _json_only(value: Any) -> bool:
    """Whether ``value`` is made of JSON values only (exact types: no tuples, no subclasses)."""
    kind = type(value)
    if kind is str or kind is int or kind is float or kind is bool or value is None:
        return True
    if kind is list:
        for item in value:  # noqa: SIM110 (a loop is faster than all() over a generator)
            if not _json_only(item):
                return False
        return True
    if kind is dict:
        for key, item in value.items():
            if type(key) is not str or not _json_only(item):
                return False
        return True
    return False


class Plan:
    """How one annotated type is written as JSON (``dump``) and rebuilt (``load``).

    ``kinds``: the JSON kinds ``dump`` produces. ``identity``: ``load`` returns decoded JSON as it
    is (so arms of a union that share a kind can all be served by passing the value through).
    ``dump`` raises ``_Refused`` for a value the replay would not give back as it is; ``load``
    raises ``ValueError``/``TypeError``/``KeyError`` when stored data does not fit.
    """

    kinds: frozenset[str] = _ALL_KINDS
    identity = False
    label = "?"

    def accepts(self, value: Any) -> bool:
        raise NotImplementedError

    def dump(self, value: Any) -> Any:
        raise NotImplementedError

    def load(self, data: Any) -> Any:
        raise NotImplementedError


class _AnyPlan(Plan):
    """No annotation, ``Any`` or ``object``: JSON values only (nothing says what to rebuild)."""

    identity = True
    label = "Any"

    def accepts(self, value: Any) -> bool:
        return True

    def dump(self, value: Any) -> Any:
        if _json_only(value):
            return value
        raise self._locate(value)

    def _locate(self, value: Any) -> _Refused:
        """The refusal for the first part of ``value`` that is not JSON (the slow path)."""
        if type(value) is list:
            for i, item in enumerate(value):
                if not _json_only(item):
                    return self._locate(item).at(f"[{i}]")
        if type(value) is dict:
            for key, item in value.items():
                if type(key) is not str:
                    return _refuse("a JSON object key (str)", key).at(f" key {key!r}")
                if not _json_only(item):
                    return self._locate(item).at(f"[{key!r}]")
        hint = " (annotate the exact return type so the replay can rebuild it)"
        return _refuse("Any (or nothing)", value, hint)

    def load(self, data: Any) -> Any:
        return data


class _Scalar(Plan):
    identity = True

    def __init__(self, label: str, accepted: tuple[type, ...]) -> None:
        self.label, self.accepted = label, accepted
        self.kinds = frozenset(_KIND_OF[t] for t in accepted)

    def accepts(self, value: Any) -> bool:
        return type(value) in self.accepted

    def dump(self, value: Any) -> Any:
        if type(value) not in self.accepted:
            raise _refuse(self.label, value)
        return value

    def load(self, data: Any) -> Any:
        if type(data) not in self.accepted:
            raise TypeError(f"stored {type(data).__name__}, expected {self.label}")
        return data


def _dump_datetime(value: dt.datetime) -> str:
    tz = value.tzinfo
    if tz is None or type(tz) is dt.timezone:
        return value.isoformat()
    if isinstance(tz, zoneinfo.ZoneInfo) and tz.key:
        return f"{value.isoformat()}[{tz.key}]"  # RFC 9557 time zone suffix
    raise TypeError(f"tzinfo {tz!r}: only datetime.timezone and zoneinfo.ZoneInfo can be stored")


def _load_datetime(text: str) -> dt.datetime:
    stamp, _, zone = text.partition("[")
    moment = dt.datetime.fromisoformat(stamp)
    if not zone:
        return moment
    tz = zoneinfo.ZoneInfo(zone.rstrip("]"))
    wall, offset = moment.replace(tzinfo=None), moment.utcoffset()
    for fold in (0, 1):  # keep the stored wall time (and fold) in its zone
        candidate = wall.replace(tzinfo=tz, fold=fold)
        if candidate.utcoffset() == offset:
            return candidate
    return moment.astimezone(tz)  # the zone's rules changed since: keep the instant


def _dump_time(value: dt.time) -> str:
    if value.tzinfo is not None and type(value.tzinfo) is not dt.timezone:
        raise TypeError(f"tzinfo {value.tzinfo!r}: a time can carry only a datetime.timezone")
    return value.isoformat()


class _Exact(Plan):
    """Values of exactly one class ``cls`` (a subclass would replay as ``cls``: refused).

    ``stored``: the type of decoded JSON that ``read`` takes (``str``, ``list``, ``dict``).
    """

    cls: type = object
    stored: type | None = None

    def accepts(self, value: Any) -> bool:
        return _is(value, self.cls)

    def dump(self, value: Any) -> Any:
        if not _is(value, self.cls):
            raise _refuse(self.label, value)
        return self.write(value)

    def load(self, data: Any) -> Any:
        if self.stored is not None and not _is(data, self.stored):
            raise TypeError(
                f"stored {type(data).__name__}, expected {self.stored.__name__} for {self.label}"
            )
        return self.read(data)

    def write(self, value: Any) -> Any:
        raise NotImplementedError

    def read(self, data: Any) -> Any:
        raise NotImplementedError


def _dump_each(plans: Iterable[Plan], values: Iterable[Any]) -> list[Any]:
    out = []
    for i, (plan, item) in enumerate(zip(plans, values)):
        try:
            out.append(plan.dump(item))
        except _Refused as exc:
            raise exc.at(f"[{i}]") from None
    return out


class _Text(_Exact):
    """A type written as one JSON string."""

    kinds = frozenset({"string"})
    stored = str

    def __init__(self, cls: type, to_text: Callable[[Any], str], parse: Callable[[str], Any]):
        self.cls, self.to_text, self.parse, self.label = cls, to_text, parse, cls.__name__

    def read(self, data: Any) -> Any:
        return self.parse(data)

    def write(self, value: Any) -> Any:
        try:
            text = self.to_text(value)
            # Parse it back: a form the parser reads differently is refused, not stored.
            # (CPython's fromisoformat drops a sub-second UTC offset, for one.)
            if self.to_text(self.parse(text)) == text:
                return text
            problem = f"{value!r} does not read back as itself"
        except (TypeError, ValueError) as exc:
            problem = str(exc)
        raise _Refused(problem)


_TEXT_TYPES: dict[Any, _Text] = {
    Decimal: _Text(Decimal, str, Decimal),
    uuid.UUID: _Text(uuid.UUID, str, uuid.UUID),
    dt.datetime: _Text(dt.datetime, _dump_datetime, _load_datetime),
    dt.date: _Text(dt.date, dt.date.isoformat, dt.date.fromisoformat),
    dt.time: _Text(dt.time, _dump_time, dt.time.fromisoformat),
}
_SCALARS: dict[Any, _Scalar] = {
    str: _Scalar("str", (str,)),
    int: _Scalar("int", (int,)),
    float: _Scalar("float", (float, int)),  # PEP 484: an int is acceptable where float is
    bool: _Scalar("bool", (bool,)),
    type(None): _Scalar("None", (type(None),)),
}


class _EnumPlan(_Exact):
    def __init__(self, cls: type[enum.Enum]) -> None:
        self.cls, self.label = cls, cls.__qualname__
        values = [m.value for m in cls.__members__.values()]
        bad = [v for v in values if type(v) not in _NATIVE]
        if bad:
            raise TypeError(
                f"enum {cls.__qualname__} has member values of type {type(bad[0]).__name__}; "
                "only str, int, float, bool or None values can be stored"
            )
        self.kinds = frozenset(_KIND_OF[type(v)] for v in values)

    def write(self, value: Any) -> Any:
        return value.value

    def read(self, data: Any) -> Any:
        return self.cls(data)


class _LiteralPlan(Plan):
    def __init__(self, hint: Any) -> None:
        self.label = _name(hint)
        self.options = list(typing.get_args(hint))
        raws: list[tuple[type, Any]] = []
        for option in self.options:
            raw = option.value if isinstance(option, enum.Enum) else option
            if type(raw) not in _NATIVE or (type(raw), raw) in raws:
                raise TypeError(f"{self.label}: {option!r} cannot be told apart once stored")
            raws.append((type(raw), raw))
        self.raws = raws
        self.kinds = frozenset(_KIND_OF[t] for t, _ in raws)
        self.identity = not any(isinstance(o, enum.Enum) for o in self.options)

    def _index(self, value: Any) -> int | None:
        for i, option in enumerate(self.options):
            if option is value or (type(option) is type(value) and option == value):
                return i
        return None

    def accepts(self, value: Any) -> bool:
        return self._index(value) is not None

    def dump(self, value: Any) -> Any:
        index = self._index(value)
        if index is None:
            raise _refuse(self.label, value)
        return self.raws[index][1]

    def load(self, data: Any) -> Any:
        for option, (kind, raw) in zip(self.options, self.raws):
            if type(data) is kind and data == raw:
                return option
        raise ValueError(f"stored {data!r} is not one of {self.label}")


class _ListPlan(_Exact):
    kinds = frozenset({"array"})
    cls = stored = list

    def __init__(self, item: Plan) -> None:
        self.item, self.identity, self.label = item, item.identity, f"list[{item.label}]"

    def write(self, value: Any) -> Any:
        return _dump_each(itertools.repeat(self.item), value)

    def read(self, data: Any) -> Any:
        return data if self.identity else [self.item.load(v) for v in data]


class _TuplePlan(_Exact):
    """``tuple[A, B]``, ``tuple[T, ...]`` (``items`` None) and ``NamedTuple`` classes (``cls``)."""

    kinds = frozenset({"array"})
    stored = list

    def __init__(self, cls: type, items: list[Plan] | None, rest: Plan | None, label: str):
        self.cls, self.items, self.rest, self.label = cls, items, rest, label

    def _plans(self, n: int) -> list[Plan]:
        if self.items is None:
            assert self.rest is not None
            return [self.rest] * n
        if len(self.items) != n:
            raise ValueError(f"{n} items where {self.label} has {len(self.items)}")
        return self.items

    def write(self, value: Any) -> Any:
        try:
            plans = self._plans(len(value))
        except ValueError as exc:
            raise _Refused(str(exc)) from None
        return _dump_each(plans, value)

    def read(self, data: Any) -> Any:
        items = [p.load(v) for p, v in zip(self._plans(len(data)), data)]
        return tuple(items) if self.cls is tuple else self.cls(*items)


class _SetPlan(_Exact):
    kinds = frozenset({"array"})
    stored = list

    def __init__(self, cls: type, item: Plan) -> None:
        self.cls, self.item, self.label = cls, item, f"{cls.__name__}[{item.label}]"

    def write(self, value: Any) -> Any:
        items = _dump_each(itertools.repeat(self.item), value)
        return sorted(items, key=lambda v: json.dumps(v, sort_keys=True))  # stable bytes

    def read(self, data: Any) -> Any:
        return self.cls(self.item.load(v) for v in data)


class _DictPlan(_Exact):
    kinds = frozenset({"object"})
    cls = stored = dict

    def __init__(self, key: Plan, value: Plan) -> None:
        if key.kinds not in ({"string"}, {"int"}):
            raise TypeError(
                f"dict keys of type {key.label} cannot be JSON object keys; use str, int, UUID, "
                "an enum or a Literal"
            )
        self.key, self.value, self.label = key, value, f"dict[{key.label}, {value.label}]"
        self.int_keys = key.kinds == {"int"}
        self.identity = key.identity and not self.int_keys and value.identity

    def write(self, value: Any) -> Any:
        out = {}
        for k, v in value.items():
            try:
                key = self.key.dump(k)
            except _Refused as exc:
                raise exc.at(f" key {k!r}") from None
            try:
                out[str(key) if self.int_keys else key] = self.value.dump(v)
            except _Refused as exc:
                raise exc.at(f"[{k!r}]") from None
        return out

    def read(self, data: Any) -> Any:
        if self.identity:
            return data
        return {
            self.key.load(int(k) if self.int_keys else k): self.value.load(v)
            for k, v in data.items()
        }


class _FieldsPlan(_Exact):
    """Dataclasses and ``TypedDict`` (``cls`` is then ``dict``): one JSON member per field."""

    kinds = frozenset({"object"})
    stored = dict

    def __init__(self, cls: type, typed_dict: bool) -> None:
        self.kind, self.typed_dict, self.label = cls, typed_dict, cls.__qualname__
        self.cls = dict if typed_dict else cls
        self.fields: dict[str, Plan] = {}

    def write(self, value: Any) -> Any:
        if self.typed_dict:
            items, segment = value.items(), "[{!r}]"
        else:
            items, segment = ((n, getattr(value, n)) for n in self.fields), ".{}"
        out = {}
        for name, item in items:
            plan = self.fields.get(name)
            if plan is None:
                raise _Refused(f"key {name!r} is not a field of {self.label}")
            try:
                out[name] = plan.dump(item)
            except _Refused as exc:
                raise exc.at(segment.format(name)) from None
        return out

    def read(self, data: Any) -> Any:
        if self.typed_dict:
            return {name: self.fields[name].load(item) for name, item in data.items()}
        return self.kind(**{n: p.load(data[n]) for n, p in self.fields.items() if n in data})


class _PydanticPlan(_Exact):
    def __init__(self, cls: type) -> None:
        self.cls, self.label = cls, cls.__qualname__
        if not getattr(cls, "__pydantic_root_model__", False):
            self.kinds = frozenset({"object"})

    def write(self, value: Any) -> Any:
        return value.model_dump(mode="json")

    def read(self, data: Any) -> Any:
        # The exact inverse of model_dump(mode="json"), also for strict models.
        return self.cls.model_validate_json(json.dumps(data))  # type: ignore[attr-defined]


class _UnionPlan(Plan):
    def __init__(self, arms: list[Plan], label: str) -> None:
        self.arms, self.label = arms, label
        self.kinds = frozenset().union(*(a.kinds for a in arms))
        self.identity = all(a.identity for a in arms)
        self.by_kind: dict[str, Plan | None] = {}
        for kind in self.kinds:
            claim = [a for a in arms if kind in a.kinds]
            if len(claim) > 1 and not all(a.identity for a in claim):
                raise TypeError(
                    f"{label}: {claim[0].label} and {claim[1].label} are both stored as a JSON "
                    f"{kind}, so a replay could not tell which one it was; use one type, a "
                    "Literal-tagged dataclass per case, or a codec of your own"
                )
            self.by_kind[kind] = claim[0] if len(claim) == 1 else None  # None: pass through

    def accepts(self, value: Any) -> bool:
        return any(a.accepts(value) for a in self.arms)

    def dump(self, value: Any) -> Any:
        for arm in self.arms:
            if arm.accepts(value):
                return arm.dump(value)
        raise _refuse(self.label, value)

    def load(self, data: Any) -> Any:
        kind = _KIND_OF.get(type(data))
        if kind is None or kind not in self.by_kind:
            raise TypeError(f"stored {type(data).__name__} fits no arm of {self.label}")
        arm = self.by_kind[kind]
        return data if arm is None else arm.load(data)


_ABSTRACT = ("collections.abc", "typing")


class _Compiler:
    def __init__(self, localns: Mapping[str, Any] | None) -> None:
        self.localns = dict(localns or {})
        self.classes: dict[type, Plan] = {}

    def hints_of(self, cls: type) -> dict[str, Any]:
        return typing.get_type_hints(cls, localns=self.localns)

    def plan(self, hint: Any) -> Plan:
        if hint is Any or hint is object:
            return _AnyPlan()
        if hint is None:
            hint = type(None)
        if isinstance(hint, (str, typing.ForwardRef)):
            raise TypeError(f"the forward reference {hint!r} could not be resolved")
        supertype = getattr(hint, "__supertype__", None)  # typing.NewType
        if supertype is not None:
            return self.plan(supertype)
        origin, args = typing.get_origin(hint), typing.get_args(hint)
        if origin is typing.Annotated:
            return self.plan(args[0])
        if origin is Union or origin is types.UnionType:
            return _UnionPlan([self.plan(a) for a in args], _name(hint))
        if origin is typing.Literal:
            return _LiteralPlan(hint)
        if origin is not None:
            return self.generic(hint, origin, args)
        if not isinstance(hint, type):
            raise TypeError(f"{_name(hint)} is not a type oncely can rebuild")
        return self.cls(hint)

    def generic(self, hint: Any, origin: Any, args: tuple[Any, ...]) -> Plan:
        if origin is list:
            return _ListPlan(self.plan(args[0]))
        if origin is tuple:
            if len(args) == 2 and args[1] is Ellipsis:
                return _TuplePlan(tuple, None, self.plan(args[0]), _name(hint))
            items = [self.plan(a) for a in args if a != ()]
            return _TuplePlan(tuple, items, None, _name(hint))
        if origin in (set, frozenset):
            return _SetPlan(origin, self.plan(args[0]))
        if origin is dict:
            return _DictPlan(self.plan(args[0]), self.plan(args[1]))
        if getattr(origin, "__module__", "") in _ABSTRACT:
            raise TypeError(
                f"{_name(hint)} is abstract: the replay cannot know which concrete type to "
                "rebuild; annotate list[...], tuple[...], dict[...] or set[...]"
            )
        raise TypeError(f"{_name(hint)} is not a type oncely can rebuild")

    def cls(self, cls: type) -> Plan:
        if cls in _SCALARS:
            return _SCALARS[cls]
        if cls in _TEXT_TYPES:
            return _TEXT_TYPES[cls]
        if cls is list:
            return _ListPlan(_AnyPlan())
        if cls is dict:
            return _DictPlan(_SCALARS[str], _AnyPlan())
        if cls is tuple:
            return _TuplePlan(tuple, None, _AnyPlan(), "tuple")
        if cls in (set, frozenset):
            return _SetPlan(cls, _AnyPlan())
        if cls in (bytes, bytearray, memoryview):
            raise TypeError(f"{cls.__name__} is not JSON; pass codec=RawCodec() for raw bytes")
        if cls in self.classes:
            return self.classes[cls]
        if issubclass(cls, enum.Enum):
            return _EnumPlan(cls)
        if issubclass(cls, tuple) and hasattr(cls, "_fields"):  # NamedTuple / namedtuple
            named = self.classes[cls] = _TuplePlan(cls, [], None, cls.__qualname__)
            hints = self.hints_of(cls)  # registered first: a field may refer to the class
            named.items = [self.plan(hints.get(f, Any)) for f in cls._fields]
            return named
        if typing.is_typeddict(cls) or dataclasses.is_dataclass(cls):
            plan = self.classes[cls] = _FieldsPlan(cls, typing.is_typeddict(cls))
            hints = self.hints_of(cls)
            if plan.typed_dict:
                names = list(hints)
            else:
                names = [f.name for f in dataclasses.fields(cls) if f.init]  # type: ignore[arg-type]
            plan.fields = {n: self.plan(hints.get(n, Any)) for n in names}
            return plan
        if callable(getattr(cls, "model_validate_json", None)) and callable(
            getattr(cls, "model_dump", None)
        ):
            return _PydanticPlan(cls)
        if cls.__module__ in _ABSTRACT:
            raise TypeError(
                f"{cls.__qualname__} is abstract: the replay cannot know which concrete type to "
                "rebuild; annotate list[...], tuple[...], dict[...] or set[...]"
            )
        raise TypeError(
            f"{cls.__qualname__} is not a type oncely can rebuild from JSON; return a "
            "dataclass, NamedTuple, TypedDict, enum or pydantic model, or pass codec= a codec "
            "of your own"
        )


def plan_for(hint: Any, localns: Mapping[str, Any] | None = None) -> Plan:
    """Compile ``hint`` into a :class:`Plan`.

    :param localns: names for resolving string annotations of nested classes.
    :raises ConfigurationError: the annotation names a type whose values cannot be rebuilt.
    :raises NameError: a nested class's annotation names a type not defined (yet).
    """
    try:
        return _Compiler(localns).plan(hint)
    except TypeError as exc:
        raise ConfigurationError(
            f"return annotation {_name(hint)}: {exc}. oncely refuses it rather than replay "
            "another type"
        ) from exc


def rebuild(hint: Any, value: Any) -> Any:
    """Rebuild decoded JSON ``value`` into the type ``hint`` describes (see the table above)."""
    return plan_for(hint).load(value)


class JsonCodec:
    """The default codec: compact UTF-8 JSON, types rebuilt exactly from the annotation.

    :param type_hint: the annotation of the values this codec stores (default ``Any``: JSON
        values only).
    :param localns: names for resolving string annotations inside nested classes.
    :raises ConfigurationError: ``type_hint`` cannot be rebuilt (see the module table).
    """

    name = "json"

    def __init__(self, type_hint: Any = Any, *, localns: Mapping[str, Any] | None = None):
        self.type_hint = type_hint
        self.plan = plan_for(type_hint, localns)

    def bind(self, type_hint: Any, localns: Mapping[str, Any] | None = None) -> JsonCodec:
        """A codec of the same kind for values of ``type_hint`` (what ``@idempotent`` uses)."""
        return type(self)(type_hint, localns=localns)

    def encode(self, value: Any) -> bytes:
        """JSON bytes of ``value``; :class:`SerializationError` if it does not fit the hint."""
        try:
            data = self.plan.dump(value)
        except _Refused as exc:
            raise exc.error() from None
        except (TypeError, ValueError) as exc:  # e.g. a pydantic model that cannot serialize
            raise SerializationError(f"the result cannot be stored ({exc})") from exc
        except RecursionError as exc:  # a circular or very deep value
            raise SerializationError(_TOO_DEEP) from exc
        try:
            return json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        except (TypeError, ValueError) as exc:  # a pydantic model's own dump was not JSON
            raise SerializationError(f"the result cannot be stored as JSON ({exc})") from exc
        except RecursionError as exc:
            raise SerializationError(_TOO_DEEP) from exc

    def decode(self, data: bytes, type_hint: Any = None) -> Any:
        """The value stored in ``data``, rebuilt as ``type_hint`` (default: the bound hint)."""
        bound = type_hint is None or type_hint is self.type_hint
        plan = self.plan if bound else plan_for(type_hint)
        try:
            return plan.load(json.loads(data))
        except (TypeError, ValueError, KeyError, ArithmeticError) as exc:
            raise SerializationError(
                f"stored result does not match the return type {_name(type_hint)} ({exc}); if "
                "the function's return type changed, delete old records with `oncely keys rm`"
            ) from exc


class RawCodec:
    """Stores ``bytes`` results as they are."""

    name = "raw"

    def bind(self, type_hint: Any, localns: Mapping[str, Any] | None = None) -> RawCodec:
        return self

    def encode(self, value: Any) -> bytes:
        if not isinstance(value, (bytes, bytearray, memoryview)):
            raise SerializationError(f"RawCodec stores bytes, got {type(value).__name__}")
        return bytes(value)

    def decode(self, data: bytes, type_hint: Any = None) -> Any:
        return bytes(data)
