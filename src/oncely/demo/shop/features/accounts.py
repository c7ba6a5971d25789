"""Credit an account with ``If-Match`` on its version (source §3.3, optimistic locking;
:mod:`oncely.http.conditional` over :func:`oncely.sql.versioned_update`).

* ``GET /accounts/{account_id}`` -> ``200 {"account_id", "balance", "version"}`` with
  ``ETag: "<version>"``; ``404 account-not-found``.
* ``POST /accounts/{account_id}/credit`` ``{"amount"}`` with ``If-Match: "<version>"`` ->
  ``200 {"account_id", "balance", "version"}`` with the new ``ETag``; ``412
  precondition-failed`` (with ``current_etag``) when the account moved on since the client read
  it (RFC 9110 §13.1.1), ``428 precondition-required`` without ``If-Match`` (RFC 6585 §3),
  ``400 if-match-invalid`` for a malformed one.

Protected, the version from ``If-Match`` goes straight into ``versioned_update``: the one
``UPDATE ... WHERE version = :v`` decides, so two clients that read the same version cannot
both write (the loser gets 412, reads again and retries). An optional ``Idempotency-Key``
makes a retried credit replay its answer (412s are not stored, so the retry after a re-read
runs), and the credit's transaction records the key with :func:`oncely.sql.insert_once` so a
credit re-run after a crash applies nothing twice.

Unprotected, the handler reads the balance, works a moment (the shop's ``latency``) and writes
back what it computed, ignoring ``If-Match``: concurrent credits overwrite each other (lost
updates), and a duplicate credits twice.
"""

from __future__ import annotations

import asyncio
import uuid

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from oncely.demo.shop.db import Account
from oncely.demo.shop.features import Feature, Shop
from oncely.demo.shop.web import Problem, caller, integer, json_body, path_id
from oncely.errors import NotFound, PreconditionFailed, StaleVersion
from oncely.http import Rule
from oncely.http.conditional import etag, if_match

__all__ = ["CREDIT_PATHS", "feature", "is_credit_path"]

#: the middleware patterns of the credit route
CREDIT_PATHS = "/accounts/*/credit"


def is_credit_path(path: str) -> bool:
    """Whether ``path`` is ``/accounts/{id}/credit`` (the route that needs ``If-Match``)."""
    parts = path.split("/")
    return len(parts) == 4 and parts[1] == "accounts" and parts[3] == "credit" and bool(parts[2])


def _answer(account: Account) -> Response:
    return JSONResponse(
        {"account_id": account.id, "balance": account.balance, "version": account.version},
        headers={"ETag": etag(account.version)},
    )


def feature(shop: Shop) -> Feature:
    async def existing(account_id: str) -> Account:
        account = await shop.run(shop.db.account, account_id)
        if account is None:
            raise Problem(404, "account-not-found", "Unknown account", f"no account {account_id!r}")
        return account

    async def get(request: Request) -> Response:
        return _answer(await existing(path_id(request, "account_id")))

    async def credit(request: Request) -> Response:
        account_id = path_id(request, "account_id")
        amount = integer(await json_body(request), "amount")
        who = caller(request) or ""
        key = request.headers.get("idempotency-key")
        request_key = f"{who}/{key}" if key else f"anon/{uuid.uuid4().hex}"
        read = await existing(account_id)
        if not shop.protected:
            await asyncio.sleep(shop.settings.latency)  # the work between read and write
            return _answer(
                await shop.run(
                    shop.db.overwrite_balance,
                    account_id,
                    read.balance + amount,
                    request_key,
                    amount,
                )
            )
        condition = if_match(request)  # 428 / 400 (ConditionalMiddleware answers first)
        expected = condition.version
        if expected is None:  # '*' or a list of tags: check against the version read
            expected = condition.check(read.version, f"account {account_id!r}")
        try:
            return _answer(
                await shop.run(shop.db.credit, account_id, amount, expected, request_key)
            )
        except StaleVersion as exc:
            current = exc.current if isinstance(exc.current, int) else None
            raise PreconditionFailed(
                f"account {account_id!r} changed since version {expected}: GET it again and "
                "redo the credit with the new ETag",
                **({"current_etag": etag(current)} if current is not None else {}),
            ) from None
        except NotFound:
            raise Problem(
                404, "account-not-found", "Unknown account", f"no account {account_id!r}"
            ) from None

    return Feature(
        name="accounts",
        mechanism="oncely.http.conditional + oncely.sql.versioned_update",
        routes=[
            Route("/accounts/{account_id}", get, methods=["GET"]),
            Route("/accounts/{account_id}/credit", credit, methods=["POST"]),
        ],
        idempotent_paths=[CREDIT_PATHS],
        # A 412 is not stored: the client reads again and retries under the same key.
        rules={CREDIT_PATHS: Rule(required=False, store_client_errors=False)},
    )
