"""Turning a call's arguments into an idempotency key and a payload fingerprint.

A key spec names arguments or dotted paths into them (``["order.id", "amount"]``), or is a
callable receiving the call's arguments. Each key part, and a scope a callable returns, must be
a non-empty ``str`` (at most 255 characters), an ``int`` or a ``uuid.UUID``; ``None``, ``bool``,
``float`` and anything else raise :class:`~oncely.errors.InvalidKey` before the function runs.
An ``int`` and a UUID have one exact text form (a float or bool does not: ``1.0``/``1``/``True``),
so they are unambiguous and rendered as that text. Without a key spec the key is all arguments
in a typed canonical text (:func:`typed_canonical`): equal payloads give equal keys across
processes and Python versions, and two calls share a key only if their arguments are equal *and
of the same types* (``Decimal("5")`` and ``"5"``, ``{1: x}`` and ``{"1": x}``, a set and a list,
``True`` and ``1``, ``1.0`` and ``1``, two dataclasses with the same fields all differ). A value
the encoding cannot tell apart from another raises :class:`~oncely.errors.InvalidKey` naming the
argument. :func:`default_key_gap` says when all arguments would leave out what tells two calls
apart. ``validate=`` fingerprints use the same typed text.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime as dt
import decimal
import enum
import functools
import hashlib
import inspect
import json
import pathlib
import types
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from oncely.codecs import to_jsonable
from oncely.core.names import type_name
from oncely.core.records import MAX_KEY_LENGTH
from oncely.core.text import utf8
from oncely.errors import ConfigurationError, InvalidKey

__all__ = [
    "ArgumentReader",
    "KeySpec",
    "canonical",
    "check_key",
    "default_key_gap",
    "fingerprint_of",
    "key_part",
    "typed_canonical",
]

KeySpec = Sequence[str] | Callable[..., Any] | None
_MISSING = object()


def check_key(key: str, what: str = "idempotency key") -> str:
    """Validate a caller-supplied key string: 1 to 255 characters.

    :raises InvalidKey: not a string, empty, or longer than 255 characters.
    """
    if not isinstance(key, str):
        raise InvalidKey(f"{what} must be a string, got {type(key).__name__}")
    if not key:
        raise InvalidKey(f"{what} is empty; send a unique value per operation, e.g. a UUID")
    if len(key) > MAX_KEY_LENGTH:
        raise InvalidKey(
            f"{what} has {len(key)} characters; the limit is {MAX_KEY_LENGTH} (a UUID has 36)"
        )
    return key


def key_part(value: Any, what: str) -> str:
    """The text of one key part (or scope): a non-empty ``str``, an ``int`` or a ``UUID``.

    :param what: names the source in the error, e.g. ``"key field 'order.id'"``.
    :raises InvalidKey: ``None``, ``bool``, ``float``, empty, too long, or another type.
    """
    if isinstance(value, str):
        return check_key(str.__str__(value), what)  # a str enum member counts as its value
    if isinstance(value, int) and not isinstance(value, bool):
        return check_key(int.__repr__(value), what)
    if isinstance(value, uuid.UUID):
        return str(value)
    if value is None:
        raise InvalidKey(f"{what} is None, so every such call would share one record; pass a value")
    raise InvalidKey(
        f"{what} is of type {type(value).__name__} ({value!r:.40}); a key part must be a "
        "non-empty string, an int or a UUID (floats and bools have more than one spelling of "
        "the same value)"
    )


def canonical(value: Any, what: str) -> str:
    """Canonical JSON of ``value`` (sorted keys, no spaces)."""
    try:
        return json.dumps(
            value, sort_keys=True, separators=(",", ":"), default=to_jsonable, ensure_ascii=False
        )
    except (TypeError, ValueError) as exc:
        raise InvalidKey(
            f"{what} cannot be rendered as JSON ({exc}); name JSON-friendly fields with "
            "key=[...]/validate=[...] or pass a callable"
        ) from exc


def fingerprint_of(values: Mapping[str, Any]) -> str:
    """A short digest of the validated payload fields (by name), in :func:`typed_canonical` text:
    a retry whose field has another type (``Decimal("5")`` for ``"5"``) is a different payload.

    :raises InvalidKey: a field holds a value the typed text cannot encode (named in the message),
        or text holding a lone surrogate (it has no UTF-8 form).
    """
    text = typed_canonical(
        values, "validate field", "name fields of supported types in validate=[...]"
    )
    return hashlib.sha256(utf8(text, "a validated field (or payload)")).hexdigest()[:32]


# -- the typed canonical text of a call's arguments ----------------------------------------------
# Every value becomes JSON: a ``str``, ``int``, ``float``, ``bool`` or ``None`` of exactly that
# type as itself (JSON keeps these apart: ``1``, ``1.0``, ``true``, ``"1"``), anything else as an
# array whose first item names its type (``["Decimal","5"]``, ``["dict",[k,v],...]``,
# ``["dataclass","billing.Charge",["amount",5]]``). Scalars are never arrays, so no two
# (value, type) pairs share a text.

_SCALARS = (str, int, float, bool, type(None))
_DATES = (dt.datetime, dt.date, dt.time)


def _class_name(cls: type) -> str:
    return type_name(cls)  # a script's __main__ named as an import names it


class _Refused(Exception):
    """A value the typed text cannot hold; ``where`` collects the path on the way out
    (innermost first), so a call that succeeds builds no path strings at all."""

    def __init__(self, problem: str) -> None:
        super().__init__(problem)
        self.problem, self.where = problem, list[str]()


_UNSUPPORTED = (
    "which has no exact text form (supported: str, int, float, bool, None, Decimal, "
    "date/time, UUID, bytes, enums, lists, tuples, dicts, sets, dataclasses, pydantic and "
    "attrs models)"
)


def _text(encoded: Any) -> str:
    return json.dumps(encoded, separators=(",", ":"), ensure_ascii=False)


def _by_text(items: list[Any]) -> list[Any]:
    return [item for _, item in sorted(((_text(i), i) for i in items), key=lambda p: p[0])]


class _Encoder:
    """Turns one value into typed JSON; refuses (:class:`_Refused`) what it cannot hold."""

    def __init__(self) -> None:
        self.active: set[int] = set()  # containers on the current path (a cycle refers back)

    def encode(self, value: Any) -> Any:
        cls = type(value)
        if cls in _SCALARS:
            return value
        if id(value) in self.active:
            raise _Refused("contains itself")
        self.active.add(id(value))
        try:
            return self._compound(value, cls)
        finally:
            self.active.discard(id(value))

    def at(self, value: Any, segment: str, arg: Any = None) -> Any:
        """``encode(value)``; on a refusal, adds ``segment.format(arg)`` to where it happened."""
        try:
            return self.encode(value)
        except _Refused as refused:
            refused.where.append(segment.format(arg))
            raise

    def _items(self, values: Any) -> list[Any]:
        return [self.at(item, "[{}]", i) for i, item in enumerate(values)]

    def _fields(self, value: Any, names: Sequence[str]) -> list[Any]:
        return [[n, self.at(getattr(value, n), ".{}", n)] for n in names]

    def _compound(self, value: Any, cls: type) -> Any:
        if isinstance(value, enum.Enum):
            return ["enum", _class_name(cls), value.name]
        if isinstance(value, type):
            return ["class", _class_name(value)]
        if dataclasses.is_dataclass(value):
            names = [f.name for f in dataclasses.fields(value)]
            return ["dataclass", _class_name(cls), *self._fields(value, names)]
        model_fields = getattr(cls, "model_fields", None)
        if isinstance(model_fields, dict) and hasattr(value, "__pydantic_fields_set__"):
            out = ["model", _class_name(cls), *self._fields(value, list(model_fields))]
            extra = getattr(value, "model_extra", None)
            if extra:
                out.append(["extra", self.at(dict(extra), ".model_extra")])
            return out
        attrs_fields = getattr(cls, "__attrs_attrs__", None)
        if attrs_fields is not None:
            return ["attrs", _class_name(cls), *self._fields(value, [a.name for a in attrs_fields])]
        if cls is list:
            return ["list", *self._items(value)]
        if cls is tuple:
            return ["tuple", *self._items(value)]
        if cls is dict:
            return self._dict(value)
        if cls in (set, frozenset):
            return [cls.__name__, *_by_text([self.at(i, "{{...}}") for i in value])]
        if cls is decimal.Decimal:
            return ["Decimal", str(value)]
        if cls in _DATES:
            return [cls.__name__, value.isoformat()]
        if cls is dt.timedelta:
            return ["timedelta", value.days, value.seconds, value.microseconds]
        if cls is uuid.UUID:
            return ["UUID", str(value)]
        if cls in (bytes, bytearray):
            return [cls.__name__, bytes(value).hex()]
        if isinstance(value, pathlib.PurePath):
            return ["path", _class_name(cls), str(value)]
        if isinstance(value, tuple) and hasattr(cls, "_fields"):  # a namedtuple
            return ["namedtuple", _class_name(cls), *self._fields(value, cls._fields)]
        # A subclass of a built-in value type (an OrderedDict, a str subclass): its class and
        # its value as the built-in type (an OrderedDict's order counts, as in its ==).
        if isinstance(value, collections.OrderedDict):
            pairs = [[self.encode(k), self.at(v, "[{!r:.40}]", k)] for k, v in value.items()]
            return ["subclass", _class_name(cls), ["ordered", *pairs]]
        bases: tuple[Any, ...] = (int, float, str, bytes, list, tuple, dict, set, frozenset)
        for base in bases:
            if isinstance(value, base):
                return ["subclass", _class_name(cls), self.encode(base(value))]
        raise _Refused(f"is of type {cls.__name__}, {_UNSUPPORTED}")

    def _dict(self, value: dict[Any, Any]) -> list[Any]:
        if all(type(k) is str for k in value):  # the common case: sorted by the names
            return [
                "dict",
                *[[k, self.at(value[k], "[{!r:.40}]", k)] for k in sorted(value)],
            ]
        pairs = []
        for k, v in value.items():
            ek = self.at(k, " key {!r:.40}", k)
            pairs.append([ek, self.at(v, "[{!r:.40}]", k)])
        return ["dict", *_by_text(pairs)]


_KEY_HINT = (
    "pass key=[...] naming fields that identify the call, or key=callable returning a string"
)


def typed_canonical(
    arguments: Mapping[str, Any], what: str = "argument", hint: str = _KEY_HINT
) -> str:
    """One text per (value, type) of each named argument: the default key of ``@idempotent``.

    Two argument mappings give the same text only if they have the same names, and values that
    are equal and of the same types, down to every item and field (dataclasses, pydantic and
    attrs models count by class ``module.qualname`` and fields; dicts and sets by content, not
    order). Deterministic across processes and Python versions (no ``hash()``, no ``repr()``
    of arbitrary objects).

    :param what: what the names are, for messages (``"argument"`` gives ``argument 'order'``).
    :param hint: what to do instead, for messages.
    :raises InvalidKey: a value of a type without an exact text form (an arbitrary object), a
        value that contains itself, or an int too long to print; the message names the argument
        and the path inside it.
    """
    encoder = _Encoder()
    encoded = []
    for name, value in arguments.items():
        try:
            encoded.append([name, encoder.encode(value)])
        except _Refused as refused:
            where = "".join(reversed(refused.where))
            raise InvalidKey(f"{what} {name!r}{where} {refused.problem}; {hint}") from None
    try:
        return json.dumps(encoded, separators=(",", ":"), ensure_ascii=False)
    except ValueError as exc:  # an int beyond sys.get_int_max_str_digits()
        raise InvalidKey(f"{what}s cannot be rendered as text ({exc})") from None


def _data_cells(fn: Any, seen: set[int]) -> list[str]:
    """Names of the closure variables of ``fn`` (and of functions it closes over) holding data."""
    code, cells = getattr(fn, "__code__", None), getattr(fn, "__closure__", None) or ()
    if code is None or id(fn) in seen:
        return []
    seen.add(id(fn))
    names = []
    for name, cell in zip(code.co_freevars, cells):
        try:
            value = cell.cell_contents
        except ValueError:  # not assigned yet (a function referring to itself)
            continue
        if isinstance(value, types.FunctionType):
            names += _data_cells(value, seen)
        elif not isinstance(value, (type, types.ModuleType, types.BuiltinFunctionType)):
            names.append(name)
    return names


def default_key_gap(fn: Callable[..., Any]) -> str | None:
    """What a key of all arguments would leave out that can tell two calls of ``fn`` apart.

    ``None`` if nothing: ``fn`` is a plain function whose behaviour depends only on its
    arguments (and on code: functions, classes and modules it refers to). Otherwise a sentence
    naming the hidden input: the instance of a method (``self``/``cls``), a bound method's
    object, a ``functools.partial``'s frozen arguments, a callable object's state, or the data
    a closure captured.
    """
    if inspect.ismethod(fn):
        return f"it is a method bound to a {type(fn.__self__).__name__}, which the key leaves out"
    if isinstance(fn, functools.partial):
        return "it is a functools.partial, whose frozen arguments the key leaves out"
    plain = inspect.unwrap(fn)
    if not inspect.isfunction(plain):
        return f"it is a callable {type(fn).__name__} object, whose state the key leaves out"
    params = list(inspect.signature(fn).parameters)
    if params and params[0] in ("self", "cls"):
        return f"its first parameter {params[0]!r} (the instance or class) is not in the key"
    captured = _data_cells(fn, set())
    if captured:
        return f"it is a closure over {', '.join(sorted(set(captured)))}, which the key leaves out"
    return None


class ArgumentReader:
    """Reads named arguments and dotted paths from ``(args, kwargs)`` without ``bind`` per call."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.signature = inspect.signature(fn)
        self.params = self.signature.parameters
        self._positions: dict[str, int] = {}
        self._defaults: dict[str, Any] = {}
        for index, (name, param) in enumerate(self.params.items()):
            if param.kind in (param.POSITIONAL_ONLY, param.POSITIONAL_OR_KEYWORD):
                self._positions[name] = index
            if param.default is not param.empty:
                self._defaults[name] = param.default
        self.payload_names = [
            name
            for name, p in self.params.items()
            if name not in ("self", "cls") and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        ]
        self._has_var = any(
            p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in self.params.values()
        )

    def check_paths(self, paths: Sequence[str], option: str) -> None:
        for path in paths:
            head = path.split(".", 1)[0]
            if head not in self.params:
                raise ConfigurationError(
                    f"{option}={list(paths)!r}: {head!r} is not a parameter of the function; "
                    f"parameters are {list(self.params)}"
                )

    def argument(self, name: str, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> Any:
        if name in kwargs:
            return kwargs[name]
        position = self._positions.get(name)
        if position is not None and position < len(args):
            return args[position]
        value = self._defaults.get(name, _MISSING)
        if value is _MISSING:
            # Let Python produce its usual message for a missing argument.
            self.signature.bind(*args, **kwargs)
            raise TypeError(f"missing argument {name!r}")
        return value

    def path(self, path: str, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> Any:
        head, *rest = path.split(".")
        value = self.argument(head, args, kwargs)
        for part in rest:
            if isinstance(value, Mapping):
                if part not in value:
                    raise InvalidKey(f"key path {path!r}: no item {part!r} in the argument")
                value = value[part]
            elif hasattr(value, part):
                value = getattr(value, part)
            else:
                raise InvalidKey(
                    f"key path {path!r}: {type(value).__name__} has no attribute {part!r}"
                )
        return value

    def whole_payload(self, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> dict[str, Any]:
        """All arguments by name (``self``/``cls`` left out), for a key over the whole call."""
        if self._has_var:
            bound = self.signature.bind(*args, **kwargs)
            bound.apply_defaults()
            return {k: v for k, v in bound.arguments.items() if k not in ("self", "cls")}
        return {name: self.argument(name, args, kwargs) for name in self.payload_names}
