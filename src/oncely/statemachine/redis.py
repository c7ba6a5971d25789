"""State machines persisted in Redis: one Lua script per transition.

An entity is a hash ``<prefix>:<machine>:{<id>}`` whose ``state`` field holds its state (other
fields are yours); its audit history is the list ``...:history`` and its used idempotency keys
the hash ``...:keys``. The ``{<id>}`` hash tag keeps the three in one Redis Cluster slot.

The script (``lua/transition.lua``, run through :mod:`oncely.backends.lua`) decides and writes
in one atomic step: a used idempotency key answers first (a replay); else the state is changed
if it is one of the transition's sources, and the history entry (transition, state reached,
``TIME`` of the server, key) is appended. What a refusal means is decided in Python by
:func:`~oncely.statemachine.definition.explain`, exactly as for SQL.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from oncely.backends.lua import Script, aevalsha, evalsha, is_wrongtype
from oncely.errors import ConfigurationError, EntityStateInvalid, IdempotencyKeyMismatch
from oncely.settings import text
from oncely.statemachine.definition import (
    HistoryEntry,
    Machine,
    Outcome,
    Transition,
    check_entity,
    check_key,
    explain,
)

__all__ = ["RedisStateMachine"]

_TRANSITION = Script("oncely.statemachine", "transition")


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _state(value: Any) -> Any:
    """A stored state as text; bytes that are not UTF-8 stay bytes (no state of any machine:
    :func:`~oncely.statemachine.definition.explain` raises ``EntityStateInvalid`` for them)."""
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return value
    return str(value)


class RedisStateMachine:
    """A machine on Redis hashes. Every method takes the client: a :class:`redis.Redis` for the
    plain methods, a :class:`redis.asyncio.Redis` for the ``a``-prefixed ones.

    :param machine: the :class:`~oncely.statemachine.definition.Machine`.
    :param prefix: the key prefix (``<prefix>:<machine>:{<id>}``).
    """

    def __init__(self, machine: Machine, *, prefix: str = "oncely:sm") -> None:
        if not isinstance(machine, Machine):
            raise ConfigurationError("RedisStateMachine needs a Machine as its first argument")
        self.machine = machine
        self.prefix = text(prefix, "prefix", where="RedisStateMachine")

    def key(self, entity_id: Any) -> str:
        """The entity's hash key.

        :raises InvalidEntityId: see :func:`~oncely.statemachine.definition.check_entity`."""
        return f"{self.prefix}:{self.machine.name}:{{{check_entity(entity_id)}}}"

    def _keys(self, entity_id: Any) -> tuple[str, str, str]:
        base = self.key(entity_id)
        return base, f"{base}:history", f"{base}:keys"

    def _args(
        self, entity_id: Any, transition: str, key: str | None, data: Mapping[str, Any] | None
    ) -> tuple[Transition, str | None, tuple[Any, ...]]:
        t = self.machine.transition(transition)
        key = check_key(key)
        self.machine.guard(t, data)
        return t, key, (*self._keys(entity_id), t.target, t.name, key or "", *t.sources)

    def _outcome(self, t: Transition, entity_id: Any, key: str | None, reply: Any) -> Outcome:
        verdict = _text(reply[0])
        if verdict == "applied":
            return Outcome(entity_id, t.name, t.target, applied=True)
        if verdict == "replay":
            transition, state = _text(reply[1]).split("\n", 1)
            if transition != t.name:
                raise IdempotencyKeyMismatch(
                    f"idempotency key {key!r} was used for {self.machine.name}.{transition} "
                    f"of {entity_id!r}, not {t.name!r}: a new operation needs a new key"
                )
            return Outcome(entity_id, t.name, state, applied=False, replayed=True)
        if verdict == "wrongtype":
            raise self._wrongtype(entity_id, int(reply[1]) - 1, _text(reply[2]))
        current = _state(reply[1]) if verdict == "rejected" else None
        return explain(self.machine, t, entity_id, current, exists=verdict != "missing")

    def _wrongtype(self, entity_id: Any, which: int, found: str | None) -> EntityStateInvalid:
        """The error for an entity whose key (``which``: 0 the hash, 1 its history, 2 its used
        keys) holds another Redis type: nothing was changed."""
        what = ("hash", "history list", "used-keys hash")[which]
        kind = f"a Redis {found}" if found else "another Redis type"
        return EntityStateInvalid(
            f"{self.machine.name} {entity_id!r}: its {what} key {self._keys(entity_id)[which]!r} "
            f"holds {kind}, so no state of the machine (written outside it); delete or rename "
            "that key; nothing was changed",
            current=None,
        )

    def _create_failed(self, entity_id: Any, exc: Exception) -> Exception:
        return self._wrongtype(entity_id, 0, None) if is_wrongtype(exc) else exc

    def apply(
        self,
        client: Any,
        entity_id: Any,
        transition: str,
        *,
        key: str | None = None,
        data: Mapping[str, Any] | None = None,
    ) -> Outcome:
        """Apply ``transition`` to the entity (one Lua script). Same contract and errors as
        :meth:`oncely.statemachine.sql.SqlStateMachine.apply` (no hooks: the change is one
        script; Redis has no transaction to run Python code in). ``Outcome.row`` is empty."""
        t, key, args = self._args(entity_id, transition, key, data)
        return self._outcome(t, entity_id, key, evalsha(client, _TRANSITION, 3, *args))

    async def aapply(
        self,
        client: Any,
        entity_id: Any,
        transition: str,
        *,
        key: str | None = None,
        data: Mapping[str, Any] | None = None,
    ) -> Outcome:
        """The async face of :meth:`apply`."""
        t, key, args = self._args(entity_id, transition, key, data)
        return self._outcome(t, entity_id, key, await aevalsha(client, _TRANSITION, 3, *args))

    def create(self, client: Any, entity_id: Any, state: str | None = None) -> bool:
        """Create the entity in ``state`` (default: the initial state) unless it exists
        (``HSETNX``); True if created."""
        state = self.machine.check_state(state or self.machine.initial)
        try:
            return bool(client.execute_command("HSETNX", self.key(entity_id), "state", state))
        except Exception as exc:  # WRONGTYPE: the key holds a string, a list ...
            error = self._create_failed(entity_id, exc)
            if error is exc:
                raise
            raise error from exc

    async def acreate(self, client: Any, entity_id: Any, state: str | None = None) -> bool:
        """The async face of :meth:`create`."""
        state = self.machine.check_state(state or self.machine.initial)
        try:
            return bool(await client.execute_command("HSETNX", self.key(entity_id), "state", state))
        except Exception as exc:  # WRONGTYPE: the key holds a string, a list ...
            error = self._create_failed(entity_id, exc)
            if error is exc:
                raise
            raise error from exc

    def state(self, client: Any, entity_id: Any) -> str | None:
        """The entity's state as stored, or None if it does not exist.

        :raises EntityStateInvalid: the entity's key holds another Redis type, or its state is
            not UTF-8 text (no state of any machine)."""
        try:
            value = client.execute_command("HGET", self.key(entity_id), "state")
        except Exception as exc:  # WRONGTYPE: the key holds a string, a list ...
            error = self._create_failed(entity_id, exc)
            if error is exc:
                raise
            raise error from exc
        if value is None:
            return None
        found = _state(value)
        if not isinstance(found, str):
            raise EntityStateInvalid(
                f"{self.machine.name} {entity_id!r} exists but its state is {found!r}, not UTF-8 "
                f"text; the machine's states are {list(self.machine.states)}",
                current=found,
            )
        return found

    def _entries(self, entity_id: Any, raw: list[Any]) -> list[HistoryEntry]:
        out = []
        for item in raw:
            transition, state, at, key = json.loads(_text(item))
            out.append(HistoryEntry(str(entity_id), transition, state, float(at), key or None))
        return out

    def history(self, client: Any, entity_id: Any) -> list[HistoryEntry]:
        """The entity's applied transitions, oldest first."""
        raw = client.execute_command("LRANGE", self._keys(entity_id)[1], 0, -1)
        return self._entries(entity_id, raw)

    async def ahistory(self, client: Any, entity_id: Any) -> list[HistoryEntry]:
        """The async face of :meth:`history`."""
        raw = await client.execute_command("LRANGE", self._keys(entity_id)[1], 0, -1)
        return self._entries(entity_id, raw)

    def delete(self, client: Any, entity_id: Any) -> None:
        """Remove the entity, its history and its keys."""
        client.execute_command("DEL", *self._keys(entity_id))
