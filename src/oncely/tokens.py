"""One-time tokens (source §3.2): issued signed, consumed atomically exactly once, on any store.

The server hands out a token before a form or an API call; the operation that spends it runs
once, and a repeat (a double-submitted form, a replayed request) is refused::

    from oncely.tokens import Tokens

    tokens = Tokens(secret="at least sixteen bytes of secret", store="redis://localhost:6379/0")
    token = tokens.issue(subject="user-42", purpose="checkout", ttl=900)
    ...
    use = tokens.consume(token, subject="user-42", purpose="checkout")   # first time: fine
    tokens.consume(token, subject="user-42", purpose="checkout")         # TokenReused

Format: ``ot1.<payload>.<mac>`` (URL-safe base64, no padding). The payload holds its version
(2), 16 random bytes (the token id), the issue and expiry instants on the store's clock, keyed
tags of the subject and of the :class:`Tokens` ``scope`` it was issued under, and the purpose;
the MAC is HMAC-SHA256 over it. Issuing writes nothing: the store only learns about a token when
it is consumed.

A token is spent at most once whatever the consumer: its consumption is recorded under the
``scope`` of the :class:`Tokens` that consumes it, and only a :class:`Tokens` of the scope the
token was issued under accepts it (another scope's refuses it,
:class:`~oncely.errors.TokenForeign` with ``what == "scope"``). Tokens of the first format
(payload version 1, no scope in it) could be spent once per scope; they are refused
(:class:`~oncely.errors.TokenExpired`: ask for a new one).

:meth:`Tokens.consume` checks, in this order:

1. the signature (no store round trip for a forged token) -> :class:`~oncely.errors.TokenForged`;
   a version-1 token -> :class:`~oncely.errors.TokenExpired`;
2. scope, subject and purpose -> :class:`~oncely.errors.TokenForeign`;
3. one ``claim`` on the store, keyed by the token id: the claim marks the token used and tells
   in the same round trip whether it was used before, and returns the store's clock;
4. expiry against that clock -> :class:`~oncely.errors.TokenExpired`; a used token
   -> :class:`~oncely.errors.TokenReused`.

The claim's lease covers the token's whole lifetime, so a consumed token stays consumed until
it has expired anyway; :meth:`Tokens.release` gives a consumed token back (for example when the
operation it guarded failed, so that the user can submit the form again).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from oncely.core.records import ClaimOutcome, New, RecordKey
from oncely.core.text import MAX_SCOPE_BYTES, stored_text, utf8
from oncely.errors import (
    ConfigurationError,
    LeaseLost,
    TokenExpired,
    TokenForeign,
    TokenForged,
    TokenReused,
)
from oncely.settings import coerce, resolve
from oncely.stores import Store, configured_store, shared_store

__all__ = ["TokenClaims", "TokenUse", "Tokens"]

_PREFIX = "ot1."
#: The payload version: 2 binds the scope. Version 1 (no scope) is refused, see the module doc.
_VERSION = 2
_UNSCOPED_VERSION = 1
# version, id, issued_ms, expires_ms, subject tag, scope tag
_HEAD = struct.Struct(">B16sQQ12s12s")
_MAC_SIZE = 20
#: The longest purpose a token can carry, in UTF-8 bytes.
MAX_PURPOSE: Final = 200
#: Extra lease past the token's lifetime, so rounding never frees a token before it expires.
_LEASE_SLACK = 60.0


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass(frozen=True, slots=True)
class TokenUse:
    """A consumed token: pass it to :meth:`Tokens.release` to give the token back."""

    token_id: str
    purpose: str
    expires_at: float
    record_key: RecordKey
    fence: int


@dataclass(frozen=True, slots=True)
class TokenClaims:
    """What a verified token says (see :meth:`Tokens.verify`); times in epoch milliseconds."""

    token_id: bytes
    issued_ms: int
    expires_ms: int
    purpose: str

    @property
    def expires_at(self) -> float:
        return self.expires_ms / 1000

    @property
    def lease(self) -> float:
        return (self.expires_ms - self.issued_ms) / 1000 + _LEASE_SLACK


class Tokens:
    """Issue and consume one-time tokens bound to a subject (user, session) and a purpose.

    Arguments left ``None`` come from the environment, else their default
    (:mod:`oncely.settings`).

    :param secret: the signing key (at least 16 bytes), or a sequence of keys: the first signs,
        all verify (rotate by putting the new key first). ``$ONCELY_TOKEN_SECRET`` holds
        comma-separated keys; there is no default.
    :param store: a store URL or object; consumption is one ``claim`` on it. A URL is opened on
        first use, but its driver is checked now (``$ONCELY_STORE``, default
        ``sqlite:///oncely.db``).
    :param scope: the store scope under which consumed tokens are recorded
        (``$ONCELY_TOKEN_SCOPE``, default ``oncely-tokens``). It is bound into every token
        issued here: a :class:`Tokens` of another scope refuses the token
        (:class:`~oncely.errors.TokenForeign`, ``what == "scope"``), so no token can be spent
        once per scope. Changing the scope invalidates the tokens still outstanding.
    :param default_ttl: lifetime in seconds when :meth:`issue` gets none
        (``$ONCELY_TOKEN_TTL``, default 900).
    :raises ConfigurationError: no secret, a key shorter than 16 bytes, a non-positive
        ``default_ttl``, a scope holding a NUL character or a lone surrogate, or a store URL
        that is unknown or whose extra is not installed.
    """

    def __init__(
        self,
        secret: str | bytes | Sequence[str | bytes] | None = None,
        store: str | Store | None = None,
        *,
        scope: str | None = None,
        default_ttl: float | str | None = None,
    ) -> None:
        where = "Tokens"
        secret = resolve("token_secret", secret, where=where, param="secret")
        keys = [secret] if isinstance(secret, (str, bytes)) else list(secret)
        if not keys:
            raise ConfigurationError("Tokens(secret=...) needs at least one key")
        self._keys: list[bytes] = []
        for key in keys:
            if isinstance(key, str):
                raw = utf8(key, "a token secret", ConfigurationError)
            else:
                raw = bytes(key)
            if len(raw) < 16:
                raise ConfigurationError(
                    "a token secret must have at least 16 bytes; generate one with "
                    "python -c 'import secrets; print(secrets.token_urlsafe(32))'"
                )
            self._keys.append(raw)
        store = configured_store(store, where)
        self._store_spec = store
        self._store: Store | None = store if isinstance(store, Store) else None
        self.scope: str = stored_text(
            resolve("token_scope", scope, where=where, param="scope"),
            "scope",
            ConfigurationError,
            MAX_SCOPE_BYTES,
        )
        self.default_ttl: float = resolve(
            "token_ttl", default_ttl, where=where, param="default_ttl"
        )

    @property
    def store(self) -> Store:
        if self._store is None:
            self._store = shared_store(self._store_spec)
        return self._store

    # -- signing -----------------------------------------------------------------------------------
    @staticmethod
    def _subject_tag(key: bytes, subject: str) -> bytes:
        return hmac.new(key, b"subject\x00" + subject.encode("utf-8"), hashlib.sha256).digest()[:12]

    @staticmethod
    def _scope_tag(key: bytes, scope: str) -> bytes:
        return hmac.new(key, b"scope\x00" + scope.encode("utf-8"), hashlib.sha256).digest()[:12]

    @staticmethod
    def _mac(key: bytes, payload: bytes) -> bytes:
        return hmac.new(key, b"oncely-token\x00" + payload, hashlib.sha256).digest()[:_MAC_SIZE]

    def _sign(self, subject: str, purpose: str, now: float, ttl: float | str | None) -> str:
        life = self.default_ttl if ttl is None else coerce("token_ttl", ttl, param="ttl")
        _check_text(subject, "subject")
        _check_text(purpose, "purpose")
        if len(purpose.encode("utf-8")) > MAX_PURPOSE:
            raise ConfigurationError(f"purpose is longer than {MAX_PURPOSE} bytes")
        key = self._keys[0]
        issued_ms = int(now * 1000)
        payload = _HEAD.pack(
            _VERSION,
            secrets.token_bytes(16),
            issued_ms,
            issued_ms + int(life * 1000),
            self._subject_tag(key, subject),
            self._scope_tag(key, self.scope),
        ) + purpose.encode("utf-8")
        return f"{_PREFIX}{_b64(payload)}.{_b64(self._mac(key, payload))}"

    def verify(self, token: str, subject: str, purpose: str) -> TokenClaims:
        """Check signature, scope, subject and purpose without asking the store (no expiry
        check).

        :raises TokenForged: ``token`` is not a token signed with one of the keys.
        :raises TokenExpired: it is a genuine token of the first format (payload version 1,
            issued before the scope was bound into tokens): refused, ask for a new one.
        :raises TokenForeign: it was issued under another :attr:`scope` (``what`` is
            ``"scope"``), to another subject (``"subject"``) or for another purpose
            (``"purpose"``).
        :raises ConfigurationError: ``subject`` or ``purpose`` is not a ``str`` or holds a NUL
            character or a lone surrogate, or ``purpose`` is empty.
        """
        _check_text(subject, "subject")
        _check_text(purpose, "purpose")
        if not isinstance(token, str) or not token.startswith(_PREFIX) or len(token) > 1024:
            raise TokenForged("not a oncely token (it must start with 'ot1.')")
        try:
            body, _, mac_text = token[len(_PREFIX) :].partition(".")
            payload, mac = _unb64(body), _unb64(mac_text)
        except (binascii.Error, ValueError) as exc:
            raise TokenForged("the token is not valid base64") from exc
        if not payload or len(mac) != _MAC_SIZE:
            raise TokenForged("the token has the wrong length")
        for key in self._keys:
            if hmac.compare_digest(self._mac(key, payload), mac):
                break
        else:
            raise TokenForged("the token's signature does not verify; it was not issued here")
        if payload[0] == _UNSCOPED_VERSION:
            # Genuine, but its payload binds no scope: it could be spent once under every
            # scope (its consumption is recorded per scope). Fail closed: never accepted.
            raise TokenExpired(
                "the token was issued by an older oncely version (its format binds no scope) "
                "and is no longer accepted; ask for a new one"
            )
        if payload[0] != _VERSION:
            raise TokenForged(f"unknown token version {payload[0]}")
        if len(payload) < _HEAD.size:
            raise TokenForged("the token has the wrong length")
        _, token_id, issued_ms, expires_ms, tag, scope_tag = _HEAD.unpack_from(payload)
        try:
            token_purpose = payload[_HEAD.size :].decode("utf-8")
        except UnicodeDecodeError as exc:  # pragma: no cover - signed payloads are ours
            raise TokenForged("the token's purpose is not UTF-8") from exc
        if not hmac.compare_digest(scope_tag, self._scope_tag(key, self.scope)):
            raise TokenForeign(
                "the token was issued under another token scope than this consumer's", "scope"
            )
        if not hmac.compare_digest(tag, self._subject_tag(key, subject)):
            raise TokenForeign("the token was issued to another subject", "subject")
        if token_purpose != purpose:
            raise TokenForeign(
                f"the token was issued for purpose {token_purpose!r}, not {purpose!r}", "purpose"
            )
        return TokenClaims(token_id, issued_ms, expires_ms, token_purpose)

    def _record_key(self, parsed: TokenClaims) -> RecordKey:
        return RecordKey(self.scope, hashlib.sha256(parsed.token_id).hexdigest())

    def _judge(self, parsed: TokenClaims, key: RecordKey, outcome: ClaimOutcome) -> TokenUse:
        if outcome.now * 1000 >= parsed.expires_ms:
            raise TokenExpired("the token has expired; ask for a new one")
        if not isinstance(outcome, New):
            raise TokenReused("the token was already used; this operation has already happened")
        return TokenUse(
            parsed.token_id.hex(), parsed.purpose, parsed.expires_ms / 1000, key, outcome.fence
        )

    # -- sync face ---------------------------------------------------------------------------------
    def issue(self, subject: str, purpose: str, ttl: float | str | None = None) -> str:
        """A new token for ``subject`` and ``purpose``, valid ``ttl`` seconds on the store clock
        (default :attr:`default_ttl`).

        :raises ConfigurationError: ``ttl`` not positive seconds, a non-string subject or
            purpose, one holding a NUL character or a lone surrogate, an empty purpose, or a
            purpose over 200 bytes. The empty subject ``""`` is allowed and means *no client*:
            anyone consuming with ``subject=""`` may spend the token (what
            ``TokenGuard(subject=GLOBAL)`` does).
        """
        return self._sign(subject, purpose, self.store.now(), ttl)

    def consume(self, token: str, subject: str, purpose: str) -> TokenUse:
        """Spend ``token`` once (one store round trip); raise a :class:`TokenError` subclass.

        :raises ConfigurationError: ``subject`` or ``purpose`` as for :meth:`verify`.
        """
        parsed = self.verify(token, subject, purpose)
        key = self._record_key(parsed)
        return self._judge(parsed, key, self.store.claim(key, "", parsed.lease, parsed.lease))

    def release(self, use: TokenUse) -> bool:
        """Give a consumed token back so it can be used again; False if it was not held any more."""
        try:
            self.store.release(use.record_key, use.fence)
        except LeaseLost:
            return False
        return True

    # -- async face --------------------------------------------------------------------------------
    async def aissue(self, subject: str, purpose: str, ttl: float | str | None = None) -> str:
        """The async face of :meth:`issue`."""
        return self._sign(subject, purpose, await self.store.anow(), ttl)

    async def aconsume(self, token: str, subject: str, purpose: str) -> TokenUse:
        parsed = self.verify(token, subject, purpose)
        key = self._record_key(parsed)
        outcome = await self.store.aclaim(key, "", parsed.lease, parsed.lease)
        return self._judge(parsed, key, outcome)

    async def arelease(self, use: TokenUse) -> bool:
        try:
            await self.store.arelease(use.record_key, use.fence)
        except LeaseLost:
            return False
        return True


def _check_text(value: str, what: str) -> None:
    """Refuse a subject or purpose that is not a ``str`` or has no exact UTF-8 form (a NUL
    character or a lone surrogate, see :mod:`oncely.core.text`) with ConfigurationError."""
    if not isinstance(value, str):
        raise ConfigurationError(f"token {what} must be a string, not {type(value).__name__}")
    if not value and what == "purpose":
        # A purpose names what the token allows; "" would be a purpose every caller that
        # forgot to name one shares. The empty subject is meaningful: no client (GLOBAL).
        raise ConfigurationError(
            "token purpose is empty; name what the token allows, e.g. purpose='checkout'"
        )
    stored_text(value, f"token {what}", ConfigurationError)
