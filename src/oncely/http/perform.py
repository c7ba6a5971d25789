"""The store and token operations of :func:`oncely.http.flow.request_flow`, performed once for
every driver: blocking (:func:`perform`: the WSGI face, Django's sync middleware) and with
``await`` (:func:`aperform`: the ASGI face, Django's async middleware, Litestar).

A driver performs the operations that touch its own request and response itself
(:class:`~oncely.http.flow.ReadBody`, :class:`~oncely.http.flow.Respond`,
:class:`~oncely.http.flow.Pass`, :class:`~oncely.http.flow.Run`) and hands every other one
here: the store operations go to :mod:`oncely.core.ops` (the same code as the decorator's;
cancel-safe on the async face), the token operations to the engine's token service.
"""

from __future__ import annotations

from typing import Any

from oncely.core import ops
from oncely.core.cancelsafe import write_through
from oncely.http.engine import Engine
from oncely.http.flow import ConsumeToken, IssueToken, Op, ReleaseToken

__all__ = ["aperform", "perform"]

_TOKEN_OPS = (ConsumeToken, ReleaseToken, IssueToken)


def perform(engine: Engine, op: Op) -> Any:
    """Carry out a store, token or sleep operation with blocking calls; returns what the flow
    expects back (a claim outcome, a watch result, a token use, an issued token or None).

    :raises: whatever the store or the token service raises (the driver throws it into the
        flow, which decides what it means).
    """
    if not isinstance(op, _TOKEN_OPS):
        return ops.perform(engine.store, op)  # type: ignore[arg-type]
    tokens = engine.tokens
    assert tokens is not None, op  # the flow asks for tokens only with a TokenGuard
    if isinstance(op, ConsumeToken):
        return tokens.consume(op.token, op.subject, op.purpose)
    if isinstance(op, ReleaseToken):
        tokens.release(op.use)
        return None
    return tokens.issue(op.subject, op.purpose, op.ttl)


async def aperform(engine: Engine, op: Op, *, cancel_safe: bool = True) -> Any:
    """:func:`perform` with ``await``; the claim and the fenced writes are cancel-safe
    (``cancel_safe``: see :func:`oncely.core.ops.aperform`)."""
    if not isinstance(op, _TOKEN_OPS):
        return await ops.aperform(engine.store, op, cancel_safe=cancel_safe)  # type: ignore[arg-type]
    tokens = engine.tokens
    assert tokens is not None, op
    if isinstance(op, ConsumeToken):
        return await tokens.aconsume(op.token, op.subject, op.purpose)
    if isinstance(op, ReleaseToken):
        await write_through(tokens.arelease, op.use)
        return None
    return await tokens.aissue(op.subject, op.purpose, op.ttl)
