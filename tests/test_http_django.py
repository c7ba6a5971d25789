"""Django the Django way (issue 14 item 1): the middleware in MIDDLEWARE under WSGI and ASGI,
``settings.ONCELY``, ``@idempotent_view``, ``manage.py oncely``, the records migration, and
the bad-input cases (wrong settings, the middleware twice or in the wrong place)."""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest
from django.core.asgi import get_asgi_application
from django.core.handlers.wsgi import WSGIHandler
from django.test import override_settings

from oncely.errors import ConfigurationError
from oncely.http import GLOBAL, IdempotencyConfig
from oncely.stores.memory import MemoryStore

from http_apps import django_site, django_views  # noqa: F401  (settings, then the URLconf)
from http_apps.executions import calls

pytestmark = pytest.mark.timeout(60)

CSRF = "django.middleware.csrf.CsrfViewMiddleware"
OURS = "oncely.http.django.IdempotencyMiddleware"
AUTH = "http_apps.django_views.HeaderAuthenticationMiddleware"
DJANGO_AUTH = "django.contrib.auth.middleware.AuthenticationMiddleware"
MIDDLEWARE = [CSRF, OURS]


def key() -> dict[str, str]:
    return {"Idempotency-Key": f'"{uuid.uuid4()}"'}


class Client:
    """One interface to a Django handler under WSGI (blocking) and ASGI (a loop per call)."""

    def __init__(self, face: str) -> None:
        self.face = face
        if face == "wsgi":
            self.app: Any = WSGIHandler()
            self.sync = httpx.Client(
                transport=httpx.WSGITransport(app=self.app), base_url="http://t"
            )
        else:
            self.app = get_asgi_application()

    def request(self, method: str, path: str, **kw: Any) -> httpx.Response:
        if self.face == "wsgi":
            return self.sync.request(method, path, **kw)

        async def go() -> httpx.Response:
            transport = httpx.ASGITransport(app=self.app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
                response = await client.request(method, path, **kw)
                await response.aread()
                return response

        return asyncio.run(go())

    def post(self, path: str, **kw: Any) -> httpx.Response:
        return self.request("POST", path, **kw)


@contextmanager
def django_app(face: str, middleware: list[str] | None = None, **oncely: Any) -> Iterator[Client]:
    options = {"store": MemoryStore(), "scope": "oncely.http.GLOBAL", **oncely}
    with override_settings(
        ROOT_URLCONF="http_apps.django_views",
        MIDDLEWARE=MIDDLEWARE if middleware is None else middleware,
        ONCELY=options,
    ):
        yield Client(face)


FACES = pytest.mark.parametrize("face", ["wsgi", "asgi"])


@FACES
@pytest.mark.parametrize("view", ["orders", "aorders"])
def test_middleware_replays_refuses_and_requires(face: str, view: str) -> None:
    store = MemoryStore()
    with django_app(face, store=store) as client:
        calls.clear()
        k = key()
        first = client.post(f"/{view}", json={"a": 1}, headers=k)
        again = client.post(f"/{view}", json={"a": 1}, headers=k)
        other = client.post(f"/{view}", json={"a": 2}, headers=k)
        missing = client.post(f"/{view}", json={"a": 1})
        read = client.request("GET", f"/{view}")  # a safe method passes untouched
    assert first.status_code == 201 and "idempotent-replayed" not in first.headers
    assert again.status_code == 201 and again.headers["idempotent-replayed"] == "true"
    assert again.content == first.content
    assert other.status_code == 422 and other.json()["type"].endswith("idempotency-key-mismatch")
    assert other.headers["content-type"] == "application/problem+json"
    assert missing.status_code == 400 and missing.json()["type"].endswith("key-missing")
    assert read.status_code == 201
    assert calls[view] == 2  # the first POST and the GET
    assert len(store.list()) == 1


@FACES
def test_csrf_403_and_404_do_not_use_up_the_key(face: str) -> None:
    store = MemoryStore()
    with django_app(face, store=store) as client:
        calls.clear()
        k = key()
        refused = client.post("/comment", headers=k)
        assert refused.status_code == 403  # CsrfViewMiddleware.process_view, before the view
        assert client.post("/nowhere", headers=k).status_code == 404
        assert store.list() == []  # nothing claimed is left behind
        token = client.request("GET", "/csrf")
        headers = {
            **k,
            "X-CSRFToken": token.json()["token"],
            "Cookie": f"csrftoken={token.cookies['csrftoken']}",
        }
        made = client.post("/comment", headers=headers)
        again = client.post("/comment", headers=headers)
    assert made.status_code == 201 and again.headers["idempotent-replayed"] == "true"
    assert calls["comment"] == 1


@FACES
@pytest.mark.parametrize("view", ["report", "areport"])
@pytest.mark.filterwarnings("ignore:StreamingHttpResponse must consume")
def test_streaming_responses_are_stored_after_the_last_chunk(face: str, view: str) -> None:
    store = MemoryStore()
    with django_app(face, store=store) as client:
        calls.clear()
        k = key()
        first = client.post(f"/{view}?n=4", headers=k)
        again = client.post(f"/{view}?n=4", headers=k)
    assert first.text == "row 0\nrow 1\nrow 2\nrow 3\n"
    assert again.text == first.text and again.headers["idempotent-replayed"] == "true"
    assert again.headers["content-type"] == "text/plain"
    assert calls[view] == 1


@FACES
def test_a_failing_view_is_kept_and_a_problem_is_answered(face: str) -> None:
    store = MemoryStore()
    with django_app(face, store=store) as client:
        calls.clear()
        k = key()
        first = client.post("/boom", headers=k)
        assert first.status_code == 500 and "html" in first.headers["content-type"]  # Django's
        kept = client.post("/boom", headers=k)  # kept (finding 14): not run again
        assert kept.status_code == 500 and kept.headers["idempotent-replayed"] == "true"
        # ... as the documented problem, not Django's HTML page (red team round 8)
        assert kept.headers["content-type"] == "application/problem+json"
        assert kept.json()["type"].endswith("/handler-failed")
        problem = client.post("/problem", headers=key())
    assert calls["boom"] == 1
    assert problem.status_code == 409 and problem.json()["remaining"] == 0
    assert problem.json()["type"].endswith("/out-of-stock")
    with django_app(face, store=MemoryStore(), store_server_errors=False) as client:
        k = key()
        assert client.post("/boom", headers=k).status_code == 500
        assert client.post("/boom", headers=k).status_code == 500  # released: runs again
    assert calls["boom"] == 3


@FACES
def test_view_rules_and_idempotent_view_under_the_middleware(face: str) -> None:
    with django_app(face, required=False) as client:
        calls.clear()
        k = key()
        client.post("/pay", json={"amount": 1, "note": "a"}, headers=k)
        replay = client.post("/pay", json={"amount": 1, "note": "b"}, headers=k)  # fields only
        assert replay.headers["idempotent-replayed"] == "true"
        assert client.post("/pay", json={"amount": 2}, headers=k).status_code == 422
        assert client.post("/refunds").status_code == 400  # the class view requires a key
        k2 = key()
        client.post("/refunds", headers=k2)
        assert client.post("/refunds", headers=k2).headers["idempotent-replayed"] == "true"
        assert client.post("/orders").status_code == 201  # required=False globally
    assert calls == {"pay": 1, "refunds": 1, "orders": 1}


@FACES
@pytest.mark.parametrize("view", ["standalone", "astandalone"])
def test_idempotent_view_protects_its_view_without_the_middleware(face: str, view: str) -> None:
    with django_app(face, middleware=[CSRF]) as client:
        calls.clear()
        k = key()
        first = client.post(f"/{view}", json={"amount": 1}, headers=k)
        again = client.post(f"/{view}", json={"amount": 1}, headers=k)
        missing = client.post(f"/{view}", json={"amount": 1})
        assert client.post("/orders").status_code == 201  # other views: untouched
    assert first.status_code == 201 and again.headers["idempotent-replayed"] == "true"
    assert missing.status_code == 400
    assert calls[view] == 1


@FACES
def test_scope_from_user_gives_each_user_a_key_space(face: str) -> None:
    middleware = [AUTH, OURS]
    with django_app(face, middleware, scope="oncely.http.django.scope_from_user") as client:
        calls.clear()
        k = key()
        alice = client.post("/orders", json={}, headers={**k, "X-User": "alice"})
        bob = client.post("/orders", json={}, headers={**k, "X-User": "bob"})
        alice_again = client.post("/orders", json={}, headers={**k, "X-User": "alice"})
    assert "idempotent-replayed" not in bob.headers  # same key, another user: runs
    assert alice_again.headers["idempotent-replayed"] == "true"
    assert alice_again.json() == alice.json()
    assert calls["orders"] == 2


@FACES
def test_scope_from_user_refuses_anonymous_clients_unless_told_to_share(face: str) -> None:
    """retest4: Django's scope_from_user put every anonymous client in one key space, so
    client B got client A's response. Now refused with 401 before anything is claimed or run;
    scope_from_user_or_anonymous shares on purpose."""
    middleware = [AUTH, OURS]
    with django_app(face, middleware, scope="oncely.http.django.scope_from_user") as client:
        calls.clear()
        k = key()
        refused = client.post("/orders", json={}, headers=k)
        assert refused.status_code == 401, refused.content
        assert refused.headers["content-type"] == "application/problem+json"
        assert calls.get("orders", 0) == 0
        # nothing was claimed: the key is still free for an authenticated client
        assert client.post("/orders", json={}, headers={**k, "X-User": "a"}).status_code == 201
    scope = "oncely.http.django.scope_from_user_or_anonymous"
    with django_app(face, middleware, scope=scope) as client:
        calls.clear()
        k = key()
        first = client.post("/orders", json={}, headers=k)
        again = client.post("/orders", json={}, headers=k)
    assert first.status_code == 201 and again.headers["idempotent-replayed"] == "true"
    assert calls["orders"] == 1


# -- bad input: settings -------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"scope": "oncely.http.GLOBAL", "tll": 60}, "unknown option 'tll'; did you mean 'ttl'"),
        ({"scope": "oncely.http.GLOBAL", "ttl": "24 parsecs"}, "unknown unit 'parsecs'"),
        ({"scope": "oncely.http.GLOBAL", "lease": "-5"}, "lease='-5' is not valid"),
        ({"scope": "oncely.http.GLOBAL", "max_request_body": "lots"}, "not a size"),
        ({"scope": "oncely.http.GLOBAL", "required": "false"}, "expected True or False"),
        ({"scope": "oncely.http.GLOBAL", "methods": "POST"}, "not one string"),
        ({"scope": "oncely.http.GLOBL"}, "did you mean oncely.http.GLOBAL"),
        ({"scope": "no_such_module.scope"}, "cannot import 'no_such_module'"),
        ({}, "scope= is required"),
        ({"scope": "oncely.http.GLOBAL", "routes": {"/x": {"requird": False}}}, "'required'"),
        ({"scope": "oncely.http.GLOBAL", "store": "django://nope"}, "names no database"),
    ],
)
def test_wrong_settings_stop_the_middleware_at_start_up(options: Any, message: str) -> None:
    from django.core.exceptions import ImproperlyConfigured

    from oncely.contrib.django.checks import check_oncely

    with override_settings(MIDDLEWARE=MIDDLEWARE, ONCELY=options):
        with pytest.raises(ImproperlyConfigured, match=r"settings\.ONCELY") as caught:
            WSGIHandler()  # Django builds the middleware at start-up
        assert message in str(caught.value)
        assert isinstance(caught.value, ConfigurationError)
        errors = check_oncely()
    assert [e.id for e in errors] == ["oncely.E010"] and message in errors[0].msg


def test_timedelta_settings_are_seconds() -> None:
    from oncely.contrib.django.conf import idempotency_config

    with override_settings(ONCELY={"scope": GLOBAL, "ttl": dt.timedelta(hours=2)}):
        assert idempotency_config().ttl == 7200.0
    with override_settings(), pytest.raises(ConfigurationError, match="ONCELY is not set"):
        from django.conf import settings

        del settings.ONCELY
        idempotency_config()


def test_wrong_types_in_code_are_configuration_errors_too() -> None:
    from oncely.http import idempotent_route

    with pytest.raises(ConfigurationError, match="unknown unit 'parsecs'"):
        IdempotencyConfig(scope=GLOBAL, ttl="1parsecs")
    with pytest.raises(ConfigurationError, match="Rule: wait='5 fortnights' is not valid"):
        idempotent_route(wait="5 fortnights")
    with pytest.raises(ConfigurationError, match="whole number of seconds"):
        IdempotencyConfig(scope=GLOBAL, retry_after=0.5)  # type: ignore[arg-type]


# -- bad input: the middleware twice or in the wrong place ---------------------------------------
@pytest.mark.parametrize(
    ("middleware", "oncely", "ident", "message"),
    [
        ([CSRF, OURS, OURS], {}, "oncely.E001", "listed 2 times"),
        ([OURS, CSRF], {}, "oncely.E002", "CsrfViewMiddleware' comes after"),
        (
            [OURS, AUTH],
            {"scope": "oncely.http.django.scope_from_user"},
            "oncely.E003",
            "scope_from_user reads request.user",
        ),
        (
            [OURS],
            {"scope": "oncely.http.django.scope_from_user"},
            "oncely.E003",
            "missing from settings.MIDDLEWARE",
        ),
        ([OURS, "django.middleware.gzip.GZipMiddleware"], {}, "oncely.E004", "compresses"),
        *(
            (
                [DJANGO_AUTH, OURS, remote],
                {"scope": scope},
                "oncely.E005",
                f"'{remote}' comes after '{OURS}' in settings.MIDDLEWARE and sets request.user",
            )
            for remote in (
                "django.contrib.auth.middleware.RemoteUserMiddleware",
                "django.contrib.auth.middleware.PersistentRemoteUserMiddleware",
                "http_apps.django_users.HeaderRemoteUserMiddleware",
            )
            for scope in (
                "oncely.http.django.scope_from_user",
                "oncely.http.django.scope_from_user_or_anonymous",
            )
        ),
    ],
)
def test_misplaced_middleware_is_detected_and_explained(
    middleware: list[str], oncely: dict[str, Any], ident: str, message: str
) -> None:
    from django.core.exceptions import ImproperlyConfigured

    from oncely.contrib.django.checks import check_oncely

    options = {"store": "memory://", "scope": "oncely.http.GLOBAL", **oncely}
    with override_settings(MIDDLEWARE=middleware, ONCELY=options):
        with pytest.raises(ImproperlyConfigured, match=ident) as caught:
            WSGIHandler()
        assert message in str(caught.value)
        found = {e.id: e for e in check_oncely()}
    assert ident in found and message in found[ident].msg and found[ident].hint


def test_view_start_middleware_beside_the_middleware_is_a_warning() -> None:
    from oncely.contrib.django.checks import check_oncely

    with override_settings(MIDDLEWARE=[CSRF, OURS, "oncely.http.django.ViewStartMiddleware"]):
        WSGIHandler()  # starts
        assert [e.id for e in check_oncely()] == ["oncely.W001"]


def test_install_and_the_middleware_together_are_refused() -> None:
    from oncely.http.django import install

    with (
        override_settings(MIDDLEWARE=[CSRF, OURS]),
        pytest.raises(ConfigurationError, match="twice"),
    ):
        install(WSGIHandler(), IdempotencyConfig(store=MemoryStore(), scope=GLOBAL))


# -- the records table, the database store and manage.py oncely -----------------------------------
def test_migration_creates_the_table_the_sqlite_store_expects() -> None:
    from django.core.management import call_command

    from oncely.contrib.django.database import database_store
    from oncely.core.records import New, RecordKey
    from oncely.errors import SchemaMissing

    call_command("migrate", "oncely", verbosity=0)
    store = database_store("default")
    store.check_schema()
    key = RecordKey("t", uuid.uuid4().hex * 2)
    outcome = store.claim(key, "fp", 5, 60)
    assert isinstance(outcome, New)
    store.complete(key, outcome.fence, b"done", "raw", 60)
    assert store.get(key) is not None and store.get(key).result == b"done"  # type: ignore[union-attr]
    call_command("migrate", "oncely", "zero", verbosity=0)
    with pytest.raises(SchemaMissing):
        store.check_schema()
    call_command("migrate", "oncely", verbosity=0)
    store.check_schema()


@pytest.fixture
def pg_schema() -> Iterator[str]:
    import psycopg
    from django.db import connections

    from conftest import POSTGRES_URL

    schema = django_site.PG_SCHEMA
    with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA IF NOT EXISTS {schema}")
    try:
        yield schema
    finally:
        connections["pg"].close()
        from oncely.contrib.django.database import _stores

        store = _stores.pop("pg", None)
        if store is not None:
            store.close()
        with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")


def test_migration_on_postgres_makes_the_table_the_store_makes(pg_schema: str) -> None:
    import psycopg
    from django.core.management import call_command

    from oncely.contrib.django.database import database_store
    from oncely.core.records import New, RecordKey
    from oncely.stores import open_store

    from conftest import POSTGRES_URL

    call_command("migrate", "oncely", database="pg", verbosity=0)
    # The table the store itself creates, for comparison, in the same schema.
    reference = open_store(
        POSTGRES_URL + f"?options=-c%20search_path%3D{pg_schema}", table="reference_records"
    )
    reference.init_schema()
    reference.close()
    query = (
        "SELECT column_name, data_type, is_nullable FROM information_schema.columns "
        "WHERE table_schema = %s AND table_name = %s ORDER BY ordinal_position"
    )
    with psycopg.connect(POSTGRES_URL) as conn:
        made = conn.execute(query, (pg_schema, "oncely_records")).fetchall()
        expected = conn.execute(query, (pg_schema, "reference_records")).fetchall()
    assert made and made == expected
    store = database_store("pg")
    store.check_schema()
    assert isinstance(store.claim(RecordKey("t", "a" * 64), "fp", 5, 60), New)


def test_manage_py_oncely_runs_the_cli_on_the_configured_store(tmp_path: Any) -> None:
    import io

    from django.core.management import CommandError, call_command

    url = f"sqlite:///{tmp_path}/records.db"

    def run(*args: str) -> str:
        out = io.StringIO()
        call_command("oncely", *args, stdout=out)
        return out.getvalue()

    with override_settings(ONCELY={"store": url, "scope": "oncely.http.GLOBAL"}):
        with pytest.raises(CommandError):
            run("check")  # nothing created yet: check creates nothing
        assert "ready:" in run("init")
        assert "reachable:" in run("check") and "schema:" in run("check")
        assert "0 record(s)" in run("keys", "ls")
        assert "purged 0" in run("purge")
        assert "reachable:" in run("check", url)  # an explicit URL
        call_command("migrate", "oncely", verbosity=0)
        assert "reachable:" in run("check", "django")  # the project's database
    with (
        override_settings(ONCELY={"scope": "oncely.http.GLOBAL"}),
        pytest.raises(CommandError, match="has no 'store'"),
    ):
        run("check")


def test_manage_py_oncely_from_the_command_line(tmp_path: Any) -> None:
    import os
    import subprocess
    import sys
    from pathlib import Path

    tests = Path(__file__).parent
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(tests), str(tests.parent / "src")]),
        "DJANGO_SETTINGS_MODULE": "http_apps.django_project",
        "SERVER_APP_STORE": "django",
        "ONCELY_DJANGO_DB": str(tmp_path / "project.sqlite3"),
    }

    def manage(*args: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "django", *args]
        return subprocess.run(command, env=env, cwd=tests, capture_output=True, text=True)

    assert "keys" in manage("oncely", "--help").stdout
    missing = manage("oncely", "check")
    assert missing.returncode == 1 and "does not exist" in missing.stderr
    assert manage("migrate", "--verbosity", "0").returncode == 0
    checked = manage("oncely", "check")
    assert checked.returncode == 0 and "reachable:" in checked.stdout, checked.stderr
    assert manage("check").returncode == 0  # the system checks pass on this project


# -- scope_from_user: the user request.user holds, whoever set it ------------------------------
@pytest.fixture(scope="module")
def users() -> None:
    """alice and bob in the user table of the default database."""
    from django.contrib.auth import get_user_model
    from django.core.management import call_command

    call_command("migrate", "auth", verbosity=0)
    for name in ("alice", "bob"):
        get_user_model().objects.get_or_create(username=name)


class CookielessClient(Client):
    """A client keeping no cookies between requests: each sends only the ones given."""

    def request(self, method: str, path: str, **kw: Any) -> httpx.Response:
        if self.face == "wsgi":
            self.sync.cookies.clear()
        return super().request(method, path, **kw)


@contextmanager
def users_app(face: str, middleware: list[str], store: MemoryStore) -> Iterator[Client]:
    from http_apps import django_users

    scope = "oncely.http.django.scope_from_user"
    with override_settings(
        **django_users.SETTINGS, MIDDLEWARE=middleware, ONCELY={"store": store, "scope": scope}
    ):
        yield CookielessClient(face)


def _ids() -> dict[str, Any]:
    from django.contrib.auth import get_user_model

    return {
        u.username: u.pk for u in get_user_model().objects.filter(username__in=["alice", "bob"])
    }


def _cookies(response: httpx.Response) -> str:
    return "; ".join(f"{name}={value}" for name, value in response.cookies.items())


#: How a client authenticates: Django's RemoteUserMiddleware (X-User), or a middleware
#: setting request.user from a token (X-Token), a concrete user or a lazy one.
AUTHS = pytest.mark.parametrize("auth", ["RemoteUser", "TokenUser", "LazyTokenUser"])


def _auth(auth: str) -> tuple[list[str], str]:
    """``(MIDDLEWARE, the header naming the user)`` for ``auth``."""
    from http_apps import django_users

    if auth == "RemoteUser":
        return [*django_users.REMOTE, OURS], "X-User"
    return [*django_users.SESSION, f"http_apps.django_users.{auth}", OURS], "X-Token"


@FACES
@AUTHS
def test_a_request_authenticated_by_a_header_alone_is_not_refused(
    face: str, auth: str, users: None
) -> None:
    """red team 14 F2: under ASGI the scope was ``await request.auser()``, Django's session
    user (anonymous without a session), not the ``request.user`` the authentication
    middleware set: the first request of a client authenticated by a header got 401
    ``principal-missing``."""
    middleware, header = _auth(auth)
    with users_app(face, middleware, MemoryStore()) as client:
        calls.clear()
        k = {**key(), header: "bob"}
        first = client.post("/pay", json={}, headers=k)
        again = client.post("/pay", json={}, headers=k)
    assert first.status_code == 201, first.content
    assert first.json() == {"user": "bob", "n": 1}
    assert again.headers["idempotent-replayed"] == "true" and again.json() == first.json()


@FACES
@AUTHS
def test_a_user_set_over_another_users_session_keeps_its_own_key_space(
    face: str, auth: str, users: None
) -> None:
    """red team 14 F2: bob, authenticated by a header while carrying alice's old session
    cookie, ran as bob (``request.user``) but was stored under ``user:alice`` (Django's
    cached ``request.auser()``, which neither RemoteUserMiddleware nor ``alogin`` update);
    alice then sent the same key and got bob's response, replayed."""
    middleware, header = _auth(auth)
    store = MemoryStore()
    with users_app(face, middleware, store) as client:
        calls.clear()
        if auth == "RemoteUser":  # alice's session, from her first request
            signed_in = client.request("GET", "/pay", headers={header: "alice"})
            as_alice = {header: "alice"}
        else:
            signed_in = client.request("GET", "/login?as=alice")
            as_alice = {}
        assert signed_in.json()["user"] == "alice"
        alice = {"Cookie": _cookies(signed_in), **as_alice}
        k = key()
        bob = client.post("/pay", json={}, headers={**k, "Cookie": alice["Cookie"], header: "bob"})
        mine = client.post("/pay", json={}, headers={**k, **alice})
        bob_again = client.post("/pay", json={}, headers={**k, header: "bob"})
    assert bob.status_code == 201 and bob.json()["user"] == "bob"
    assert "idempotent-replayed" not in mine.headers  # alice never gets bob's response
    assert mine.status_code == 201 and mine.json()["user"] == "alice"
    assert bob_again.headers["idempotent-replayed"] == "true" and bob_again.json() == bob.json()
    ids = _ids()
    assert sorted(record.scope for record in store.list()) == sorted(
        [f"http:user:{ids['bob']}", f"http:user:{ids['alice']}"]
    )


@FACES
def test_the_scope_is_the_user_the_view_sees_after_a_session_flush(face: str, users: None) -> None:
    """A middleware that asked ``await request.auser()`` then flushed the session: under ASGI
    the view's ``request.user`` is anonymous while ``request.auser()`` still answers alice, so
    the scope is not alice's (a 401 here); under WSGI ``request.user`` was loaded before the
    flush and stays alice, who is the scope."""
    from http_apps import django_users

    middleware = [*django_users.SESSION, "http_apps.django_users.ExpireSession", OURS]
    store = MemoryStore()
    with users_app(face, middleware, store) as client:
        calls.clear()
        alice = {"Cookie": _cookies(client.request("GET", "/login?as=alice"))}
        k = key()
        made = client.post("/pay", json={}, headers={**k, **alice})
        expired = client.post("/pay", json={}, headers={**k, **alice, "X-Expire": "1"})
    assert made.status_code == 201 and made.json()["user"] == "alice"
    if face == "asgi":
        assert expired.status_code == 401, expired.content  # not alice's response, replayed
        assert calls["pay"] == 1
    else:
        assert expired.headers["idempotent-replayed"] == "true"
        assert expired.json() == made.json()


@FACES
def test_idempotent_view_alone_reads_the_session_user(face: str, users: None) -> None:
    """``@idempotent_view`` on an async view without oncely's middleware, by user: the session
    user is loaded without a blocking call on the event loop (it was a 500 under ASGI)."""
    from http_apps import django_users

    with users_app(face, django_users.SESSION, MemoryStore()) as client:
        calls.clear()
        alice = {"Cookie": _cookies(client.request("GET", "/login?as=alice"))}
        k = key()
        first = client.post("/apay", json={}, headers={**k, **alice})
        again = client.post("/apay", json={}, headers={**k, **alice})
        anonymous = client.post("/apay", json={}, headers=k)
    assert first.status_code == 201, first.content
    assert first.json()["user"] == "alice"
    assert again.headers["idempotent-replayed"] == "true" and again.json() == first.json()
    assert anonymous.status_code == 401
    assert calls["apay"] == 1


@FACES
@pytest.mark.parametrize("auth", ["TokenUser", "LazyTokenUser"])
def test_a_user_set_inside_oncelys_middleware_is_never_stored_in_another_users_scope(
    face: str, auth: str, users: None
) -> None:
    """red team 15: a token middleware listed after oncely's (no system check can know it)
    set request.user to bob over alice's session: bob's response was stored under alice's
    scope and replayed to alice. The principal the view saw is compared with the one the key
    was scoped by: they differ, so the key is released and nothing stored."""
    from http_apps import django_users

    middleware = [*django_users.SESSION, OURS, f"http_apps.django_users.{auth}"]
    store = MemoryStore()
    with users_app(face, middleware, store) as client:
        calls.clear()
        alice = {"Cookie": _cookies(client.request("GET", "/login?as=alice"))}
        k = key()
        bob = client.post("/pay", json={}, headers={**k, **alice, "X-Token": "bob"})
        kept = list(store.list())
        mine = client.post("/pay", json={}, headers={**k, **alice})
        again = client.post("/pay", json={}, headers={**k, **alice})
    assert bob.status_code == 201 and bob.json()["user"] == "bob"
    assert kept == []  # nothing stored under alice's scope for bob's request
    assert "idempotent-replayed" not in mine.headers  # alice never gets bob's response
    assert mine.status_code == 201 and mine.json()["user"] == "alice"
    assert again.headers["idempotent-replayed"] == "true" and again.json() == mine.json()
    assert calls["pay"] == 2
