"""The two sans-IO flows driven directly, h11 style: each case is a script of the operations the
flow must yield and the answers a store (or the app) gives, and the outcome it must end with.
No store, no socket, no thread: a scripted answer is sent into the generator, a scripted
failure thrown into it. Every branch of ``call_flow`` (the decorator) and ``request_flow``
(HTTP) has a row.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import pytest

from oncely.codecs import JsonCodec
from oncely.core.ops import Claim, Complete, CompleteLater, Release, Sleep, Watch
from oncely.core.records import InFlight, Mismatch, New, Record, RecordKey, Replay
from oncely.errors import (
    IdempotencyKeyMismatch,
    InFlightError,
    LeaseLost,
    ResultNotStored,
    SchemaMissing,
    SerializationError,
    StoredFailure,
    StoreUnavailable,
    TokenReused,
)
from oncely.functions.cache import ResultCache
from oncely.functions.flow import (
    ERROR_CODEC,
    UNSERIALIZABLE,
    CallPolicy,
    Run,
    RunUnprotected,
    call_flow,
)
from oncely.http import GLOBAL, IdempotencyConfig, Rule, TokenGuard
from oncely.http.codec import CODEC, UNREPLAYABLE, decode_response, encode_response
from oncely.http.engine import Engine
from oncely.http.flow import (
    PASS,
    BodyError,
    Captured,
    ConsumeToken,
    IssueToken,
    ReadBody,
    ReleaseToken,
    Respond,
    request_flow,
)
from oncely.http.flow import Run as HttpRun
from oncely.http.messages import HttpRequest
from oncely.stores.memory import MemoryStore
from oncely.tokens import Tokens, TokenUse

KEY = RecordKey("s", "d" * 64)


@dataclass
class Step:
    """The flow must yield an operation of type ``op`` (and pass ``check``); it then gets
    ``answer`` back, or ``error`` thrown in."""

    op: type
    answer: Any = None
    error: BaseException | None = None
    check: Callable[[Any], bool] = field(default=lambda op: True)


@dataclass
class Ends:
    """How the flow ends: returning ``value``, or raising ``raises`` (a type)."""

    value: Any = None
    raises: type[BaseException] | None = None


def play(flow: Generator[Any, Any, Any], script: list[Step], end: Ends) -> Any:
    """Run ``flow`` against ``script``; return what it returned (or the exception it raised)."""
    send: Any = None
    throw: BaseException | None = None
    for number, step in enumerate(script):
        try:
            op = flow.send(send) if throw is None else flow.throw(throw)
        except StopIteration:
            pytest.fail(f"the flow ended before step {number} ({step.op.__name__})")
        assert isinstance(op, step.op), f"step {number}: expected {step.op.__name__}, got {op!r}"
        assert step.check(op), f"step {number}: {op!r} fails its check"
        send, throw = step.answer, step.error
    try:
        op = flow.send(send) if throw is None else flow.throw(throw)
    except StopIteration as stop:
        assert end.raises is None, f"returned {stop.value!r}, expected {end.raises}"
        assert stop.value == end.value
        return stop.value
    except BaseException as exc:
        assert end.raises is not None and isinstance(exc, end.raises), repr(exc)
        return exc
    pytest.fail(f"the flow went on after the script: {op!r}")


# -- call_flow (the decorator) --------------------------------------------------------------------
class Declined(Exception):
    pass


def policy(**overrides: Any) -> CallPolicy:
    settings: dict[str, Any] = {
        "name": "billing.charge",
        "codec": JsonCodec(),
        "return_type": Any,
        "ttl": 60.0,
        "lease": 5.0,
        "on_duplicate": "wait",
        "wait_timeout": 10.0,
        "store_errors": (Declined,),
        "fail_open": False,
        "cache": None,
    }
    settings.update(overrides)
    return CallPolicy(**settings)


def record(result: bytes, codec: str, fingerprint: str = "") -> Record:
    return Record("s", "d" * 64, "completed", fingerprint, 7, None, 2e9, 1e9, result, codec)


def error_json(cls: type, *args: Any) -> bytes:
    return json.dumps(
        {"type": f"{cls.__module__}.{cls.__qualname__}", "message": "no", "args": list(args)}
    ).encode()


NEW = New(fence=7, lease_until=105.0, now=100.0)
BUSY = InFlight(fence=6, lease_until=103.0, now=100.0)
DOWN = StoreUnavailable("down")


def claim_step(answer: Any = None, error: BaseException | None = None) -> Step:
    return Step(Claim, answer, error, lambda op: op.key == KEY and op.lease == 5.0)


def completes(codec: str) -> Callable[[Any], bool]:
    return lambda op: op.fence == 7 and op.codec == codec and op.key == KEY


CALL_CASES: dict[str, tuple[dict[str, Any], list[Step], Ends]] = {
    "new: run, complete, return": (
        {},
        [claim_step(NEW), Step(Run, {"ok": 1}), Step(Complete, check=completes("json"))],
        Ends({"ok": 1}),
    ),
    "store down: fail closed": ({}, [claim_step(error=DOWN)], Ends(raises=StoreUnavailable)),
    "store down: fail open runs unprotected": (
        {"fail_open": True},
        [claim_step(error=DOWN), Step(RunUnprotected, 3)],
        Ends(3),
    ),
    "replay": ({}, [claim_step(Replay(record(b"[1, 2]", "json"), 100.0))], Ends([1, 2])),
    "replay of a stored error of an allowed class": (
        {},
        [claim_step(Replay(record(error_json(Declined, "no"), ERROR_CODEC), 100.0))],
        Ends(raises=Declined),
    ),
    "replay of a stored error no longer allowed": (
        {"store_errors": ()},
        [claim_step(Replay(record(error_json(Declined, "no"), ERROR_CODEC), 100.0))],
        Ends(raises=StoredFailure),
    ),
    "replay of a result that could not be stored": (
        {},
        [claim_step(Replay(record(b"", UNSERIALIZABLE), 100.0))],
        Ends(raises=SerializationError),
    ),
    "replay under another codec": (
        {},
        [claim_step(Replay(record(b"x", "raw"), 100.0))],
        Ends(raises=SerializationError),
    ),
    "mismatch": ({}, [claim_step(Mismatch(100.0))], Ends(raises=IdempotencyKeyMismatch)),
    "in flight: raise": (
        {"on_duplicate": "raise"},
        [claim_step(BUSY)],
        Ends(raises=InFlightError),
    ),
    "in flight: wait, then replay": (
        {},
        [
            claim_step(BUSY),
            Step(Watch, True, check=lambda op: op.fence == 6 and 0 < op.timeout <= 3.01),
            claim_step(Replay(record(b"5", "json"), 101.0)),
        ],
        Ends(5),
    ),
    "in flight: wait, holder released, take over": (
        {},
        [
            claim_step(BUSY),
            Step(Watch, True),
            claim_step(NEW),
            Step(Run, 9),
            Step(Complete, check=completes("json")),
        ],
        Ends(9),
    ),
    "in flight: no time left to wait": (
        {"wait_timeout": 0.0},
        [claim_step(BUSY)],
        Ends(raises=InFlightError),
    ),
    "body raises a stored error: completed with it": (
        {},
        [
            claim_step(NEW),
            Step(Run, error=Declined("no")),
            Step(Complete, check=completes(ERROR_CODEC)),
        ],
        Ends(raises=Declined),
    ),
    "body raises: released": (
        {},
        [
            claim_step(NEW),
            Step(Run, error=RuntimeError("x")),
            Step(Release, check=lambda op: op.fence == 7),
        ],
        Ends(raises=RuntimeError),
    ),
    "body raises, release retried while the store is down": (
        {},
        [
            claim_step(NEW),
            Step(Run, error=RuntimeError("x")),
            Step(Release, error=DOWN),
            Step(Sleep),
            Step(Release),
        ],
        Ends(raises=RuntimeError),
    ),
    "body raises, release never lands: the body's error still propagates": (
        {},
        [
            claim_step(NEW),
            Step(Run, error=RuntimeError("x")),
            Step(Release, error=DOWN),
            Step(Sleep),
            Step(Release, error=DOWN),
            Step(Sleep),
            Step(Release, error=DOWN),
        ],
        Ends(raises=RuntimeError),
    ),
    "result the codec cannot encode: recorded as ran": (
        {},
        [claim_step(NEW), Step(Run, object()), Step(Complete, check=completes(UNSERIALIZABLE))],
        Ends(raises=SerializationError),
    ),
    "completion retried while the store is briefly down": (
        {},
        [claim_step(NEW), Step(Run, 1), Step(Complete, error=DOWN), Step(Sleep), Step(Complete)],
        Ends(1),
    ),
    "completion never lands: handed to the background, ResultNotStored": (
        {},
        [
            claim_step(NEW),
            Step(Run, 1),
            Step(Complete, error=DOWN),
            Step(Sleep),
            Step(Complete, error=DOWN),
            Step(Sleep),
            Step(Complete, error=DOWN),
            Step(CompleteLater, check=lambda op: op.fence == 7 and op.lease == 5.0),
        ],
        Ends(raises=ResultNotStored),
    ),
    "claim lost before the completion": (
        {},
        [claim_step(NEW), Step(Run, 1), Step(Complete, error=LeaseLost("gone"))],
        Ends(raises=LeaseLost),
    ),
}


@pytest.mark.parametrize("case", list(CALL_CASES))
def test_call_flow(case: str) -> None:
    overrides, script, end = CALL_CASES[case]
    play(call_flow(policy(**overrides), KEY, ""), script, end)


def test_call_flow_serves_a_cached_replay_without_any_operation() -> None:
    cache = ResultCache(10)
    cache.put(KEY, record(b'"cached"', "json"), 60.0)
    play(call_flow(policy(cache=cache), KEY, ""), [], Ends("cached"))
    # Another payload under the cached key goes to the store (which answers Mismatch).
    play(
        call_flow(policy(cache=cache), KEY, "other"),
        [claim_step(Mismatch(100.0))],
        Ends(raises=IdempotencyKeyMismatch),
    )


def test_call_flow_rebuilds_typed_results_from_the_annotation() -> None:
    codec = JsonCodec().bind(Decimal)
    replay = Replay(record(codec.encode(Decimal("9.99")), "json"), 100.0)
    result = play(
        call_flow(policy(codec=codec, return_type=Decimal), KEY, ""),
        [claim_step(replay)],
        Ends(Decimal("9.99")),
    )
    assert isinstance(result, Decimal)


# -- request_flow (HTTP) -------------------------------------------------------------------------
SECRET = "s" * 32


def engine(**options: Any) -> Engine:
    options.setdefault("scope", GLOBAL)
    return Engine(IdempotencyConfig(store=MemoryStore(), lease=5, **options))


def guarded_engine(**options: Any) -> Engine:
    store = MemoryStore()
    guard = TokenGuard(
        tokens=Tokens(SECRET, store), subject=GLOBAL, endpoint="/tokens", routes={"/pay": "pay"}
    )
    return Engine(IdempotencyConfig(store=store, scope=GLOBAL, tokens=guard, lease=5, **options))


def post(
    path: str = "/orders", key: str | None = "k-1", body: bytes = b"{}", **headers: str
) -> HttpRequest:
    raw = [
        (name.replace("_", "-").lower().encode(), value.encode()) for name, value in headers.items()
    ]
    if key is not None:
        raw.append((b"idempotency-key", f'"{key}"'.encode()))
    raw.append((b"content-type", b"application/json"))
    if "content_length" not in headers:
        raw.append((b"content-length", str(len(body)).encode()))
    return HttpRequest("POST", path, b"", raw)


def problem(slug: str, status: int) -> Callable[[Any], bool]:
    def check(op: Any) -> bool:
        body = json.loads(op.response.body)
        return op.response.status == status and str(body["type"]).endswith("/" + slug)

    return check


def stored(status: int) -> Callable[[Any], bool]:
    return lambda op: op.codec == CODEC and decode_response(op.data).status == status


def marked(op: Any) -> bool:
    return bool(op.codec == UNREPLAYABLE)


def done(
    status: int = 201,
    body: bytes | None = b"{}",
    handled: bool = True,
    error: BaseException | None = None,
) -> Captured:
    """A complete response the app produced."""
    return Captured(status, [(b"content-type", b"application/json")], body, True, handled, error)


USE = TokenUse("t", "pay", 2e9, RecordKey("tokens", "t"), 3)
HTTP_NEW = New(fence=7, lease_until=105.0, now=100.0)
STORED_201 = Record(
    "http:", "d", "completed", "", 7, None, 2e9, 1e9, encode_response(201, [], b"{}"), CODEC
)
READ = Step(ReadBody, b"{}")
RUN = HttpRun

HTTP_CASES: dict[str, tuple[Callable[[], Engine], HttpRequest, list[Step], Ends]] = {
    "a safe method passes": (
        engine,
        HttpRequest("GET", "/orders", b"", []),
        [Step(type(PASS))],
        Ends(),
    ),
    "an excluded path passes": (
        lambda: engine(exclude=["/health"]),
        post("/health"),
        [Step(type(PASS))],
        Ends(),
    ),
    "a malformed key is 400": (
        engine,
        post(key=None, idempotency_key="not a string"),
        [Step(Respond, check=problem("idempotency-key-invalid", 400))],
        Ends(),
    ),
    "a missing key where required is 400": (
        lambda: engine(required=True),
        post(key=None),
        [Step(Respond, check=problem("idempotency-key-missing", 400))],
        Ends(),
    ),
    "a missing key where optional passes": (
        lambda: engine(required=False),
        post(key=None),
        [Step(type(PASS))],
        Ends(),
    ),
    "a non-numeric Content-Length is 400": (
        engine,
        post(content_length="x"),
        [Step(Respond, check=problem("request-body-incomplete", 400))],
        Ends(),
    ),
    "a declared length over the limit is 413 without reading": (
        lambda: engine(max_request_body=1),
        post(),
        [Step(Respond, check=problem("request-body-too-large", 413))],
        Ends(),
    ),
    "a body over the limit is 413": (
        engine,
        post(),
        [
            Step(ReadBody, BodyError.TOO_LARGE),
            Step(Respond, check=problem("request-body-too-large", 413)),
        ],
        Ends(),
    ),
    "a truncated body is 400": (
        engine,
        post(),
        [
            Step(ReadBody, BodyError.INCOMPLETE),
            Step(Respond, check=problem("request-body-incomplete", 400)),
        ],
        Ends(),
    ),
    "invalid JSON is 400 and claims nothing": (
        engine,
        post(body=b"{"),
        [Step(ReadBody, b"{"), Step(Respond, check=problem("request-body-invalid", 400))],
        Ends(),
    ),
    "new: run, store the response": (
        engine,
        post(),
        [
            READ,
            Step(Claim, HTTP_NEW),
            Step(RUN, done(), check=lambda op: op.fence == 7),
            Step(Complete, check=stored(201)),
        ],
        Ends(),
    ),
    "the handler raised before responding: kept as a 500, raised": (
        engine,
        post(),
        [
            READ,
            Step(Claim, HTTP_NEW),
            Step(RUN, Captured(error=RuntimeError("boom"))),
            Step(Complete, check=stored(500)),
        ],
        Ends(raises=RuntimeError),
    ),
    "a 5xx is stored": (
        engine,
        post(),
        [READ, Step(Claim, HTTP_NEW), Step(RUN, done(503)), Step(Complete, check=stored(503))],
        Ends(),
    ),
    "cancelled before responding, on_cancel=release: released, raised": (
        lambda: engine(on_cancel="release"),
        post(),
        [
            READ,
            Step(Claim, HTTP_NEW),
            Step(RUN, Captured(error=asyncio.CancelledError())),
            Step(Release),
        ],
        Ends(raises=asyncio.CancelledError),
    ),
    # on_cancel="finish": the handler is shielded from its request, so a cancellation that
    # reaches it is the loop ending (a server's shutdown): it may have acted, the key stays
    # claimed until its lease ends (no release), as after a crash.
    "cancelled before responding, on_cancel=finish: kept claimed, raised": (
        engine,
        post(),
        [READ, Step(Claim, HTTP_NEW), Step(RUN, Captured(error=asyncio.CancelledError()))],
        Ends(raises=asyncio.CancelledError),
    ),
    "Ctrl-C in the handler before it responded: kept claimed, raised": (
        engine,
        post(),
        [READ, Step(Claim, HTTP_NEW), Step(RUN, Captured(error=KeyboardInterrupt()))],
        Ends(raises=KeyboardInterrupt),
    ),
    "refused before the handler, then raised: released, raised": (
        engine,
        post(),
        [
            READ,
            Step(Claim, HTTP_NEW),
            Step(RUN, Captured(handled=False, error=RuntimeError("boom"))),
            Step(Release),
        ],
        Ends(raises=RuntimeError),
    ),
    "release-on-5xx: the handler raised before responding: released, raised": (
        lambda: engine(store_server_errors=False),
        post(),
        [
            READ,
            Step(Claim, HTTP_NEW),
            Step(RUN, Captured(error=RuntimeError("boom"))),
            Step(Release, check=lambda op: op.fence == 7),
        ],
        Ends(raises=RuntimeError),
    ),
    "release-on-5xx: a 5xx is released": (
        lambda: engine(store_server_errors=False),
        post(),
        [READ, Step(Claim, HTTP_NEW), Step(RUN, done(503)), Step(Release)],
        Ends(),
    ),
    "a 4xx is released when client errors are not stored": (
        lambda: engine(store_client_errors=False),
        post(),
        [READ, Step(Claim, HTTP_NEW), Step(RUN, done(404)), Step(Release)],
        Ends(),
    ),
    "a transient status is released": (
        engine,
        post(),
        [READ, Step(Claim, HTTP_NEW), Step(RUN, done(429)), Step(Release)],
        Ends(),
    ),
    "refused before the handler: released": (
        engine,
        post(),
        [READ, Step(Claim, HTTP_NEW), Step(RUN, done(422, handled=False)), Step(Release)],
        Ends(),
    ),
    "cut short after the start: kept as not replayable": (
        engine,
        post(),
        [
            READ,
            Step(Claim, HTTP_NEW),
            Step(RUN, Captured(200, [], b"ab", False, True, None)),
            Step(Complete, check=marked),
        ],
        Ends(),
    ),
    "too large to keep: kept as not replayable": (
        engine,
        post(),
        [READ, Step(Claim, HTTP_NEW), Step(RUN, done(200, None)), Step(Complete, check=marked)],
        Ends(),
    ),
    "an error after a complete response: stored, raised": (
        engine,
        post(),
        [
            READ,
            Step(Claim, HTTP_NEW),
            Step(RUN, done(201, error=RuntimeError("late"))),
            Step(Complete),
        ],
        Ends(raises=RuntimeError),
    ),
    "the driver failed before the app: released, raised": (
        engine,
        post(),
        [READ, Step(Claim, HTTP_NEW), Step(RUN, error=OSError("gone")), Step(Release)],
        Ends(raises=OSError),
    ),
    "store down: 503": (
        engine,
        post(),
        [READ, Step(Claim, error=DOWN), Step(Respond, check=problem("store-unavailable", 503))],
        Ends(),
    ),
    "store down, fail open: run unprotected": (
        lambda: engine(fail_open=True),
        post(),
        [READ, Step(Claim, error=DOWN), Step(RUN, done(), check=lambda op: op.fence is None)],
        Ends(),
    ),
    "a missing table never fails open": (
        lambda: engine(fail_open=True),
        post(),
        [
            READ,
            Step(Claim, error=SchemaMissing("no table")),
            Step(Respond, check=problem("store-unavailable", 503)),
        ],
        Ends(),
    ),
    "replay": (
        engine,
        post(),
        [
            READ,
            Step(Claim, Replay(STORED_201, 100.0)),
            Step(
                Respond,
                check=lambda op: (
                    op.response.status == 201
                    and (b"idempotent-replayed", b"true") in op.response.headers
                ),
            ),
        ],
        Ends(),
    ),
    "replay of a response that was not kept: 409": (
        engine,
        post(),
        [
            READ,
            Step(
                Claim,
                Replay(
                    Record(
                        "http:",
                        "d",
                        "completed",
                        "",
                        7,
                        None,
                        2e9,
                        1e9,
                        b'{"status": 200, "reason": "interrupted"}',
                        UNREPLAYABLE,
                    ),
                    100.0,
                ),
            ),
            Step(Respond, check=problem("response-not-replayable", 409)),
        ],
        Ends(),
    ),
    "mismatch: 422": (
        engine,
        post(),
        [
            READ,
            Step(Claim, Mismatch(100.0)),
            Step(Respond, check=problem("idempotency-key-mismatch", 422)),
        ],
        Ends(),
    ),
    "in flight, no waiting: 409": (
        engine,
        post(),
        [READ, Step(Claim, BUSY), Step(Respond, check=problem("request-in-flight", 409))],
        Ends(),
    ),
    "in flight, waiting: watch, then replay": (
        lambda: engine(wait=5),
        post(),
        [
            READ,
            Step(Claim, BUSY),
            Step(Watch, True),
            Step(Claim, Replay(STORED_201, 101.0)),
            Step(Respond),
        ],
        Ends(),
    ),
    "in flight, the watch meets a store error: 503": (
        lambda: engine(wait=5),
        post(),
        [
            READ,
            Step(Claim, BUSY),
            Step(Watch, error=DOWN),
            Step(Respond, check=problem("store-unavailable", 503)),
        ],
        Ends(),
    ),
    "the response never stored: handed to the background, never released": (
        engine,
        post(),
        [
            READ,
            Step(Claim, HTTP_NEW),
            Step(RUN, done()),
            Step(Complete, error=DOWN),
            Step(Sleep),
            Step(Complete, error=DOWN),
            Step(Sleep),
            Step(Complete, error=DOWN),
            Step(CompleteLater, check=lambda op: op.fence == 7),
        ],
        Ends(),
    ),
    "the key lost before the response was stored: logged": (
        engine,
        post(),
        [READ, Step(Claim, HTTP_NEW), Step(RUN, done()), Step(Complete, error=LeaseLost("gone"))],
        Ends(),
    ),
    "a release retried while the store is down": (
        lambda: engine(store_server_errors=False),
        post(),
        [
            READ,
            Step(Claim, HTTP_NEW),
            Step(RUN, done(503)),
            Step(Release, error=DOWN),
            Step(Sleep),
            Step(Release),
        ],
        Ends(),
    ),
    # -- one-time tokens
    "a guarded route without a token: 400": (
        guarded_engine,
        post("/pay", key=None),
        [READ, Step(Respond, check=problem("token-missing", 400))],
        Ends(),
    ),
    "token only: consume, run, keep it spent": (
        guarded_engine,
        post("/pay", key=None, oncely_token="tok"),
        [READ, Step(ConsumeToken, USE), Step(RUN, done(), check=lambda op: op.fence is None)],
        Ends(),
    ),
    "token only, the handler failed: the token stays spent": (
        guarded_engine,
        post("/pay", key=None, oncely_token="tok"),
        [READ, Step(ConsumeToken, USE), Step(RUN, done(503))],
        Ends(),
    ),
    "release-on-5xx, token only, the handler failed: the token is given back": (
        lambda: guarded_engine(store_server_errors=False),
        post("/pay", key=None, oncely_token="tok"),
        [READ, Step(ConsumeToken, USE), Step(RUN, done(503)), Step(ReleaseToken)],
        Ends(),
    ),
    "token only, reused: its problem": (
        guarded_engine,
        post("/pay", key=None, oncely_token="tok"),
        [
            READ,
            Step(ConsumeToken, error=TokenReused("used")),
            Step(Respond, check=problem("token-reused", 409)),
        ],
        Ends(),
    ),
    "token only, the driver failed: the token is given back": (
        guarded_engine,
        post("/pay", key=None, oncely_token="tok"),
        [READ, Step(ConsumeToken, USE), Step(RUN, error=OSError("gone")), Step(ReleaseToken)],
        Ends(raises=OSError),
    ),
    "key and token: the token refused releases the key": (
        guarded_engine,
        post("/pay", oncely_token="tok"),
        [
            READ,
            Step(Claim, HTTP_NEW),
            Step(ConsumeToken, error=TokenReused("used")),
            Step(Release),
            Step(Respond, check=problem("token-reused", 409)),
        ],
        Ends(),
    ),
    "key and token: a 5xx is stored, the token stays spent": (
        guarded_engine,
        post("/pay", oncely_token="tok"),
        [
            READ,
            Step(Claim, HTTP_NEW),
            Step(ConsumeToken, USE),
            Step(RUN, done(500)),
            Step(Complete, check=stored(500)),
        ],
        Ends(),
    ),
    "release-on-5xx, key and token: a 5xx releases both": (
        lambda: guarded_engine(store_server_errors=False),
        post("/pay", oncely_token="tok"),
        [
            READ,
            Step(Claim, HTTP_NEW),
            Step(ConsumeToken, USE),
            Step(RUN, done(500)),
            Step(Release),
            Step(ReleaseToken),
        ],
        Ends(),
    ),
    "the token endpoint refuses other methods": (
        guarded_engine,
        HttpRequest("PUT", "/tokens", b"purpose=pay", []),
        [Step(Respond, check=problem("method-not-allowed", 405))],
        Ends(),
    ),
    "the token endpoint needs a purpose": (
        guarded_engine,
        HttpRequest("GET", "/tokens", b"", []),
        [Step(Respond, check=problem("token-purpose-unknown", 400))],
        Ends(),
    ),
    "the token endpoint issues": (
        guarded_engine,
        HttpRequest("GET", "/tokens", b"purpose=pay", []),
        [Step(IssueToken, "tok"), Step(Respond, check=lambda op: op.response.status == 200)],
        Ends(),
    ),
    "the token endpoint with the store down: 503": (
        guarded_engine,
        HttpRequest("GET", "/tokens", b"purpose=pay", []),
        [Step(IssueToken, error=DOWN), Step(Respond, check=problem("store-unavailable", 503))],
        Ends(),
    ),
    "a route rule turns the key off": (
        lambda: engine(routes={"/free": Rule(enabled=False)}),
        post("/free"),
        [Step(type(PASS))],
        Ends(),
    ),
}


@pytest.mark.parametrize("case", list(HTTP_CASES))
def test_request_flow(case: str) -> None:
    make, request, script, end = HTTP_CASES[case]
    play(request_flow(make(), request), script, end)
