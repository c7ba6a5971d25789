"""quick_init: frozen slotted dataclasses built through their slot descriptors stay what they
were (frozen, equal, hashed, defaulted, checked in __post_init__, picklable, replaceable)."""

from __future__ import annotations

import dataclasses
import inspect
import pickle

import pytest

from oncely.core.frozen import quick_init
from oncely.core.ops import Claim, Complete
from oncely.core.records import New, RecordKey
from oncely.errors import InvalidKey
from oncely.http.flow import ReadBody, Run
from oncely.http.messages import IdempotencyInfo


@quick_init
@dataclasses.dataclass(frozen=True, slots=True)
class _Point:
    x: int
    y: int = 7
    tags: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.x < 0:
            raise ValueError("x must not be negative")


def test_a_quick_init_class_is_still_a_frozen_dataclass() -> None:
    point = _Point(1)
    assert (point.x, point.y, point.tags) == (1, 7, ())
    assert _Point(1, 2, ("a",)) == _Point(x=1, y=2, tags=("a",))
    assert hash(_Point(3)) == hash(_Point(3, 7))
    assert repr(_Point(1)) == "_Point(x=1, y=7, tags=())"
    with pytest.raises(dataclasses.FrozenInstanceError):
        point.x = 2  # type: ignore[misc]
    with pytest.raises(ValueError, match="negative"):
        _Point(-1)
    with pytest.raises(TypeError):
        _Point()  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        _Point(1, 2, (), 4)  # type: ignore[call-arg]
    assert dataclasses.replace(point, y=9) == _Point(1, 9)
    assert pickle.loads(pickle.dumps(point)) == point
    assert list(inspect.signature(_Point).parameters) == ["x", "y", "tags"]


def test_only_frozen_slotted_dataclasses_are_taken() -> None:
    @dataclasses.dataclass(frozen=True)
    class NoSlots:
        x: int

    @dataclasses.dataclass(slots=True)
    class NotFrozen:
        x: int

    @dataclasses.dataclass(frozen=True, slots=True)
    class Factory:
        x: list[int] = dataclasses.field(default_factory=list)

    @dataclasses.dataclass(frozen=True, slots=True)
    class WithInitVar:
        x: int
        y: dataclasses.InitVar[int] = 0

    for cls in (NoSlots, NotFrozen, Factory, WithInitVar):
        with pytest.raises(TypeError):
            quick_init(cls)


def test_the_hot_values_keep_their_checks_and_equality() -> None:
    key = RecordKey("http:", "ab" * 32)
    assert Claim(key, "fp", 1.0, 2.0) == Claim(key=key, fingerprint="fp", lease=1.0, ttl=2.0)
    assert Complete(key, 3, b"r", "c", 4.0).data == b"r"
    assert ReadBody(5) == ReadBody(5, None)
    assert New(5, 1.5, 1.0).fence == 5
    info = IdempotencyInfo("k", "s", None)
    assert info.token_purpose is None
    assert Run(key, 5, 1.0, info, -1).capture == -1
    with pytest.raises(InvalidKey):
        RecordKey("a\x00b", "cd")  # __post_init__ still checks the scope
    with pytest.raises(dataclasses.FrozenInstanceError):
        key.scope = "other"  # type: ignore[misc]
