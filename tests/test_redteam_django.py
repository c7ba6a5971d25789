"""Red-team item A3 on Django's async middleware: a request task cancelled while its view runs
(Django cancels the view when the client goes away) must not release the key: the view runs
on and its response is kept, so a retry replays it instead of running the view twice."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest
from django.http import JsonResponse
from django.test import AsyncRequestFactory, override_settings

from oncely.http.django import IdempotencyMiddleware
from oncely.stores.memory import MemoryStore

from http_apps import django_site, django_views  # noqa: F401  (settings, then the URLconf)

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize("on_cancel", ["finish", "release"])
def test_a_cancelled_async_view_finishes_and_a_retry_replays(on_cancel: str) -> None:
    calls: list[int] = []
    started = asyncio.Event()

    async def view(request: Any) -> Any:
        # What Django's handler does before the view: the middleware learns the view runs.
        await middleware.process_view(request, view, (), {})
        calls.append(1)
        started.set()
        await asyncio.sleep(0.3)
        return JsonResponse({"order": len(calls)}, status=201)

    options = {
        "store": MemoryStore(),
        "scope": "oncely.http.GLOBAL",
        "wait": 10,
        "on_cancel": on_cancel,
    }
    key = f'"{uuid.uuid4()}"'
    factory = AsyncRequestFactory()

    def request() -> Any:
        return factory.post(
            "/aorders",
            data=b"{}",
            content_type="application/json",
            headers={"Idempotency-Key": key},
        )

    async def scenario() -> Any:
        task = asyncio.ensure_future(middleware(request()))
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        started.clear()
        return await asyncio.wait_for(middleware(request()), 10)

    with override_settings(ROOT_URLCONF="http_apps.django_views", ONCELY=options):
        middleware = IdempotencyMiddleware(view)
        again = asyncio.run(scenario())
    if on_cancel == "finish":
        assert again.status_code == 201 and again.headers.get("Idempotent-Replayed") == "true"
        assert calls == [1]
    else:
        assert again.status_code == 201 and calls == [1, 1]
