"""Machine definitions as data, and the decision every persistence shares (sans-IO, no I/O).

A :class:`Machine` is states, an initial state and named :class:`Transition` s (source states ->
one target state), each with an optional guard. It is checked when it is built
(:class:`~oncely.errors.InvalidMachine`): unknown states, duplicate transition names,
unreachable states and transitions that do not change the state (a retry could not be told
from a new change) are refused.

The persistences (:mod:`oncely.statemachine.sql`, :mod:`oncely.statemachine.redis`) make the
change in one atomic round trip (a conditional ``UPDATE ... WHERE state IN (...)``, one Lua
script). When it did not apply, :func:`explain` says what the state found means:

* the entity is already in the transition's target: the transition already happened, a
  success with the same :class:`Outcome` (``applied=False``);
* otherwise :class:`~oncely.errors.IllegalTransition` naming the current state and the
  transitions it allows; no entity: :class:`~oncely.errors.EntityNotFound`; an entity whose
  stored state is NULL or not one of the machine's: :class:`~oncely.errors.EntityStateInvalid`.

This is what django-fsm and ``transitions`` do not do: their check and their write are two
steps, so two callers can both pass the check (DESIGN.md, "Compensation").
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from oncely.core.text import stored_text
from oncely.errors import (
    EntityNotFound,
    EntityStateInvalid,
    GuardRejected,
    IllegalTransition,
    InvalidEntityId,
    InvalidKey,
    InvalidMachine,
    InvalidPayload,
    UnknownTransition,
)
from oncely.settings import names, text

__all__ = [
    "MAX_ENTITY_ID",
    "MAX_KEY",
    "Guard",
    "HistoryEntry",
    "Machine",
    "Outcome",
    "Transition",
    "check_entity",
    "check_key",
    "explain",
]

#: A guard: called with the call's ``data`` mapping (``{}`` when none was given) before the
#: store is asked; False refuses the call with :class:`~oncely.errors.GuardRejected`. Guards see
#: the caller's data, never a state read from the store (a read-then-write would race).
Guard = Callable[[Mapping[str, Any]], bool]

#: Longest idempotency key accepted (characters), as Stripe's.
MAX_KEY = 255
#: Longest entity id accepted (characters of ``str(entity_id)``): the history column's size.
MAX_ENTITY_ID = 255


@dataclass(frozen=True, slots=True)
class Transition:
    """A named transition: from any of ``source`` (one state or several) to ``target``.

    ``guard`` (optional) is a :data:`Guard`.
    """

    name: str
    source: tuple[str, ...] | str
    target: str
    guard: Guard | None = None

    def __post_init__(self) -> None:
        """:raises ConfigurationError: ``name``/``target`` not a non-empty str, ``source`` not
        one or a list of them."""
        where = "Transition"
        text(self.name, "name", where=where)
        text(self.target, "target", where=where)
        if isinstance(self.source, str):
            object.__setattr__(self, "source", (text(self.source, "source", where=where),))
        else:
            object.__setattr__(self, "source", names(self.source, "source", where=where))

    @property
    def sources(self) -> tuple[str, ...]:
        """The source states as a tuple."""
        src = self.source
        return (src,) if isinstance(src, str) else src


@dataclass(frozen=True, slots=True)
class Outcome:
    """What a transition call ended with.

    ``entity_id`` and ``transition`` as asked; ``state`` the entity's state afterwards (the
    target); ``applied`` True only for the call that changed the state; ``replayed`` True when
    an idempotency key already used for this transition answered; ``row`` the entity's columns
    after the change when the store returns them (SQL), else ``{}``.
    """

    entity_id: Any
    transition: str
    state: str
    applied: bool
    replayed: bool = False
    row: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class HistoryEntry:
    """One applied transition in the audit history: which (``transition``, ``state`` reached),
    when (``at``, epoch seconds, the store's clock) and with which idempotency ``key``."""

    entity_id: str
    transition: str
    state: str
    at: float
    key: str | None


class Machine:
    """States and named transitions, validated when built.

    :param name: the machine's name (history rows and Redis keys carry it).
    :param states: every state, in any order.
    :param initial: the state new entities start in.
    :param transitions: the :class:`Transition` s.
    :raises InvalidMachine: empty or duplicate states, an ``initial`` or a source/target that is
        not a state, two transitions with one name, a transition whose target is one of its
        sources, a state no transition path reaches from ``initial``.
    """

    __slots__ = ("_allowed", "_by_name", "initial", "name", "states", "transitions")

    def __init__(
        self, name: str, states: Iterable[str], initial: str, transitions: Iterable[Transition]
    ) -> None:
        if not isinstance(name, str) or not name or len(name) > 100:
            raise InvalidMachine("a machine needs a name: a non-empty str of at most 100 chars")
        self.name = name
        if isinstance(states, (str, bytes)) or not isinstance(states, Iterable):
            raise InvalidMachine(
                f"machine {name!r}: states= takes a list of state names, not {states!r}"
            )
        self.states = tuple(states)
        self.initial = text(initial, "initial", where=f"machine {name!r}")
        self.transitions = tuple(transitions)
        if not self.states:
            raise InvalidMachine(f"machine {name!r} has no states: list them in states=[...]")
        for s in self.states:
            if not isinstance(s, str) or not s or len(s) > 64:
                raise InvalidMachine(
                    f"machine {name!r}: states=[...]: {s!r} must be a non-empty str of at most "
                    "64 chars"
                )
        dup = sorted({s for s in self.states if self.states.count(s) > 1})
        if dup:
            raise InvalidMachine(f"machine {name!r} lists the state(s) {dup} more than once")
        known = set(self.states)
        if initial not in known:
            raise InvalidMachine(
                f"machine {name!r}: initial state {initial!r} is not one of its states "
                f"{list(self.states)}"
            )
        self._by_name: dict[str, Transition] = {}
        for t in self.transitions:
            if not isinstance(t, Transition):
                raise InvalidMachine(f"machine {name!r}: {t!r} is not a Transition")
            if not isinstance(t.name, str) or not t.name or len(t.name) > 64:
                raise InvalidMachine(
                    f"machine {name!r}: transition name {t.name!r} must be a non-empty str "
                    "of at most 64 chars"
                )
            if t.name in self._by_name:
                raise InvalidMachine(
                    f"machine {name!r} has two transitions named {t.name!r}: names must be "
                    "unique (one name, several source states is written source=[...])"
                )
            if not t.sources:
                raise InvalidMachine(f"machine {name!r}: transition {t.name!r} has no source")
            for s in (*t.sources, t.target):
                if s not in known:
                    raise InvalidMachine(
                        f"machine {name!r}: transition {t.name!r} names the unknown state "
                        f"{s!r}; add it to states=[...] or fix the name"
                    )
            if t.target in t.sources:
                raise InvalidMachine(
                    f"machine {name!r}: transition {t.name!r} goes from {t.target!r} to itself; "
                    "a retry could not be told from a second change, so every transition "
                    "must change the state"
                )
            self._by_name[t.name] = t
        reached = {initial}
        frontier = [initial]
        while frontier:
            here = frontier.pop()
            for t in self.transitions:
                if here in t.sources and t.target not in reached:
                    reached.add(t.target)
                    frontier.append(t.target)
        unreachable = [s for s in self.states if s not in reached]
        if unreachable:
            raise InvalidMachine(
                f"machine {name!r}: state(s) {unreachable} cannot be reached from "
                f"{initial!r}; add a transition into them or remove them"
            )
        self._allowed = {
            s: tuple(t.name for t in self.transitions if s in t.sources) for s in self.states
        }

    def __repr__(self) -> str:
        return f"Machine({self.name!r}, states={list(self.states)!r})"

    def transition(self, name: str) -> Transition:
        """The transition called ``name``.

        :raises UnknownTransition: no such transition (the message lists the names).
        """
        try:
            return self._by_name[name]
        except (KeyError, TypeError):
            raise UnknownTransition(
                f"machine {self.name!r} has no transition {name!r}; it has {sorted(self._by_name)}"
            ) from None

    def allowed(self, state: str) -> tuple[str, ...]:
        """Names of the transitions that may leave ``state`` (empty for a final state)."""
        return self._allowed.get(state, ())

    def check_state(self, state: str) -> str:
        """``state`` if it is one of the machine's, else :class:`~oncely.errors.InvalidMachine`."""
        if state not in self._allowed:
            raise InvalidMachine(
                f"machine {self.name!r} has no state {state!r}; its states are {list(self.states)}"
            )
        return state

    def guard(self, transition: Transition, data: Mapping[str, Any] | None) -> None:
        """Run ``transition``'s guard on ``data``.

        :raises GuardRejected: the guard returned False.
        :raises InvalidPayload: ``data`` is not a mapping.
        """
        if data is not None and not isinstance(data, Mapping):
            raise InvalidPayload(
                f"data must be a mapping (a dict of JSON-able values), not "
                f"{type(data).__name__}: data={{'amount': 5}}"
            )
        if transition.guard is not None and not transition.guard(data or {}):
            raise GuardRejected(
                f"the guard of {self.name}.{transition.name} refused this call's data; "
                "nothing was changed"
            )


def check_key(key: str | None) -> str | None:
    """An idempotency key as given, or :class:`~oncely.errors.InvalidKey` if it is not a
    non-empty str of at most 255 characters."""
    if key is None:
        return None
    if not isinstance(key, str) or not key or len(key) > MAX_KEY:
        raise InvalidKey(
            f"an idempotency key must be a non-empty str of at most {MAX_KEY} characters"
        )
    return stored_text(key, "idempotency key")


def check_entity(entity_id: Any) -> str:
    """``str(entity_id)``, the entity's id as history rows record it, or
    :class:`~oncely.errors.InvalidEntityId` if it is empty or longer than
    :data:`MAX_ENTITY_ID` characters (a longer id would be cut, or refused by the driver, in
    the middle of a transition)."""
    if isinstance(entity_id, bool) or not isinstance(entity_id, (str, int, uuid.UUID)):
        raise InvalidEntityId(
            f"an entity id must be a str, an int or a UUID (the row's primary key), not "
            f"{type(entity_id).__name__}: a {type(entity_id).__name__} is bound by drivers in "
            "their own ways (PyMySQL turns [1] into 1) and recorded under another text"
        )
    if isinstance(entity_id, int) and not -(2**63) <= entity_id < 2**63:
        raise InvalidEntityId(f"entity id {entity_id} does not fit a 64-bit integer column")
    text = stored_text(str(entity_id), "entity id", InvalidEntityId)
    if not text or len(text) > MAX_ENTITY_ID:
        raise InvalidEntityId(
            f"entity id {text[:40]!r}... must be non-empty and at most {MAX_ENTITY_ID} "
            "characters as text: use the row's primary key (or a shorter surrogate key)"
        )
    return text


def explain(
    machine: Machine,
    transition: Transition,
    entity_id: Any,
    current: Any,
    row: Mapping[str, Any] | None = None,
    *,
    exists: bool | None = None,
) -> Outcome:
    """The outcome of a transition that did not apply, from the state found (``None``: no
    state): the already-happened success, or an error.

    :param exists: whether the entity exists (a row, a hash) whatever its state; None means
        ``current is not None``.
    :raises EntityNotFound: no entity.
    :raises EntityStateInvalid: the entity exists but its state is NULL or not one of the
        machine's states.
    :raises IllegalTransition: ``current`` is neither a source nor the target.
    """
    if exists is None:
        exists = current is not None
    if not exists:
        raise EntityNotFound(
            f"{machine.name} {entity_id!r} does not exist: create it (state "
            f"{machine.initial!r}) before applying {transition.name!r}"
        )
    if current is None or not isinstance(current, str) or current not in machine.states:
        found = "NULL (no state)" if current is None else f"{current!r}, not one of its states"
        raise EntityStateInvalid(
            f"{machine.name} {entity_id!r} exists but its state is {found}; the machine's "
            f"states are {list(machine.states)}: set one of them on the stored entity (it was "
            f"written outside the machine); nothing was changed by {transition.name!r}",
            current=current,
        )
    if current == transition.target:
        return Outcome(entity_id, transition.name, current, applied=False, row=dict(row or {}))
    allowed = machine.allowed(current)
    raise IllegalTransition(
        f"{machine.name} {entity_id!r} is {current!r}: {transition.name!r} needs one of "
        f"{list(transition.sources)}; from {current!r} the allowed transitions are "
        f"{list(allowed) or 'none (final state)'}",
        current=current,
        transition=transition.name,
        allowed=allowed,
    )
