"""Idempotent state machines, the branch barrier and sagas (mechanism 5 of DESIGN.md).

==================  ==========================================================================
module              what it holds
==================  ==========================================================================
``definition``      :class:`Machine`, :class:`Transition`, :class:`Outcome`: machines as data,
                    validated when built, and the sans-IO explanation of a refused transition
``sql``             :class:`SqlStateMachine`: one conditional ``UPDATE`` per transition on the
                    user's table (plain, SQLAlchemy or Django model), history, hooks, outbox
``redis``           :class:`RedisStateMachine`: one Lua script per transition
``barrier``         :func:`barrier` (DTM sub-transaction barrier / Seata TCC fence) on SQL and
                    Redis, :func:`purge` with a safe horizon
``saga``            :class:`Saga`: steps with compensations, the barrier on every step,
                    retries with backoff, resume after a crash
==================  ==========================================================================

The submodules import their drivers lazily through :mod:`oncely.sql.connections`; importing
this package needs no driver.
"""

from __future__ import annotations

from oncely.statemachine.definition import HistoryEntry, Machine, Outcome, Transition

__all__ = ["HistoryEntry", "Machine", "Outcome", "Transition"]
