"""Turning a call's arguments into an idempotency key and a payload fingerprint.

A key spec names arguments or dotted paths into them (``["order.id", "amount"]``), or is a
callable receiving the call's arguments. Values are rendered as canonical JSON, so equal
payloads give equal keys across processes and Python versions.
"""

from __future__ import annotations

import hashlib
import inspect
import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from oncely.codecs import to_jsonable
from oncely.errors import ConfigurationError, InvalidKey
from oncely.records import MAX_KEY_LENGTH

__all__ = ["ArgumentReader", "KeySpec", "canonical", "check_key", "fingerprint_of"]

KeySpec = Sequence[str] | Callable[..., Any] | None
_MISSING = object()


def check_key(key: str) -> str:
    """Validate a caller-supplied key string: 1 to 255 characters."""
    if not isinstance(key, str):
        raise InvalidKey(f"idempotency key must be a string, got {type(key).__name__}")
    if not key:
        raise InvalidKey("idempotency key is empty; send a unique value per operation, e.g. a UUID")
    if len(key) > MAX_KEY_LENGTH:
        raise InvalidKey(
            f"idempotency key has {len(key)} characters; the limit is {MAX_KEY_LENGTH} "
            "(a UUID has 36)"
        )
    return key


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


def fingerprint_of(values: Sequence[Any]) -> str:
    """A short digest of the validated payload fields."""
    text = canonical(list(values), "payload fields for validation")
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


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
