"""Scripts acknowledged by replicas: ``EVALSHA`` then ``WAIT`` on the same connection.

Redis replicates asynchronously: a write the master acknowledged can be lost if the master
dies before a replica received it, and the promoted replica then does not know it. ``WAIT
numreplicas timeout`` blocks the connection that sent it until ``numreplicas`` replicas
acknowledged every write *that connection* sent before, or ``timeout`` milliseconds passed,
and answers how many did (Redis docs, ``WAIT``). So the ``WAIT`` must run on the very connection
(and, on a cluster, the very node) that ran the script: :func:`eval_wait` sends both in one
write on one connection and reads both replies, one round trip.

redis-py's pipelines cannot do this on a cluster: ``WAIT`` has no key, and redis-py's cluster
client (8.1, ``RedisCluster.COMMAND_FLAGS``) sends it to its *default node*, one node picked
when the client starts, or where ``target_nodes`` says; its cluster pipeline routes each command
the same way and runs each node's share on a connection of its own. Neither is the connection of
the node that ran the script. So the plan here does the routing itself, with redis-py's own slot
map: it asks the executor for the node of the first key's slot, follows ``MOVED`` (updates the
slot map, tries the new owner) and ``ASK`` (``ASKING`` + script + ``WAIT`` on the importing
node), pauses on ``TRYAGAIN`` (a multi-key script during a migration), and sends ``EVAL`` once
when the node answers ``NOSCRIPT``. Each of those replies means the script did not run, so
trying again is safe. A connection error or timeout is never retried (the script may have run):
the caller gets it.

The plan is sans-IO (:mod:`oncely.backends.plans`); :class:`~oncely.backends.redis.RedisClients`
carries it out on the sync and the async clients.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final, NamedTuple

from redis.exceptions import (
    AskError,
    ClusterError,
    MovedError,
    TryAgainError,
)

from oncely.backends.lua import command, is_noscript
from oncely.backends.plans import Plan, Sleep

__all__ = ["EvalWait", "Exchange", "Locate", "Moved", "eval_routed", "eval_wait"]

#: How many times a script is sent again after MOVED / ASK / TRYAGAIN / NOSCRIPT before the
#: call gives up with the last error (redis-py's cluster client allows 16 redirects too).
MAX_TRIES: Final = 16
#: Pause after a TRYAGAIN (seconds; growing to 4 times this): the migration of the slot's keys
#: is under way. All tries take about 1.2 s, then the caller gets StoreUnavailable.
TRYAGAIN_PAUSE: Final = 0.02


class EvalWait(NamedTuple):
    """Evaluate a Lua script, then ``WAIT`` for the store's ``wait_replicas`` on the same
    connection; the reply is ``(script reply, replicas that acknowledged)``."""

    script: Any
    numkeys: int
    keys_and_args: tuple[Any, ...]


class Locate(NamedTuple):
    """The ``(host, port)`` of the primary serving ``key``'s slot (redis-py's slot map); the
    reply is None on a single server."""

    key: Any


class Moved(NamedTuple):
    """Record a ``MOVED`` redirect in the slot map; the reply is the new ``(host, port)``."""

    error: MovedError


class Exchange(NamedTuple):
    """Write ``commands`` in one write on one connection to ``node`` (``(host, port)``, or None
    for the single server) and read one reply per command, in order. The reply is the list of
    replies; an error reply is its :class:`redis.exceptions.ResponseError` in the list, not
    raised (the others still have to be read)."""

    node: tuple[str, int] | None
    commands: tuple[tuple[Any, ...], ...]


def eval_wait(
    script: Any,
    numkeys: int,
    keys_and_args: Sequence[Any],
    replicas: int,
    timeout_ms: int,
) -> Plan[tuple[Any, int]]:
    """Run ``script`` then ``WAIT replicas timeout_ms`` on one connection of the node that
    serves the first key; the outcome is ``(script reply, replicas that acknowledged)``.

    :raises redis.exceptions.ResponseError: the script's error reply, or the last redirect or
        ``TRYAGAIN`` after :data:`MAX_TRIES` tries.
    :raises redis.exceptions.RedisError: a connection error or timeout (the script may have
        run).
    """
    reply, acked = yield from eval_routed(
        script, numkeys, keys_and_args, ("WAIT", replicas, timeout_ms)
    )
    return reply, int(acked)


def eval_routed(
    script: Any,
    numkeys: int,
    keys_and_args: Sequence[Any],
    then: tuple[Any, ...] | None = None,
) -> Plan[tuple[Any, Any]]:
    """Run ``script`` on the node that serves the first key, following ``MOVED`` / ``ASK`` /
    ``TRYAGAIN`` / ``NOSCRIPT`` as the module docstring says, and ``then`` (a command such as
    ``WAIT``, or None) right after it on the same connection; the outcome is ``(script reply,
    then's reply or None)``.

    ``ASKING`` goes in the same write as the script, on the same connection: redis-py 8.1's
    asyncio cluster client sends ``ASKING`` and the command as two pooled commands, which take
    two different connections whenever more than one is free, so the importing node answered
    ``MOVED`` (every try, with an even number of free connections: the call failed after 16
    tries), and the ``ASKING`` left on the other connection let a later command of another
    caller run on a node that only imports its slot (a completion there finds no record).

    :raises redis.exceptions.ResponseError: the script's error reply, or the last redirect or
        ``TRYAGAIN`` after :data:`MAX_TRIES` tries.
    :raises redis.exceptions.RedisError: a connection error or timeout (the script may have
        run).
    """
    node = yield Locate(keys_and_args[0])
    tail: tuple[tuple[Any, ...], ...] = () if then is None else (then,)
    use_eval = asking = False
    last: Exception = ClusterError("no try was made")
    for attempt in range(MAX_TRIES):
        commands: tuple[tuple[Any, ...], ...] = (
            command(script, numkeys, keys_and_args, source=use_eval),
            *tail,
        )
        if asking:
            commands = (("ASKING",), *commands)
        replies = yield Exchange(node, commands)
        reply = replies[-1 - len(tail)]
        if is_noscript(reply) and not use_eval:
            use_eval = True  # on the same node, with ASKING again if this was an ASK
            continue
        asking = False
        if isinstance(reply, MovedError):  # a subclass of AskError: look at it first
            node = yield Moved(reply)
            last = reply
            continue
        if isinstance(reply, AskError):
            node, asking, last = (reply.host, int(reply.port)), True, reply
            continue
        if isinstance(reply, TryAgainError):
            last = reply
            yield Sleep(TRYAGAIN_PAUSE * min(attempt + 1, 4))
            continue
        if isinstance(reply, Exception):
            raise reply
        if not tail:
            return reply, None
        if isinstance(replies[-1], Exception):
            raise replies[-1]
        return reply, replies[-1]
    raise last
