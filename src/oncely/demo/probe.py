"""``oncely probe URL``: check an API that claims ``Idempotency-Key`` support against
draft-ietf-httpapi-idempotency-key-header-06, from the outside, with real requests.

Each check names the draft section it comes from (§2.1 Syntax, §2.6 Idempotency Enforcement,
§2.7 Error Scenarios, §5 Security Considerations) or the common practice it follows:

* the first request is processed; an identical retry gets the same response, marked
  ``Idempotent-Replayed: true``; a changed body under the same key gets 422;
* concurrent duplicates: at most one runs, the others get 409 (or, if they arrive after it
  finished, the replay);
* a missing key gets 400 (when the endpoint requires one), a malformed key 400;
* error answers are ``application/problem+json`` (RFC 9457);
* no replay across credentials: the same key sent with other credentials is not answered
  with the first caller's stored response;
* a ``Set-Cookie`` of the first response is not replayed;
* a failed request never leaves its key stuck: after a client that gave up mid-request, and
  (with ``fail_header``) after a handler that failed, a retry with the same key gets an answer
  other than 409 within ``stuck_after`` seconds (the failure replayed, or a fresh run).

Every request uses a fresh random key, so probing never collides with real traffic; it does
create a few resources (orders) on the target.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from oncely.demo.client import Http, TransportError

__all__ = ["Check", "ProbeConfig", "probe", "probe_async"]

PASS, FAIL, SKIP = "pass", "fail", "skip"


@dataclass
class ProbeConfig:
    url: str
    path: str = "/orders"
    method: str = "POST"
    #: JSON body; ``$CUSTOMER`` is replaced by the credential's subject (after ``Bearer``)
    body: str = '{"sku": "sku-1", "qty": 1, "customer": "$CUSTOMER"}'
    credentials: Sequence[str] = ("Bearer probe-alice", "Bearer probe-bob")
    #: an extra ``Name: value`` header that makes the target's handler fail (optional)
    fail_header: str | None = "Demo-Fault: raise"
    key_required: bool = True
    concurrency: int = 16
    stuck_after: float = 15.0
    timeout: float = 10.0


@dataclass
class Check:
    name: str
    section: str
    outcome: str = SKIP
    detail: str = ""

    def to_json(self) -> dict[str, str]:
        return {"check": self.name, "section": self.section, "outcome": self.outcome,
                "detail": self.detail}  # fmt: skip


@dataclass
class _Reply:
    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    cookies: list[str] = field(default_factory=list)

    @property
    def replayed(self) -> bool:
        return self.headers.get("idempotent-replayed", "").lower() == "true"

    @property
    def problem(self) -> bool:
        return "application/problem+json" in self.headers.get("content-type", "")


class _Prober:
    def __init__(self, config: ProbeConfig, http: Http) -> None:
        self.config = config
        self.http = http

    def body(self, credential: str, change: bool = False) -> bytes:
        subject = credential.split(" ", 1)[-1]
        text = self.config.body.replace("$CUSTOMER", subject)
        if change:
            data = json.loads(text)
            if isinstance(data, dict):
                data["oncely_probe_changed"] = secrets.token_hex(4)
                for name, value in data.items():
                    if isinstance(value, int) and not isinstance(value, bool):
                        data[name] = value + 1
                        del data["oncely_probe_changed"]
                        break
            text = json.dumps(data)
        return text.encode()

    async def send(
        self,
        key: str | None,
        credential: str | None = None,
        *,
        change: bool = False,
        raw_key: str | None = None,
        extra: dict[str, str] | None = None,
        timeout: float | None = None,
    ) -> _Reply:
        credential = credential or self.config.credentials[0]
        headers = {"Content-Type": "application/json", "Authorization": credential}
        if key is not None:
            headers["Idempotency-Key"] = f'"{key}"'
        if raw_key is not None:
            headers["Idempotency-Key"] = raw_key
        headers.update(extra or {})
        for attempt in range(3 if timeout is None else 1):
            try:
                response = await self.http.request(
                    self.config.method,
                    self.config.path,
                    content=self.body(credential, change),
                    headers=headers,
                    timeout=timeout or self.config.timeout,
                )
                break
            except TransportError:  # e.g. a kept-alive connection the server closed
                if attempt == 2 or timeout is not None:
                    raise
                await asyncio.sleep(0.1)
        return _Reply(
            response.status,
            response.body,
            {str(k).lower(): str(v) for k, v in response.headers.items()},
            response.header_list("set-cookie"),
        )

    async def eventually(self, key: str) -> _Reply:
        """Retry ``key`` until the answer is not 409, or ``stuck_after`` seconds."""
        deadline = time.monotonic() + self.config.stuck_after
        reply = await self.send(key)
        while reply.status == 409 and time.monotonic() < deadline:
            await asyncio.sleep(0.25)
            reply = await self.send(key)
        return reply


def _key() -> str:
    return f"probe-{secrets.token_hex(12)}"


async def probe_async(config: ProbeConfig) -> list[Check]:
    """Run every check against ``config.url``; see the module docstring."""
    checks = {
        c.name: c
        for c in [
            Check("first request is processed", "§2.6 Idempotency Enforcement"),
            Check("identical retry gets the stored response", "§2.6 Idempotency Enforcement"),
            Check("replay marked Idempotent-Replayed: true", "practice (Stripe, IETF list)"),
            Check("changed body under the same key: 422", "§2.7 Error Scenarios"),
            Check("concurrent duplicate: 409, runs once", "§2.7 Error Scenarios"),
            Check("missing key where required: 400", "§2.7 Error Scenarios"),
            Check("malformed key: 400", "§2.1 Syntax, §2.7"),
            Check("errors are application/problem+json", "§2.7 (RFC 9457)"),
            Check("no replay across credentials", "§5 Security Considerations"),
            Check("Set-Cookie is not replayed", "§5 Security Considerations"),
            Check("client gone mid-request: key not stuck", "§2.6 (practice)"),
            Check("failed handler: key not stuck", "§2.6 (practice)"),
        ]
    }

    def verdict(name: str, ok: bool | None, detail: str) -> None:
        checks[name].outcome = SKIP if ok is None else PASS if ok else FAIL
        checks[name].detail = detail

    async with Http(config.url, 4 * config.concurrency) as http:
        p = _Prober(config, http)
        problems: list[_Reply] = []
        key = _key()
        first = await p.send(key)
        verdict("first request is processed", 200 <= first.status < 300, f"{first.status}")
        if not 200 <= first.status < 300:
            for c in checks.values():
                if c.outcome == SKIP and not c.detail:
                    c.detail = "the first request failed; nothing to compare"
            return list(checks.values())

        again = await p.send(key)
        same = again.status == first.status and again.body == first.body
        verdict(
            "identical retry gets the stored response",
            same,
            f"{again.status}, body {'identical' if again.body == first.body else 'differs'}",
        )
        verdict(
            "replay marked Idempotent-Replayed: true",
            again.replayed,
            f"header {'present' if again.replayed else 'absent'}",
        )
        if first.cookies:
            verdict(
                "Set-Cookie is not replayed",
                not again.cookies,
                "replayed " + "; ".join(again.cookies) if again.cookies else "not replayed",
            )
        else:
            verdict("Set-Cookie is not replayed", None, "the first response set no cookie")

        changed = await p.send(key, change=True)
        problems.append(changed)
        verdict("changed body under the same key: 422", changed.status == 422, f"{changed.status}")

        # Up to 3 rounds with fresh keys: a fast handler may finish before its duplicates land.
        for _ in range(3):
            concurrent_key = _key()
            # Open the connections first, so the duplicates leave together and overlap.
            await asyncio.gather(
                *(http.get(config.path, timeout=config.timeout) for _ in range(config.concurrency)),
                return_exceptions=True,
            )
            replies = await asyncio.gather(
                *(p.send(concurrent_key) for _ in range(config.concurrency))
            )
            runs = [r for r in replies if 200 <= r.status < 300 and not r.replayed]
            conflicts = [r for r in replies if r.status == 409]
            problems.extend(conflicts)
            statuses = ", ".join(f"{s} x{n}" for s, n in _count(r.status for r in replies))
            if len(runs) > 1 and len({r.body for r in runs}) > 1:
                verdict(
                    "concurrent duplicate: 409, runs once",
                    False,
                    f"ran {len(runs)} times ({statuses})",
                )
                break
            # Every duplicate is the run, its replay or a 409: any other answer (a 5xx, a 422)
            # is an error, not the draft's conflict, and none running at all is no pass either.
            odd = [r for r in replies if r.status != 409 and not 200 <= r.status < 300]
            if odd or not runs:
                verdict(
                    "concurrent duplicate: 409, runs once",
                    False,
                    f"{'none ran' if not runs else 'answers other than 2xx/409'} ({statuses})",
                )
                break
            if conflicts:
                verdict("concurrent duplicate: 409, runs once", True, statuses)
                break
            verdict(
                "concurrent duplicate: 409, runs once",
                None,
                f"no overlap observed in 3 rounds ({statuses})",
            )

        missing = await p.send(None)
        problems.append(missing)
        if config.key_required:
            verdict("missing key where required: 400", missing.status == 400, f"{missing.status}")
        else:
            verdict("missing key where required: 400", None, "the endpoint does not require one")

        bad = [await p.send(None, raw_key=raw) for raw in ('"unterminated', '"a", "b"', "?1")]
        problems.extend(bad)
        verdict(
            "malformed key: 400",
            all(r.status == 400 for r in bad),
            ", ".join(str(r.status) for r in bad),
        )

        errors = [r for r in problems if 400 <= r.status < 500]
        if errors:
            plain = [r.status for r in errors if not r.problem]
            verdict(
                "errors are application/problem+json",
                not plain,
                f"{len(errors) - len(plain)}/{len(errors)} problem+json",
            )
        else:
            verdict("errors are application/problem+json", None, "no error answer seen")

        if len(config.credentials) > 1:
            # The second credential's request (its own body) must run on its own: a replay
            # leaks the first caller's response, and a 422/409 is just as much evidence that
            # the two credentials share one key space (B collided with A's key).
            other = await p.send(key, config.credentials[1])
            seen = f"{other.status}{' replayed' if other.replayed else ''}"
            leaked = other.replayed or (other.body == first.body and other.status == first.status)
            if leaked:
                verdict(
                    "no replay across credentials",
                    False,
                    f"{seen}: the other credential got the first caller's stored response",
                )
            elif other.status in (409, 422):
                verdict(
                    "no replay across credentials",
                    False,
                    f"{seen}: the other credential's request was refused because of the first "
                    "caller's key, so all credentials share one key space",
                )
            elif other.status in (401, 403):
                verdict(
                    "no replay across credentials",
                    None,
                    f"{seen}: the target refused the second credential; give one it accepts",
                )
            else:
                verdict(
                    "no replay across credentials",
                    200 <= other.status < 300,
                    seen if 200 <= other.status < 300 else f"{seen}: expected its own 2xx run",
                )
        else:
            verdict("no replay across credentials", None, "give two credentials")

        gone_key = _key()
        with contextlib.suppress(TransportError):
            await p.send(gone_key, timeout=0.002)
        after = await p.eventually(gone_key)
        # Not stuck means answered: the run the client left (replayed) or a fresh one, a 2xx.
        # A 409 is the key stuck; any other error (422, 5xx) is no answer to the retry either.
        verdict(
            "client gone mid-request: key not stuck",
            200 <= after.status < 300,
            f"retry answered {after.status}{' replayed' if after.replayed else ''}",
        )

        if config.fail_header:
            name, _, value = config.fail_header.partition(":")
            fail_key = _key()
            failed = await p.send(fail_key, extra={name.strip(): value.strip()})
            if failed.status < 500:
                verdict(
                    "failed handler: key not stuck",
                    None,
                    f"the fault header did not fail the handler ({failed.status})",
                )
            else:
                retry = await p.eventually(fail_key)
                # Not stuck: the failure kept and replayed (the default: the handler may have
                # had effects, so it must not run again), or the key released and run again.
                ok = retry.status != 409 and (retry.replayed or 200 <= retry.status < 300)
                verdict(
                    "failed handler: key not stuck",
                    ok,
                    f"{failed.status}, then the retry got {retry.status}"
                    f"{' replayed' if retry.replayed else ''}",
                )
        else:
            verdict("failed handler: key not stuck", None, "no fail header given")
    return list(checks.values())


def _count(values: Any) -> list[tuple[int, int]]:
    counts: dict[int, int] = {}
    for v in values:
        counts[v] = counts.get(v, 0) + 1
    return sorted(counts.items())


def probe(config: ProbeConfig) -> list[Check]:
    return asyncio.run(probe_async(config))
