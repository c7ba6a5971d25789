"""One-time tokens (source §3.2) on every store: issue, consume once, typed refusals."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import secrets
import struct
import threading
import time
import uuid

import pytest

from oncely.core.records import InFlight, Replay
from oncely.errors import (
    ConfigurationError,
    TokenError,
    TokenExpired,
    TokenForeign,
    TokenForged,
    TokenReused,
)
from oncely.stores import Store
from oncely.tokens import Tokens

from conftest import StoreFactory

SECRET = "test-secret-" + "x" * 20


def tokens_on(store: Store, **options: object) -> Tokens:
    return Tokens(SECRET, store, scope=f"tok-{uuid.uuid4().hex[:8]}", **options)  # type: ignore[arg-type]


def test_a_token_is_consumed_once(store: Store) -> None:
    tokens = tokens_on(store)
    token = tokens.issue("user-1", "checkout", ttl=60)
    use = tokens.consume(token, "user-1", "checkout")
    assert use.purpose == "checkout" and use.expires_at > time.time()
    with pytest.raises(TokenReused):
        tokens.consume(token, "user-1", "checkout")


async def test_async_face(store: Store) -> None:
    tokens = tokens_on(store)
    token = await tokens.aissue("user-1", "checkout", ttl=60)
    await tokens.aconsume(token, "user-1", "checkout")
    with pytest.raises(TokenReused):
        await tokens.aconsume(token, "user-1", "checkout")


def test_consume_is_one_claim_whose_outcome_tells_reuse(store: Store) -> None:
    tokens = tokens_on(store)
    token = tokens.issue("u", "p", ttl=60)
    use = tokens.consume(token, "u", "p")
    # the record of a consumed token is a live claim on the store (no second write needed)
    outcome = store.claim(use.record_key, "", 1.0, 1.0)
    assert isinstance(outcome, (InFlight, Replay))


def test_tokens_are_unguessable_and_distinct(store: Store) -> None:
    tokens = tokens_on(store)
    issued = {tokens.issue("u", "p") for _ in range(200)}
    assert len(issued) == 200
    assert all(t.startswith("ot1.") and len(t) > 60 for t in issued)


def test_expired_tokens_are_refused_by_the_store_clock(store: Store) -> None:
    tokens = tokens_on(store)
    token = tokens.issue("u", "p", ttl=0.2)
    time.sleep(0.3)
    with pytest.raises(TokenExpired):
        tokens.consume(token, "u", "p")


@pytest.mark.parametrize(
    "mangle",
    [
        lambda t: t[:-2] + ("AA" if t[-2:] != "AA" else "BB"),  # signature
        lambda t: t.replace("ot1.", "ot1.A", 1),  # payload
        lambda t: "ot2" + t[3:],
        lambda t: "",
        lambda t: "ot1.",
        lambda t: "ot1.!!!.???",
        lambda t: "not a token at all",
        lambda t: t + "." + t,
    ],
)
def test_forged_tokens_are_refused_before_the_store_is_asked(mangle: object) -> None:
    # a store that cannot be reached: if consume() asked it, this would be StoreUnavailable
    tokens = Tokens(SECRET, "redis://127.0.0.1:1/0")
    good = Tokens(SECRET, "memory://").issue("u", "p")
    with pytest.raises(TokenForged):
        tokens.consume(mangle(good), "u", "p")  # type: ignore[operator]


def test_a_token_signed_with_another_secret_is_forged(store: Store) -> None:
    other = Tokens("another-secret-" + "y" * 20, store)
    with pytest.raises(TokenForged):
        tokens_on(store).consume(other.issue("u", "p"), "u", "p")


def test_foreign_subject_and_purpose_are_refused(store: Store) -> None:
    tokens = tokens_on(store)
    token = tokens.issue("alice", "checkout")
    with pytest.raises(TokenForeign) as subject:
        tokens.consume(token, "mallory", "checkout")
    assert subject.value.what == "subject"
    with pytest.raises(TokenForeign) as purpose:
        tokens.consume(token, "alice", "delete-account")
    assert purpose.value.what == "purpose"
    # refused tokens were not spent
    tokens.consume(token, "alice", "checkout")


def test_errors_are_typed_and_distinct() -> None:
    kinds = [TokenReused, TokenExpired, TokenForged, TokenForeign]
    assert all(issubclass(k, TokenError) for k in kinds)
    assert len(set(kinds)) == 4


def test_release_gives_a_token_back(store: Store) -> None:
    tokens = tokens_on(store)
    token = tokens.issue("u", "p")
    use = tokens.consume(token, "u", "p")
    assert tokens.release(use)
    assert tokens.release(use)  # given back again (a repeat after a lost reply): still fine
    again = tokens.consume(token, "u", "p")
    assert not tokens.release(use)  # the token is someone else's use now
    assert tokens.release(again)


def test_secret_rotation(store: Store) -> None:
    old = Tokens("old-secret-" + "o" * 20, store, scope="rot")
    token = old.issue("u", "p")
    rotated = Tokens(["new-secret-" + "n" * 20, "old-secret-" + "o" * 20], store, scope="rot")
    rotated.consume(token, "u", "p")
    new_token = rotated.issue("u", "p")
    with pytest.raises(TokenForged):
        old.consume(new_token, "u", "p")


def test_configuration_errors() -> None:
    with pytest.raises(ConfigurationError):
        Tokens("short", "memory://")
    with pytest.raises(ConfigurationError):
        Tokens([], "memory://")
    with pytest.raises(ConfigurationError):
        Tokens(SECRET, "memory://").issue("u", "p", ttl=0)


def test_threads_racing_for_one_token_consume_it_once(store: Store) -> None:
    tokens = tokens_on(store)
    token = tokens.issue("u", "p", ttl=60)
    results: list[str] = []
    barrier = threading.Barrier(16)

    def spend() -> None:
        barrier.wait()
        try:
            tokens.consume(token, "u", "p")
            results.append("ok")
        except TokenReused:
            results.append("reused")

    threads = [threading.Thread(target=spend) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(results) == ["ok"] + ["reused"] * 15


async def test_tasks_racing_for_one_token_consume_it_once(store: Store) -> None:
    tokens = tokens_on(store)
    token = await tokens.aissue("u", "p", ttl=60)

    async def spend() -> str:
        try:
            await tokens.aconsume(token, "u", "p")
            return "ok"
        except TokenReused:
            return "reused"

    results = await asyncio.gather(*[spend() for _ in range(16)])
    assert sorted(results) == ["ok"] + ["reused"] * 15


def test_processes_share_consumption_through_the_store(make_store: StoreFactory) -> None:
    """Two independent Tokens objects (as in two processes) on one shared store."""
    store, url, options = make_store("redis")
    from oncely.stores import open_store

    other_store = open_store(url, **options)
    try:
        a = Tokens(SECRET, store, scope="shared")
        b = Tokens(SECRET, other_store, scope="shared")
        token = a.issue("u", "p")
        b.consume(token, "u", "p")
        with pytest.raises(TokenReused):
            a.consume(token, "u", "p")
    finally:
        other_store.close()


@pytest.mark.parametrize("scope", ["tok\x00x", "tok\ud800"])
def test_a_scope_no_store_keeps_as_text_is_refused_when_configured(scope: str) -> None:
    # Before: accepted here, then each consume() raised (PostgreSQL) or shared a cut scope.
    with pytest.raises(ConfigurationError, match="scope"):
        Tokens(SECRET, "memory://", scope=scope)


@pytest.mark.parametrize("text", ["u\ud800", "u\x00v"])
def test_a_subject_or_purpose_without_an_exact_utf8_form_is_a_configuration_error(
    text: str,
) -> None:
    # Before: a lone surrogate raised a raw UnicodeEncodeError from issue() and consume().
    tokens = Tokens(SECRET, "memory://")
    token = tokens.issue("u", "p", ttl=60)
    for call in (
        lambda: tokens.issue(text, "p"),
        lambda: tokens.issue("u", text),
        lambda: tokens.consume(token, text, "p"),
        lambda: tokens.consume(token, "u", text),
    ):
        with pytest.raises(ConfigurationError, match=r"token (subject|purpose)"):
            call()
    assert tokens.consume(token, "u", "p").purpose == "p"  # the refusals spent nothing


def test_a_secret_with_a_lone_surrogate_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError, match="lone surrogate"):
        Tokens("s\udc80" * 16, "memory://")


def test_an_empty_purpose_is_refused_and_an_empty_subject_means_no_client() -> None:
    """Red team round 8: ``purpose=""`` was accepted while key parts refuse ``""``. A purpose
    names what the token allows, so it must be named; the empty subject is documented as a
    token bound to no client (what ``TokenGuard(subject=GLOBAL)`` issues)."""
    tokens = Tokens(SECRET, "memory://")
    token = tokens.issue("u", "p", ttl=60)
    for call in (
        lambda: tokens.issue("u", ""),
        lambda: tokens.consume(token, "u", ""),
        lambda: asyncio.run(tokens.aissue("u", "")),
    ):
        with pytest.raises(ConfigurationError, match="token purpose is empty"):
            call()
    assert tokens.consume(token, "u", "p").purpose == "p"  # the refusals spent nothing
    unbound = tokens.issue("", "p", ttl=60)
    with pytest.raises(TokenForeign):
        tokens.consume(unbound, "u", "p")
    assert tokens.consume(unbound, "", "p").purpose == "p"


def test_a_token_guard_route_without_a_purpose_is_refused() -> None:
    from oncely.http import TokenGuard

    with pytest.raises(ConfigurationError, match="routes"):
        TokenGuard(tokens=Tokens(SECRET, "memory://"), routes={"/checkout": ""})


def test_a_token_is_spent_at_most_once_whatever_the_consumers_scope(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """rt11: the scope was not in the signed token. Two Tokens with the same secret and store
    but another ``scope=`` (or ``$ONCELY_TOKEN_SCOPE``: a config change, two services) each
    accepted the same token once: it was spent twice. The scope is bound into the token now: a
    consumer of another scope refuses it (TokenForeign, what 'scope') and spends nothing."""
    run = uuid.uuid4().hex[:8]
    a = Tokens(SECRET, store, scope=f"tok-a-{run}")
    b = Tokens(SECRET, store, scope=f"tok-b-{run}")
    monkeypatch.setenv("ONCELY_TOKEN_SCOPE", f"tok-env-{run}")
    env = Tokens(SECRET, store)
    token = a.issue("user-42", "checkout", ttl=60)
    for other in (b, env):
        with pytest.raises(TokenForeign) as info:
            other.consume(token, "user-42", "checkout")
        assert info.value.what == "scope" and "tok-a" not in str(info.value)
    a.consume(token, "user-42", "checkout")
    for other in (b, env):  # after the spend too: refused as foreign, never a second spend
        with pytest.raises(TokenForeign):
            other.consume(token, "user-42", "checkout")
    with pytest.raises(TokenReused):
        a.consume(token, "user-42", "checkout")
    # and the other way round; the environment's scope is bound like an explicit one
    mine = env.issue("user-42", "checkout", ttl=60)
    with pytest.raises(TokenForeign):
        a.consume(mine, "user-42", "checkout")
    env.consume(mine, "user-42", "checkout")


async def test_async_consume_refuses_a_token_of_another_scope(store: Store) -> None:
    run = uuid.uuid4().hex[:8]
    a = Tokens(SECRET, store, scope=f"tok-a-{run}")
    b = Tokens(SECRET, store, scope=f"tok-b-{run}")
    token = await a.aissue("u", "p", ttl=60)
    with pytest.raises(TokenForeign):
        await b.aconsume(token, "u", "p")
    await a.aconsume(token, "u", "p")
    with pytest.raises(TokenForeign):
        await b.aconsume(token, "u", "p")


def _first_format_token(secret: str, subject: str, purpose: str, now_ms: int) -> str:
    """A token as oncely issued it before the scope was bound (payload version 1: version, id,
    issued_ms, expires_ms, subject tag, purpose), signed with ``secret``."""
    key = secret.encode()
    tag = hmac.new(key, b"subject\x00" + subject.encode(), hashlib.sha256).digest()[:12]
    head = struct.pack(">B16sQQ12s", 1, secrets.token_bytes(16), now_ms, now_ms + 600_000, tag)
    payload = head + purpose.encode()
    mac = hmac.new(key, b"oncely-token\x00" + payload, hashlib.sha256).digest()[:20]

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    return f"ot1.{b64(payload)}.{b64(mac)}"


def test_tokens_of_the_unscoped_format_are_refused(store: Store) -> None:
    """Tokens issued before the upgrade bind no scope: accepted, they could still be spent once
    per scope. They are refused (TokenExpired: ask for a new one), under every scope, before
    the store is asked, while a forged one stays TokenForged."""
    token = _first_format_token(SECRET, "u", "p", int(store.now() * 1000))
    for scope in ("oncely-tokens", f"tok-{uuid.uuid4().hex[:8]}"):
        tokens = Tokens(SECRET, store, scope=scope)
        with pytest.raises(TokenExpired, match="older oncely"):
            tokens.consume(token, "u", "p")
        with pytest.raises(TokenExpired, match="older oncely"):
            tokens.verify(token, "u", "p")
    unreachable = Tokens(SECRET, "redis://127.0.0.1:1/0")  # refused without a round trip
    with pytest.raises(TokenExpired):
        unreachable.consume(token, "u", "p")
    forged = _first_format_token("another-secret-" + "y" * 20, "u", "p", 0)
    with pytest.raises(TokenForged):
        unreachable.consume(forged, "u", "p")
