"""The storm: drive any service that speaks the demo's HTTP contract (``docs/demo.md``) with
duplicated operations, then check its ledger and stock for double effects and lost operations.

Each logical operation is sent ``duplicates`` times in one of these patterns (picked at random,
reproducible with ``seed``):

* ``concurrent`` -- all copies at once;
* ``sequential`` -- one after the other (the later ones should be replays);
* ``timeout`` -- the first copy with a client timeout of a few milliseconds, so the client gives
  up while the server works, then retries;
* ``changed-body`` -- the last copy changes the body under the same key (the draft's 422);
* ``double-submit`` (payments) -- the copies carry the same one-time token and no key.

Every copy is retried with the same key after transport errors, timeouts, ``409
request-in-flight``, ``429`` and ``5xx`` (honouring ``Retry-After``) until it gets an answer or
runs out of attempts, as a well-behaved client does. A slice of malformed requests checks that
bad input gets problem+json and changes nothing.

At the end the storm reads ``GET /ledger`` and ``GET /stock/{sku}``:

* **double effects** -- ledger rows beyond the first for one ``(kind, key)``;
* **lost operations** -- the client saw success but the effect is missing, or the operation
  never succeeded after all retries;
* **stock drift** -- stock now minus (stock before minus the units of the orders applied, once).

Operation kinds whose endpoint answers ``501`` are skipped and reported as such.

A service that stops answering ends the storm with :class:`ServiceUnreachable`, which names the
step (``str()`` is one line): once nothing has answered for ``StormConfig.silence`` seconds
(every request of the storm and of the verification is retried until then), or at once when
the health check before the storm gets no answer.
"""

from __future__ import annotations

import asyncio
import json
import random
import secrets
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from oncely.demo.client import Http, Reply, TransportError

__all__ = [
    "KINDS",
    "Fault",
    "Op",
    "ServiceUnreachable",
    "StormAborted",
    "StormConfig",
    "StormResult",
    "run_storm",
]

#: Operation kinds and the share of the storm each takes when its endpoint is live.
KINDS: dict[str, float] = {
    "order": 0.45,
    "pay": 0.35,
    "credit": 0.10,
    "cancel": 0.05,
    "webhook": 0.05,
    "ship": 0.05,
}
#: The request that tells whether a kind's endpoint exists (bogus ids: it changes nothing).
DISCOVERY: dict[str, tuple[str, str, dict[str, Any] | None]] = {
    "order": ("POST", "/orders", {}),
    "pay": ("POST", "/payment-tokens", {}),
    "credit": ("GET", "/accounts/storm-discovery", None),
    "cancel": ("POST", "/orders/storm-discovery/cancel", {}),
    "webhook": ("POST", "/webhooks/payment", {}),
    "ship": ("POST", "/orders/storm-discovery/ship", {}),
}
#: Kinds the storm can drive today; a later mechanism adds its driver here.
DRIVEN = ("order", "pay", "credit", "cancel", "webhook", "ship")
#: seconds the storm waits for effects a service applies after answering (shipping's queue)
ASYNC_WAIT = 20.0
DEFAULT_SKUS = tuple(f"sku-{i}" for i in range(1, 9))
#: the accounts credits go to (the demo shop opens these; few, so that credits contend)
DEFAULT_ACCOUNTS = tuple(f"acct-{i}" for i in range(1, 9))
PATTERNS = {
    "order": ("concurrent", "sequential", "timeout", "changed-body"),
    "pay": ("concurrent", "sequential", "timeout", "changed-body", "double-submit"),
    "credit": ("concurrent", "sequential", "timeout"),
    "cancel": ("concurrent", "sequential", "timeout"),
    "webhook": ("concurrent", "sequential", "timeout"),
    "ship": ("concurrent", "sequential", "timeout"),
}
#: rounds of read (ETag) + conditional write a credit gets before it counts as lost
CREDIT_ROUNDS = 60
RETRY_STATUSES = {408, 425, 429, 500, 502, 503, 504}


@dataclass(frozen=True)
class Fault:
    """A fault the storm injects when ``at`` (0-1) of its operations are done."""

    at: float
    name: str
    action: Callable[[], str]


@dataclass
class StormConfig:
    url: str
    operations: int = 2000
    duplicates: int = 3
    concurrency: int = 48
    seed: int | None = None
    timeout: float = 10.0
    attempts: int = 25
    bad_fraction: float = 0.03
    skus: Sequence[str] = DEFAULT_SKUS
    accounts: Sequence[str] = DEFAULT_ACCOUNTS
    customers: int = 50
    faults: Sequence[Fault] = ()
    #: seconds to wait after the last operation before reading the ledger (background jobs)
    grace: float = 0.5
    #: seconds a key or token outlives a crashed holder on the server (for recovery)
    lease: float = 3.0
    progress: Callable[[int, int], None] | None = None
    #: called before every request: a reason (str) ends the storm with :class:`StormAborted`
    #: (the demo's store went away), ``None`` goes on
    abort: Callable[[], str | None] | None = None
    #: seconds without any answer from the service (every request failing to connect or
    #: timing out) after which the storm stops with :class:`ServiceUnreachable`
    silence: float = 30.0


class StormAborted(Exception):
    """The storm stopped before its end; ``str()`` says why (``StormConfig.abort``), one line,
    and ``step`` what the storm was doing (e.g. ``"during the storm"``)."""

    def __init__(self, message: str, step: str = "") -> None:
        super().__init__(message)
        self.step = step


class ServiceUnreachable(StormAborted):
    """The service did not answer: ``step`` is what the storm was doing, ``error`` the last
    transport error, ``answered`` whether the service had answered anything before."""

    def __init__(self, url: str, step: str, error: str, answered: bool) -> None:
        self.url = url
        self.error = error
        self.answered = answered
        verb = "stopped answering" if answered else "did not answer"
        super().__init__(f"{url} {verb} {step} ({error})", step)


def _check_abort(config: StormConfig, step: str = "during the storm") -> None:
    reason = config.abort() if config.abort is not None else None
    if reason is not None:
        raise StormAborted(reason, step)


@dataclass
class Op:
    """One logical operation and what the client saw of it."""

    index: int
    kind: str
    pattern: str
    customer: str
    key: str
    expects: list[tuple[str, str]] = field(default_factory=list)
    units: dict[str, int] = field(default_factory=dict)
    #: units a cancel gives back (sku -> units), with the order id whose restock row says so
    restock: dict[str, int] = field(default_factory=dict)
    restock_key: str = ""
    succeeded: bool = False
    detail: str = ""


@dataclass
class StormResult:
    url: str
    label: str = ""
    operations: int = 0
    by_kind: dict[str, int] = field(default_factory=dict)
    requests: int = 0
    duplicates: int = 0
    effects: int = 0
    double_effects: int = 0
    double_by_kind: dict[str, int] = field(default_factory=dict)
    lost: int = 0
    lost_examples: list[str] = field(default_factory=list)
    stock_drift: int = 0
    drift_by_sku: dict[str, int] = field(default_factory=dict)
    #: sum over the accounts of |balance - the credits the ledger applied| (overwritten credits)
    lost_updates: int = 0
    lost_updates_by_account: dict[str, int] = field(default_factory=dict)
    bad_sent: int = 0
    bad_failures: int = 0
    bad_examples: list[str] = field(default_factory=list)
    outcomes: dict[str, int] = field(default_factory=dict)
    latencies_ms: list[float] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    faults: list[str] = field(default_factory=list)
    seconds: float = 0.0
    seed: int = 0

    def percentile(self, p: float) -> float:
        if not self.latencies_ms:
            return 0.0
        data = sorted(self.latencies_ms)
        return float(data[min(len(data) - 1, max(0, round(p / 100 * len(data)) - 1))])

    @property
    def ok(self) -> bool:
        return (
            self.double_effects == 0
            and self.lost == 0
            and self.stock_drift == 0
            and self.lost_updates == 0
            and self.bad_failures == 0
            and self.operations > 0
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "label": self.label,
            "ok": self.ok,
            "operations": self.operations,
            "operations_by_kind": self.by_kind,
            "requests": self.requests,
            "duplicates": self.duplicates,
            "effects_applied": self.effects,
            "double_effects": self.double_effects,
            "double_effects_by_kind": self.double_by_kind,
            "lost_operations": self.lost,
            "lost_examples": self.lost_examples,
            "stock_drift": self.stock_drift,
            "stock_drift_by_sku": self.drift_by_sku,
            "lost_updates": self.lost_updates,
            "lost_updates_by_account": self.lost_updates_by_account,
            "bad_input": {
                "sent": self.bad_sent,
                "failures": self.bad_failures,
                "examples": self.bad_examples,
            },
            "outcomes": self.outcomes,
            "latency_ms": {"p50": self.percentile(50), "p99": self.percentile(99)},
            "skipped": self.skipped,
            "faults": self.faults,
            "seconds": round(self.seconds, 2),
            "seed": self.seed,
        }


@dataclass
class _Answer:
    status: int  # 0: no answer (transport error after every attempt)
    body: Any = None
    problem: str = ""
    replayed: bool = False
    error: str = ""
    content_type: str = ""
    etag: str = ""


def _problem_slug(body: Any) -> str:
    if isinstance(body, dict) and isinstance(body.get("type"), str):
        return str(body["type"]).rstrip("/").rsplit("/", 1)[-1]
    return ""


class _Client:
    """Sends requests the way a careful client does, and keeps the statistics."""

    def __init__(self, http: Http, config: StormConfig, result: StormResult) -> None:
        self.http = http
        self.config = config
        self.result = result
        self.outcomes: Counter[str] = Counter()
        #: monotonic time of the service's last answer (any status)
        self.last_answer = time.monotonic()

    async def send(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        content: bytes | None = None,
        headers: dict[str, str] | None = None,
        first_timeout: float | None = None,
        retry: bool = True,
        label: str = "",
    ) -> _Answer:
        attempts = self.config.attempts if retry else 1
        answer = _Answer(0)
        for attempt in range(attempts):
            _check_abort(self.config)
            timeout = first_timeout if attempt == 0 and first_timeout else self.config.timeout
            started = time.perf_counter()
            self.result.requests += 1
            try:
                response = await self.http.request(
                    method,
                    path,
                    json_body=body if content is None else None,
                    content=content,
                    headers=headers,
                    timeout=timeout,
                )
            except TransportError as exc:
                self.outcomes["transport error / timeout (retried)"] += 1
                answer = _Answer(0, error=str(exc))
                silent = time.monotonic() - self.last_answer
                if silent > self.config.silence:
                    raise ServiceUnreachable(
                        self.config.url,
                        f"during the storm: no request answered for {silent:.0f} s",
                        str(exc),
                        answered=True,
                    ) from exc
                await asyncio.sleep(self._backoff(attempt, None))
                continue
            self.last_answer = time.monotonic()
            self.result.latencies_ms.append((time.perf_counter() - started) * 1000)
            parsed = response.json()
            answer = _Answer(
                response.status,
                parsed,
                _problem_slug(parsed),
                response.header("idempotent-replayed").lower() == "true",
                content_type=response.header("content-type"),
                etag=response.header("etag"),
            )
            retryable = response.status in RETRY_STATUSES or (
                response.status == 409 and answer.problem == "request-in-flight"
            )
            if retryable and retry and attempt + 1 < attempts:
                self.outcomes[f"{response.status} {answer.problem or 'error'} (retried)"] += 1
                await asyncio.sleep(self._backoff(attempt, response.header("retry-after")))
                continue
            break
        self.outcomes[self._label(answer, label)] += 1
        return answer

    @staticmethod
    def _label(answer: _Answer, label: str) -> str:
        if answer.status == 0:
            return "no answer after all attempts"
        if label:
            return label
        if answer.replayed:
            return f"{answer.status} replayed"
        if answer.problem:
            return f"{answer.status} {answer.problem}"
        return f"{answer.status}"

    @staticmethod
    def _backoff(attempt: int, retry_after: str | None) -> float:
        base: float = min(2.0, 0.05 * 2.0**attempt)
        if retry_after and retry_after.isdigit():
            base = min(2.0, max(float(retry_after), 0.05))
        return base * random.uniform(0.5, 1.0)


async def _discover(http: Http, kinds: Sequence[str]) -> dict[str, str]:
    """Which kinds to skip, and why (their endpoint answers 501, or no driver yet)."""
    skipped: dict[str, str] = {}
    for kind in kinds:
        method, path, body = DISCOVERY[kind]
        try:
            response = await http.request(method, path, json_body=body, timeout=10.0)
        except TransportError as exc:
            skipped[kind] = f"discovery failed: {exc}"
            continue
        if response.status in (404, 405) and _problem_slug(response.json()) in (
            "not-found",
            "method-not-allowed",
            "",
        ):
            skipped[kind] = f"no {method} {path} ({response.status})"
        elif response.status == 501:
            info = response.json()
            mechanism = info.get("mechanism", "") if isinstance(info, dict) else ""
            skipped[kind] = f"501: needs {mechanism or 'a mechanism not built yet'}"
        elif kind not in DRIVEN:
            skipped[kind] = "the storm has no driver for it yet"
    return skipped


def _bearer(customer: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {customer}"}


class _Storm:
    def __init__(self, config: StormConfig, http: Http, result: StormResult) -> None:
        self.config = config
        self.client = _Client(http, config, result)
        self.result = result
        self.rng = random.Random(result.seed)
        self.run = secrets.token_hex(4)
        self.ops: list[Op] = []
        self.bad_keys: set[str] = set()
        self.bad_ops: list[tuple[str, _Answer]] = []

    # -- planning -----------------------------------------------------------------------------
    def plan(self, live: Sequence[str]) -> list[Op]:
        weights = [KINDS[k] for k in live]
        ops = []
        for i in range(self.config.operations):
            kind = self.rng.choices(list(live), weights)[0]
            customer = f"c{self.rng.randrange(self.config.customers):03d}"
            pattern = self.rng.choice(PATTERNS[kind])
            ops.append(Op(i, kind, pattern, customer, f"storm-{self.run}-{i}"))
        return ops

    # -- the copies of one operation ------------------------------------------------------------
    async def copies(
        self,
        op: Op,
        send: Callable[[int, dict[str, Any] | None], Awaitable[_Answer]],
        changed: dict[str, Any] | None,
    ) -> list[_Answer]:
        k = max(1, self.config.duplicates)
        self.result.duplicates += k - 1
        if op.pattern == "concurrent" or op.pattern == "double-submit":
            return list(await asyncio.gather(*(send(i, None) for i in range(k))))
        answers = []
        for i in range(k):
            if op.pattern == "changed-body" and i == k - 1 and i > 0:
                answers.append(await send(i, changed))
            else:
                answers.append(await send(i, None))
        return answers

    def _first_timeout(self, op: Op, i: int) -> float | None:
        """The client timeout of copy ``i``, seconds: the first copy of a ``timeout`` operation
        is cut off after 2 to 20 ms (the service may still finish it); None otherwise."""
        return self.rng.uniform(0.002, 0.02) if op.pattern == "timeout" and i == 0 else None

    @staticmethod
    def _originals(op: Op, answers: list[_Answer]) -> list[_Answer]:
        """The answers to the copies sent unchanged (a ``changed-body`` operation's last copy
        is the changed one)."""
        return answers[:-1] if op.pattern == "changed-body" and len(answers) > 1 else answers

    async def _post_copies(self, op: Op, path: str) -> list[_Answer]:
        """The copies of ``op`` sent as ``POST path`` with no body, as its customer."""

        async def send(i: int, changed: dict[str, Any] | None) -> _Answer:
            timeout = self._first_timeout(op, i)
            return await self.client.send(
                "POST", path, headers=_bearer(op.customer), first_timeout=timeout
            )

        return await self.copies(op, send, None)

    async def _place(self, op: Op, sku: str, qty: int) -> dict[str, Any] | None:
        """Place the order a later step of ``op`` needs (its key: ``<op key>-order``); the
        order's body, or None with ``op.detail`` saying why it was not placed."""
        order_key = f"{op.key}-order"
        placed = await self.client.send(
            "POST",
            "/orders",
            body={"sku": sku, "qty": qty, "customer": op.customer},
            headers={**_bearer(op.customer), "Idempotency-Key": order_key},
        )
        op.expects.append(("order", f"{op.customer}/{order_key}"))
        op.units[sku] = qty
        if placed.status != 201 or not isinstance(placed.body, dict):
            op.detail = f"placing its order: {_describe([placed])}"
            return None
        return placed.body

    async def order(self, op: Op) -> None:
        sku = self.rng.choice(list(self.config.skus))
        qty = self.rng.randint(1, 5)
        body = {"sku": sku, "qty": qty, "customer": op.customer}
        headers = {**_bearer(op.customer), "Idempotency-Key": op.key}

        async def send(i: int, changed: dict[str, Any] | None) -> _Answer:
            timeout = self._first_timeout(op, i)
            return await self.client.send(
                "POST", "/orders", body=changed or body, headers=headers, first_timeout=timeout
            )

        answers = await self.copies(op, send, {**body, "qty": qty + 1})
        originals = self._originals(op, answers)
        op.expects.append(("order", f"{op.customer}/{op.key}"))
        op.units[sku] = qty
        op.succeeded = any(a.status == 201 for a in originals)
        if not op.succeeded:
            op.detail = _describe(originals)

    async def pay(self, op: Op) -> None:
        placed = await self._place(op, self.rng.choice(list(self.config.skus)), 1)
        if placed is None:
            return
        order_id = str(placed.get("order_id"))
        amount = int(placed.get("amount", 0))
        op.expects.append(("charge", order_id))
        token = await self._token(op, order_id)
        if token is None:
            return
        pay_key = f"{op.key}-pay"

        async def send(
            i: int, changed: dict[str, Any] | None, tok: str = token, key: str | None = pay_key
        ) -> _Answer:
            headers = {**_bearer(op.customer), "Payment-Token": tok}
            if key is not None and not (op.pattern == "double-submit" and i > 0):
                headers["Idempotency-Key"] = key
            timeout = self._first_timeout(op, i)
            return await self.client.send(
                "POST",
                f"/orders/{order_id}/pay",
                body=changed or {"amount": amount},
                headers=headers,
                first_timeout=timeout,
            )

        answers = await self.copies(op, send, {"amount": amount + 1})
        originals = self._originals(op, answers)
        op.succeeded = _paid(originals)
        if not op.succeeded and any(_orphaned_token(a) for a in originals):
            # The token was consumed by a request that never charged (its worker died): every
            # copy has finished and the key's lease has run out, so a new token is safe.
            await asyncio.sleep(self.config.lease + 0.5)
            token2 = await self._token(op, order_id)
            if token2 is not None:
                again = await send(0, None, token2, f"{pay_key}-again")
                op.succeeded = _paid([again])
                originals.append(again)
        if not op.succeeded:
            op.detail = f"paying {order_id}: {_describe(originals)}"

    async def credit(self, op: Op) -> None:
        """Credit an account the optimistic way: read its ``ETag``, send the ``k`` copies with
        ``If-Match`` and one ``Idempotency-Key``; when every copy got ``412`` (another credit
        landed in between), read again and send the next round, as a client of a versioned
        resource does. A credit applied twice, or overwritten, shows in the ledger / balance."""
        account = self.rng.choice(list(self.config.accounts))
        amount = self.rng.randint(1, 100)
        headers = {**_bearer(op.customer), "Idempotency-Key": op.key}
        op.expects.append(("credit", f"{op.customer}/{op.key}"))
        answers: list[_Answer] = []
        for _ in range(CREDIT_ROUNDS):
            read = await self.client.send("GET", f"/accounts/{account}")
            if read.status != 200 or not read.etag:
                op.detail = f"reading {account}: {_describe([read])}"
                return
            tag = read.etag

            async def send(i: int, changed: dict[str, Any] | None, tag: str = tag) -> _Answer:
                timeout = self._first_timeout(op, i)
                return await self.client.send(
                    "POST",
                    f"/accounts/{account}/credit",
                    body={"amount": amount},
                    headers={**headers, "If-Match": tag},
                    first_timeout=timeout,
                )

            answers = await self.copies(op, send, None)
            if any(a.status == 200 for a in answers):
                op.succeeded = True
                return
            if not all(a.status == 412 for a in answers):
                break
            self.result.duplicates -= max(1, self.config.duplicates) - 1  # a round, not copies
            await asyncio.sleep(self.rng.uniform(0, 0.02))
        op.detail = f"crediting {account}: {_describe(answers)}"

    async def cancel(self, op: Op) -> None:
        """Place an order, then cancel it ``k`` times (concurrent, sequential, or the first
        copy cut off by a client timeout): one cancellation, the stock given back once."""
        sku = self.rng.choice(list(self.config.skus))
        qty = self.rng.randint(1, 5)
        placed = await self._place(op, sku, qty)
        if placed is None:
            return
        order_id = str(placed.get("order_id"))
        op.expects.append(("restock", order_id))
        op.restock = {sku: qty}
        op.restock_key = order_id

        answers = await self._post_copies(op, f"/orders/{order_id}/cancel")
        op.succeeded = any(
            a.status == 200 and isinstance(a.body, dict) and a.body.get("status") == "cancelled"
            for a in answers
        )
        if not op.succeeded:
            op.detail = f"cancelling {order_id}: {_describe(answers)}"

    async def ship(self, op: Op) -> None:
        """Place and pay an order, then ask ``k`` times to ship it: one ``ship`` effect, which
        the service may apply after answering (through a queue)."""
        placed = await self._place(op, self.rng.choice(list(self.config.skus)), 1)
        if placed is None:
            return
        order_id = str(placed.get("order_id"))
        op.expects.append(("charge", order_id))
        token = await self._token(op, order_id)
        if token is None:
            return
        amount = int(placed.get("amount", 0))

        async def pay(tok: str, key: str) -> _Answer:
            return await self.client.send(
                "POST",
                f"/orders/{order_id}/pay",
                body={"amount": amount},
                headers={**_bearer(op.customer), "Payment-Token": tok, "Idempotency-Key": key},
            )

        paid = await pay(token, f"{op.key}-pay")
        if _orphaned_token(paid):  # consumed by a request that died: as in pay(), once more
            await asyncio.sleep(self.config.lease + 0.5)
            token = await self._token(op, order_id) or ""
            if token:
                paid = await pay(token, f"{op.key}-pay-again")
        if not _paid([paid]):
            op.detail = f"paying {order_id}: {_describe([paid])}"
            return
        op.expects.append(("ship", order_id))

        answers = await self._post_copies(op, f"/orders/{order_id}/ship")
        op.succeeded = any(a.status in (200, 202) for a in answers)
        if not op.succeeded:
            op.detail = f"shipping {order_id}: {_describe(answers)}"

    async def webhook(self, op: Op) -> None:
        """A payment notification delivered ``k`` times (as providers redeliver): acted upon
        once, the copies answered ``{"duplicate": true}``."""
        event_id = f"evt-{op.key}"
        event = {"event_id": event_id, "amount": self.rng.randint(1, 10_000)}
        op.expects.append(("webhook", event_id))

        async def send(i: int, changed: dict[str, Any] | None) -> _Answer:
            timeout = self._first_timeout(op, i)
            return await self.client.send(
                "POST", "/webhooks/payment", body=event, first_timeout=timeout
            )

        answers = await self.copies(op, send, None)
        op.succeeded = any(a.status == 200 for a in answers)
        if not op.succeeded:
            op.detail = f"delivering {event_id}: {_describe(answers)}"

    async def _token(self, op: Op, order_id: str) -> str | None:
        issued = await self.client.send(
            "POST", "/payment-tokens", body={"order_id": order_id}, headers=_bearer(op.customer)
        )
        if issued.status != 201 or not isinstance(issued.body, dict) or "token" not in issued.body:
            op.detail = f"getting a payment token: {_describe([issued])}"
            return None
        return str(issued.body["token"])

    # -- bad input ----------------------------------------------------------------------------
    def bad_requests(self, live: Sequence[str]) -> list[tuple[str, str, bytes, dict[str, str]]]:
        def key() -> dict[str, str]:
            k = f"storm-{self.run}-bad-{len(self.bad_keys)}"
            self.bad_keys.add(f"badguy/{k}")
            return {
                "Idempotency-Key": k,
                "Authorization": "Bearer badguy",
                "Content-Type": "application/json",
            }

        def js(value: Any) -> bytes:
            return json.dumps(value).encode()

        sku = self.config.skus[0]
        ghost = f"ord_storm{self.run}missing"
        self.bad_keys.add(ghost)
        cases: list[tuple[str, str, bytes, dict[str, str]]] = [
            ("GET", "/stock/no-such-sku", b"", {})
        ]
        if "order" in live:
            cases += [
                ("POST", "/orders", b"{not json", key()),
                ("POST", "/orders", js([1, 2]), key()),
                ("POST", "/orders", js({"sku": sku, "qty": -5, "customer": "badguy"}), key()),
                ("POST", "/orders", js({"sku": sku, "qty": 10**30, "customer": "badguy"}), key()),
                ("POST", "/orders", js({"sku": sku, "qty": "3", "customer": "badguy"}), key()),
                ("POST", "/orders", js({"sku": sku, "qty": 1.5, "customer": "badguy"}), key()),
                ("POST", "/orders", js({"sku": sku, "customer": "badguy"}), key()),
                (
                    "POST",
                    "/orders",
                    js({"sku": "no-such-sku", "qty": 1, "customer": "badguy"}),
                    key(),
                ),
                ("POST", "/orders", js({"sku": sku, "qty": 1, "customer": ""}), key()),
            ]
        if "credit" in live:
            acct = f"/accounts/{self.config.accounts[0]}/credit"
            tag = {"If-Match": '"1"'}
            cases += [
                ("POST", acct, js({"amount": -5}), {**key(), **tag}),
                ("POST", acct, js({"amount": 10**20}), {**key(), **tag}),
                ("POST", acct, js({"amount": "5"}), {**key(), **tag}),
                ("POST", acct, b"{", {**key(), **tag}),
                ("POST", f"/accounts/{ghost}/credit", js({"amount": 5}), {**key(), **tag}),
            ]
        if "webhook" in live:
            cases += [
                ("POST", "/webhooks/payment", b"{", key()),
                ("POST", "/webhooks/payment", js({}), key()),
                ("POST", "/webhooks/payment", js({"event_id": 5}), key()),
                ("POST", "/webhooks/payment", js({"event_id": ""}), key()),
                ("POST", "/webhooks/payment", js({"event_id": ghost, "amount": -1}), key()),
            ]
        if "ship" in live:
            cases += [("POST", f"/orders/{ghost}/ship", b"", key())]
        if "cancel" in live:
            cases += [
                ("POST", f"/orders/{ghost}/cancel", b"", key()),
                ("POST", "/orders/%20/cancel", b"", key()),
            ]
        if "pay" in live:
            cases += [
                ("POST", "/payment-tokens", js({"order_id": ghost}), key()),
                ("POST", "/payment-tokens", js({}), key()),
                ("POST", f"/orders/{ghost}/pay", js({"amount": 100}), key()),
                ("POST", f"/orders/{ghost}/pay", js({"amount": -100}), key()),
                ("POST", f"/orders/{ghost}/pay", js({"amount": 10**20}), key()),
                ("POST", f"/orders/{ghost}/pay", b"\xff\xfe", key()),
            ]
        return cases

    async def bad(self, case: tuple[str, str, bytes, dict[str, str]]) -> None:
        method, path, content, headers = case
        # Retried like any request (a fault may cut it off); judged on its final answer.
        answer = await self.client.send(
            method, path, content=content or None, headers=headers, label="bad input refused"
        )
        self.result.bad_sent += 1
        self.bad_ops.append((f"{method} {path} {content[:40]!r}", answer))


def _describe(answers: Sequence[_Answer]) -> str:
    return ", ".join(
        f"{a.status or a.error}{' ' + a.problem if a.problem else ''}" for a in answers
    )


def _paid(answers: Sequence[_Answer]) -> bool:
    for a in answers:
        if a.status == 200:
            return True
        if a.status == 409 and isinstance(a.body, dict) and a.body.get("order_status") == "paid":
            return True
    return False


def _orphaned_token(answer: _Answer) -> bool:
    return (
        answer.status == 409
        and answer.problem == "token-reused"
        and isinstance(answer.body, dict)
        and answer.body.get("order_status") == "placed"
    )


DRIVERS: dict[str, Callable[[_Storm, Op], Awaitable[None]]] = {
    "order": _Storm.order,
    "pay": _Storm.pay,
    "credit": _Storm.credit,
    "cancel": _Storm.cancel,
    "webhook": _Storm.webhook,
    "ship": _Storm.ship,
}


class _Reader:
    """The verification's ``GET``s: one that gets no answer is retried (a worker restarting)
    until the caller's ``abort`` gives a reason or nothing has answered for
    ``config.silence`` seconds, then its :class:`TransportError` is raised."""

    def __init__(self, http: Http, config: StormConfig) -> None:
        self.http = http
        self.config = config

    async def get(self, path: str, timeout: float = 30.0) -> Reply:
        started = time.monotonic()
        attempt = 0
        while True:
            try:
                return await self.http.get(path, timeout=timeout)
            except TransportError:
                gone = self.config.abort() if self.config.abort is not None else None
                if gone is not None or time.monotonic() - started > self.config.silence:
                    raise
            await asyncio.sleep(_Client._backoff(attempt, None))
            attempt += 1


async def _check_balances(
    http: _Reader, accounts: Sequence[str], ledger: list[dict[str, Any]], result: StormResult
) -> None:
    """Lost updates: an account's balance must equal the sum of the credits the ledger
    applied to it (accounts start at 0 and only credits change them); a credit overwritten by a
    concurrent read-modify-write is in the ledger but not in the balance."""
    applied: Counter[str] = Counter()
    for e in ledger:
        if e.get("kind") == "credit":
            applied[str(e.get("entity"))] += int(e.get("amount", 0))
    for account in accounts:
        body = _ok(await http.get(f"/accounts/{account}"), f"GET /accounts/{account}")
        missing = applied[account] - int(body["balance"])
        result.lost_updates_by_account[account] = missing
        result.lost_updates += abs(missing)


def _ok(reply: Reply, what: str) -> Any:
    if reply.status != 200:
        raise StormAborted(f"{what} answered {reply.status}: {reply.body[:200]!r}")
    return reply.json()


async def _stock(http: _Reader, skus: Sequence[str]) -> dict[str, int]:
    stock = {}
    for sku in skus:
        stock[sku] = int(_ok(await http.get(f"/stock/{sku}"), f"GET /stock/{sku}")["stock"])
    return stock


async def _ledger(http: _Reader) -> list[dict[str, Any]]:
    data = _ok(await http.get("/ledger", timeout=120.0), "GET /ledger")
    entries = data.get("entries", data) if isinstance(data, dict) else data
    if not isinstance(entries, list):
        raise ValueError("GET /ledger must answer a JSON list of effects")
    return entries


def _verify(
    storm: _Storm, ledger: list[dict[str, Any]], before: dict[str, int], after: dict[str, int]
) -> None:
    result = storm.result
    counts: Counter[tuple[str, str]] = Counter(
        (str(e.get("kind")), str(e.get("key"))) for e in ledger
    )
    mine: set[tuple[str, str]] = set()
    order_ids: set[str] = set()
    consumed: Counter[str] = Counter()
    for op in storm.ops:
        present = True
        for expect in op.expects:
            mine.add(expect)
            if expect[0] == "charge":
                order_ids.add(expect[1])
            if counts[expect] == 0:
                present = False
        for expect in op.expects:
            if expect[0] == "order" and counts[expect] > 0:
                for sku, units in op.units.items():
                    consumed[sku] += units
        if op.restock_key and counts[("restock", op.restock_key)] > 0:
            for sku, units in op.restock.items():  # given back, counted once
                consumed[sku] -= units
        if not (op.succeeded and present):
            result.lost += 1
            if len(result.lost_examples) < 10:
                why = "client saw success, effect missing" if op.succeeded else op.detail
                result.lost_examples.append(f"{op.kind} {op.key} ({op.pattern}): {why}")
    for (kind, key), n in counts.items():
        if (kind, key) in mine or (kind == "settle" and key in order_ids):
            result.effects += n
            if n > 1:
                result.double_effects += n - 1
                result.double_by_kind[kind] = result.double_by_kind.get(kind, 0) + n - 1
    for label, answer in storm.bad_ops:
        bad = ""
        if answer.status == 0 or (answer.status >= 500 and answer.status != 501):
            bad = f"answered {answer.status or answer.error}"
        elif answer.status < 400:
            bad = f"accepted with {answer.status}"
        elif "problem+json" not in answer.content_type:
            bad = f"{answer.status} without problem+json"
        if bad:
            result.bad_failures += 1
            if len(result.bad_examples) < 10:
                result.bad_examples.append(f"{label}: {bad}")
    applied_bad = sum(n for (_, key), n in counts.items() if key in storm.bad_keys)
    if applied_bad:
        result.bad_failures += applied_bad
        result.bad_examples.append(f"{applied_bad} ledger effect(s) from bad input")
    for sku in before:
        drift = after[sku] - (before[sku] - consumed[sku])
        result.drift_by_sku[sku] = drift
        result.stock_drift += abs(drift)


async def run_storm_async(config: StormConfig, label: str = "") -> StormResult:
    """Run the storm against ``config.url`` and verify; see the module docstring.

    :raises ServiceUnreachable: the service did not answer (naming the step).
    :raises StormAborted: ``config.abort`` gave a reason, or the service answered a
        verification request with an error.
    """
    seed = config.seed if config.seed is not None else secrets.randbelow(2**31)
    result = StormResult(url=config.url, label=label, seed=seed)
    started = time.perf_counter()
    connections = max(8, 2 * config.duplicates * config.concurrency)
    step = "at GET /healthz"
    answered = False
    async with Http(config.url, connections) as http:
        try:
            _ok(await http.get("/healthz"), f"{config.url}/healthz")
            answered = True
            step = "while the storm discovered its endpoints"
            result.skipped = await _discover(http, list(KINDS))
            live = [k for k in KINDS if k not in result.skipped]
            if not live:
                failed = [r for r in result.skipped.values() if r.startswith("discovery failed")]
                if failed:  # no answer: not a service without endpoints
                    error = failed[-1].removeprefix("discovery failed: ")
                    raise ServiceUnreachable(config.url, step, error, answered)
                raise StormAborted(
                    f"{config.url} offers no operation the storm can drive: {result.skipped}"
                )
            storm = _Storm(config, http, result)
            storm.ops = storm.plan(live)
            result.by_kind = dict(Counter(op.kind for op in storm.ops))
            result.operations = len(storm.ops)
            reader = _Reader(http, config)
            step = "at GET /stock before the storm"
            before = await _stock(reader, config.skus)
            step = "during the storm"
            await _run_work(config, storm, live, result)
            step = "at GET /ledger after the storm"
            ledger = await _ledger(reader)
            shipped = {
                ("ship", key) for op in storm.ops for kind, key in op.expects if kind == "ship"
            }
            deadline = time.monotonic() + ASYNC_WAIT
            while shipped and time.monotonic() < deadline:
                present = {(str(e.get("kind")), str(e.get("key"))) for e in ledger}
                if shipped <= present:
                    break
                _check_abort(config, "while waiting for the ship rows after the storm")
                await asyncio.sleep(0.5)
                ledger = await _ledger(reader)
            step = "at GET /stock after the storm"
            after = await _stock(reader, config.skus)
            _verify(storm, ledger, before, after)
            if "credit" in live:
                step = "at GET /accounts after the storm"
                await _check_balances(reader, config.accounts, ledger, result)
        except StormAborted as exc:
            exc.step = exc.step or step
            raise
        except TransportError as exc:
            # Requests outside the storm's retries: one with no answer ends the storm here.
            _check_abort(config, step)  # the caller may know why (the demo: its shop died)
            raise ServiceUnreachable(config.url, step, str(exc), answered) from exc
    result.outcomes = dict(storm.client.outcomes)
    result.seconds = time.perf_counter() - started
    return result


async def _run_work(
    config: StormConfig, storm: _Storm, live: Sequence[str], result: StormResult
) -> None:
    """The storm proper: every operation's copies and the bad input, with the faults at their
    share of the work done, then ``config.grace`` seconds for background jobs."""
    work: list[Any] = list(storm.ops)
    bad = storm.bad_requests(live)
    count = max(len(bad), round(config.bad_fraction * config.operations))
    for i in range(count):
        work.insert(storm.rng.randrange(len(work) + 1), bad[i % len(bad)])
    total = len(work)
    done = 0
    gate = asyncio.Semaphore(config.concurrency)
    pending_faults = sorted(config.faults, key=lambda f: f.at)
    fault_tasks: list[asyncio.Future[str]] = []
    loop = asyncio.get_running_loop()

    async def one(item: Any) -> None:
        nonlocal done
        async with gate:
            if isinstance(item, Op):
                await DRIVERS[item.kind](storm, item)
            else:
                await storm.bad(item)
        done += 1
        while pending_faults and done >= pending_faults[0].at * total:
            fault = pending_faults.pop(0)
            fault_tasks.append(loop.run_in_executor(None, fault.action))
        if config.progress is not None:
            config.progress(done, total)

    work_tasks = [asyncio.ensure_future(one(item)) for item in work]
    try:
        await asyncio.gather(*work_tasks)
    except BaseException:
        # Stopped (no answer, or the caller's abort): the rest of the work is cancelled here,
        # not left to raise the same error again while asyncio.run shuts down.
        for running in work_tasks:
            running.cancel()
        await asyncio.gather(*work_tasks, return_exceptions=True)
        raise
    for fault in pending_faults:  # a storm too short to reach them
        fault_tasks.append(loop.run_in_executor(None, fault.action))
    for task in fault_tasks:
        try:
            result.faults.append(await task)
        except Exception as exc:
            result.faults.append(f"fault failed: {type(exc).__name__}: {exc}")
    await asyncio.sleep(config.grace)


def run_storm(config: StormConfig, label: str = "") -> StormResult:
    """Blocking :func:`run_storm_async`."""
    return asyncio.run(run_storm_async(config, label))
