"""A client's estimate of a store's clock, to bound when a decision may still be taken.

A decision sent to a store that stops answering (a paused or overloaded server) stays queued in
its socket after the caller gave up on it (its budget ran out: ``StoreUnavailable``, nothing
decided). When the server resumes it runs the queued decision anyway: a claim would take a key
over for a caller that is no longer there, so the real holder's completion is refused and a
retry runs the body again. So a claim carries a *not after* bound in the store's clock: the
script (or statement) refuses to decide, writing nothing, when the store's time is past it.

The bound is the caller's deadline (:func:`time.monotonic`) carried into the store's clock with
an estimate of the offset between the two, learned from the store's time in earlier replies
(no round trip of its own per decision): ``offset = store_now - sent``, where ``sent`` is the
local time just before the request went out. The store read its clock after ``sent``, so that
offset is never below the true one (by at most the round trip): the bound errs late, never
early, and a slow reply cannot make later claims be refused. Only replies that came back within
:data:`ACCEPT` seconds teach the estimate (the first one always does), so a reply delayed by a
pause does not stretch the bound by the pause. The bound is further widened by :data:`MARGIN`
and by :data:`DRIFT` per second since the estimate was taken (the two clocks may run at slightly
different rates).

Expiry and every other decision still use the store's clock alone; the estimate only decides
when to refuse, the fail-closed direction: a wrong estimate can refuse a claim (the caller gets
``StoreUnavailable`` and retries; the refusal's reply corrects the estimate), never admit one
that the store's clock would not.
"""

from __future__ import annotations

from typing import Final

__all__ = ["ACCEPT", "DRIFT", "MARGIN", "StoreClock"]

#: Seconds past the caller's deadline the bound allows: a wait may outlast its deadline by a few
#: milliseconds (:data:`oncely.backends.budget.SLACK`, timer lateness), and the store's time is
#: read in whole milliseconds.
MARGIN: Final = 0.05
#: The largest round trip (seconds) of a reply that teaches the estimate once it has one.
ACCEPT: Final = 0.1
#: How far apart the two clocks may drift, per second since the estimate was taken (1000 ppm,
#: twice NTP's largest slew).
DRIFT: Final = 0.001


class StoreClock:
    """The estimated offset of one store's clock (one server) from :func:`time.monotonic`.

    Shared by threads and tasks: its state is one tuple, replaced whole.
    """

    __slots__ = ("state",)

    def __init__(self) -> None:
        #: ``(offset, taken_at)``: store time minus local monotonic time (seconds), and the
        #: local time it was learned; None until the first reply.
        self.state: tuple[float, float] | None = None

    def observe(self, store_now: float, sent: float, received: float) -> None:
        """Learn from a reply: the store's time ``store_now`` (seconds since the epoch), read
        between ``sent`` and ``received`` (:func:`time.monotonic`)."""
        if received - sent <= ACCEPT or self.state is None:
            self.state = (store_now - sent, received)

    def not_after(self, deadline: float | None) -> float | None:
        """The store time (seconds since the epoch) after which a decision whose caller stops
        waiting at ``deadline`` (:func:`time.monotonic`) must not be taken; None without a
        deadline or an estimate (then no bound is sent)."""
        state = self.state
        if deadline is None or state is None:
            return None
        offset, taken = state
        return deadline + offset + MARGIN + DRIFT * max(deadline - taken, 0.0)

    def not_after_ms(self, sent: float, budget: float | None, running: float | None) -> str:
        """:meth:`not_after` in whole milliseconds as text (rounded up), ``""`` for none, for a
        decision sent at ``sent`` whose caller waits ``budget`` seconds (None: without bound)
        or until ``running`` (a deadline already running, :func:`time.monotonic`), whichever
        ends first."""
        state = self.state
        if state is None:
            return ""
        if budget is not None and (running is None or sent + budget < running):
            running = sent + budget
        if running is None:
            return ""
        offset, taken = state
        # (running - taken is never below minus a budget: a reply taught it after ``sent``)
        bound = running + offset + MARGIN + DRIFT * (running - taken)
        return str(int(bound * 1000) + 1)
