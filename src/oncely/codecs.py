"""How results are stored: bytes plus a codec name, JSON by default (never pickle by default).

:class:`JsonCodec` writes dataclasses, pydantic models, ``Decimal``, ``datetime``, ``date``,
``UUID``, tuples and sets as JSON, and on replay rebuilds them from the function's return
annotation, so a replay returns the same types as the first call.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import types
import typing
import uuid
from collections.abc import Mapping
from decimal import Decimal
from typing import Any, Protocol, Union

from oncely.errors import SerializationError

__all__ = ["Codec", "JsonCodec", "RawCodec", "rebuild", "to_jsonable"]


class Codec(Protocol):
    """Turns results into bytes and back. ``name`` is stored with each record."""

    name: str

    def encode(self, value: Any) -> bytes: ...

    def decode(self, data: bytes, type_hint: Any = None) -> Any: ...


def to_jsonable(value: Any) -> Any:
    """``json.dumps`` ``default=`` hook for the types oncely knows how to rebuild."""
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


def rebuild(hint: Any, value: Any) -> Any:
    """Rebuild ``value`` (decoded JSON) into the type ``hint`` describes; best effort, typed."""
    if hint is None or hint is Any or value is None:
        return value
    origin = typing.get_origin(hint)
    if origin is Union or origin is types.UnionType:
        arms = [a for a in typing.get_args(hint) if a is not type(None)]
        for arm in arms:
            try:
                return rebuild(arm, value)
            except (TypeError, ValueError, KeyError):
                continue
        return value
    if origin is typing.Annotated:
        return rebuild(typing.get_args(hint)[0], value)
    if origin in (list, set, frozenset, tuple) or (
        origin is not None and isinstance(origin, type) and issubclass(origin, (list, tuple))
    ):
        args = typing.get_args(hint)
        if origin is tuple and args and args[-1] is not Ellipsis:
            return tuple(rebuild(a, v) for a, v in zip(args, value))
        item = args[0] if args else None
        items = [rebuild(item, v) for v in value]
        return origin(items) if origin in (set, frozenset, tuple) else items
    if origin is not None and isinstance(origin, type) and issubclass(origin, Mapping):
        key_t, val_t = (*typing.get_args(hint), None, None)[:2]
        return {rebuild(key_t, k): rebuild(val_t, v) for k, v in value.items()}
    if not isinstance(hint, type):
        return value
    if dataclasses.is_dataclass(hint):
        hints = typing.get_type_hints(hint)
        init = {
            f.name: rebuild(hints.get(f.name), value[f.name])
            for f in dataclasses.fields(hint)
            if f.init and f.name in value
        }
        return hint(**init)
    validate = getattr(hint, "model_validate", None)
    if callable(validate):
        return validate(value)
    if hint is Decimal:
        return Decimal(value)
    if hint is dt.datetime:
        return dt.datetime.fromisoformat(value)
    if hint is dt.date:
        return dt.date.fromisoformat(value)
    if hint is dt.time:
        return dt.time.fromisoformat(value)
    if hint is uuid.UUID:
        return uuid.UUID(value)
    if hint in (tuple, set, frozenset):
        return hint(value)
    return value


class JsonCodec:
    """The default codec: compact UTF-8 JSON, types rebuilt from the return annotation."""

    name = "json"

    def encode(self, value: Any) -> bytes:
        try:
            return json.dumps(
                value, separators=(",", ":"), default=to_jsonable, ensure_ascii=False
            ).encode("utf-8")
        except (TypeError, ValueError) as exc:
            raise SerializationError(
                f"result of type {type(value).__name__} cannot be stored as JSON ({exc}); return "
                "JSON values, dataclasses or pydantic models, or pass codec= a codec that can"
            ) from exc

    def decode(self, data: bytes, type_hint: Any = None) -> Any:
        try:
            return rebuild(type_hint, json.loads(data))
        except (TypeError, ValueError, KeyError) as exc:
            raise SerializationError(
                f"stored result does not match the return type {type_hint!r} ({exc}); if the "
                "function's return type changed, delete old records with `oncely keys rm`"
            ) from exc


class RawCodec:
    """Stores ``bytes`` results as they are."""

    name = "raw"

    def encode(self, value: Any) -> bytes:
        if not isinstance(value, (bytes, bytearray, memoryview)):
            raise SerializationError(f"RawCodec stores bytes, got {type(value).__name__}")
        return bytes(value)

    def decode(self, data: bytes, type_hint: Any = None) -> Any:
        return bytes(data)
