"""Every configuration option refuses a value of the wrong type with a typed error naming it.

The rule: bad configuration raises :class:`~oncely.errors.ConfigurationError` (or a documented
subclass) whose message names the option, never an ``AttributeError``/``KeyError``/bare
``TypeError`` from deep inside (``SQLiteStore(synchronous=1)`` used to raise
``AttributeError: 'int' object has no attribute 'upper'``).

The probe is driven by :mod:`inspect`: every public constructor, decorator and function that
takes configuration is listed in :data:`TARGETS` with a call that works; each of its parameters
(found by ``inspect.signature``, so a new option is probed as soon as it exists) is then given
wrong values derived from its annotation: an int for a str, a str for a number, a list for a
str, None where None is not allowed, a negative, NaN or infinite number for a number, a bool
for a number. Parameters that take anything (callables, user objects, connections) are in
:data:`ANYTHING`; every public callable with a plain-valued parameter must be probed or listed
in :data:`NOT_CONFIGURATION` (:func:`test_every_public_configurable_is_probed`).
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import math
import re
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from oncely.errors import ConfigurationError

pytestmark = pytest.mark.timeout(60)

REDIS = "redis://127.0.0.1:6379/0"
POSTGRES = "postgresql://postgres@127.0.0.1:5432/test"
MYSQL = "mysql://root@127.0.0.1:3306/test"
SECRET = "s" * 32
RUN = uuid.uuid4().hex[:8]


def _handler(*args: Any, **kwargs: Any) -> None:
    return None


async def _ahandler(*args: Any, **kwargs: Any) -> None:
    return None


def _asgi(scope: Any, receive: Any, send: Any) -> None:
    return None


def _wsgi(environ: Any, start_response: Any) -> list[bytes]:
    return []


class _UserObject:
    """An object the caller hands over (a queue, a client, a subscription): never touched by
    a constructor that checks its options."""


@dataclass
class Target:
    """One public callable and a call of it that works: ``call(**overrides)``.

    ``fn``: the callable whose signature lists the options; ``call``: builds with the defaults
    plus the overrides (returns the object, closed afterwards when it has ``close``);
    ``skip``: parameters not probed here (with the reason in :data:`ANYTHING`);
    ``extra``: options taken through ``**options`` that are probed as well (name: annotation).
    """

    fn: Any
    call: Callable[..., Any]
    skip: frozenset[str] = frozenset()
    extra: dict[str, str] = field(default_factory=dict)


def _tmpdb(kind: str) -> str:
    import tempfile

    return f"sqlite:///{tempfile.gettempdir()}/oncely-types-{RUN}-{kind}.db"


def _consumer(sync: bool = False) -> Any:
    from oncely.messaging import IdempotentConsumer

    handler = _handler if sync else _ahandler
    return IdempotentConsumer(handler, name=f"types-{RUN}", store="memory://")


def _sqlite() -> Any:
    import sqlite3

    return sqlite3.connect(":memory:", check_same_thread=False)


def _machine() -> Any:
    from oncely.statemachine import Machine, Transition

    return Machine("order", ["new", "paid"], "new", [Transition("pay", "new", "paid")])


def _tokens() -> Any:
    from oncely.tokens import Tokens

    return Tokens(SECRET, "memory://")


def _targets() -> dict[str, Target]:
    import oncely
    from oncely import functions, http, locks, messaging, optimistic, statemachine, stores
    from oncely.http import conditional
    from oncely.locks import postgres as pglock
    from oncely.locks import redis as redislock
    from oncely.locks import redlock
    from oncely.locks import sqlite as sqlitelock
    from oncely.messaging import mqtt, nats, rabbitmq, redis_streams
    from oncely.observability import logs, prometheus
    from oncely.optimistic import redis as optredis
    from oncely.statemachine import barrier, saga
    from oncely.statemachine import redis as smredis
    from oncely.statemachine import sql as smsql
    from oncely.stores import memory, mysql, postgres, sqlite
    from oncely.stores import redis as redisstore

    t: dict[str, Target] = {}

    def add(name: str, fn: Any, call: Callable[..., Any], **kw: Any) -> None:
        t[name] = Target(fn, call, **kw)

    # -- stores -------------------------------------------------------------------------------
    add(
        "SQLiteStore",
        sqlite.SQLiteStore,
        lambda **o: sqlite.SQLiteStore(o.pop("url", _tmpdb("store")), **o),
    )
    add(
        "PostgresStore",
        postgres.PostgresStore,
        lambda **o: postgres.PostgresStore(o.pop("url", POSTGRES), **o),
    )
    add("MySQLStore", mysql.MySQLStore, lambda **o: mysql.MySQLStore(o.pop("url", MYSQL), **o))
    add(
        "RedisStore",
        redisstore.RedisStore,
        lambda **o: redisstore.RedisStore(o.pop("url", REDIS), **o),
    )
    add("MemoryStore", memory.MemoryStore, lambda **o: memory.MemoryStore(**o))
    add("open_store", stores.open_store, lambda **o: stores.open_store(o.pop("url", "memory://")))
    # -- the decorator --------------------------------------------------------------------------
    add(
        "idempotent",
        oncely.idempotent,
        lambda **o: oncely.idempotent(**{"store": "memory://", **o})(_handler),
        skip=frozenset({"fn"}),
    )
    add(
        "Idempotent",
        functions.Idempotent,
        lambda **o: functions.Idempotent(o.pop("fn", _handler), **{"store": "memory://", **o}),
    )
    # -- HTTP ---------------------------------------------------------------------------------
    add(
        "IdempotencyConfig",
        http.IdempotencyConfig,
        lambda **o: http.IdempotencyConfig(**{"scope": _global(), **o}),
    )
    add("Rule", http.Rule, lambda **o: http.Rule(**o))
    add("idempotent_route", http.idempotent_route, lambda **o: http.idempotent_route(**o)(_handler))
    add(
        "IdempotencyMiddleware",
        http.IdempotencyMiddleware,
        lambda **o: http.IdempotencyMiddleware(
            o.pop("app", _asgi), store="memory://", scope=_global(), **o
        ),
        extra={"ttl": "float | str", "max_key_length": "int", "header": "str"},
    )
    add(
        "WSGIIdempotencyMiddleware",
        http.WSGIIdempotencyMiddleware,
        lambda **o: http.WSGIIdempotencyMiddleware(
            o.pop("app", _wsgi), store="memory://", scope=_global(), **o
        ),
        extra={"lease": "float | str", "required": "bool", "methods": "Collection[str]"},
    )
    add(
        "TokenGuard",
        http.TokenGuard,
        lambda **o: http.TokenGuard(**{"tokens": _tokens(), **o}),
    )
    add(
        "scope_from_cookie",
        http.scope_from_cookie,
        lambda **o: http.scope_from_cookie(o.pop("name", "session"), **o),
    )
    add(
        "scope_from_header",
        http.scope_from_header,
        lambda **o: http.scope_from_header("X-Tenant", **o),
    )
    add("scope_from_user", http.scope_from_user, lambda **o: http.scope_from_user(**o))
    add("json_fields", http.json_fields, lambda **o: http.json_fields("a.b", **o))
    add(
        "ConditionalMiddleware",
        conditional.ConditionalMiddleware,
        lambda **o: conditional.ConditionalMiddleware(o.pop("app", _asgi), **o),
    )
    add(
        "WSGIConditionalMiddleware",
        conditional.WSGIConditionalMiddleware,
        lambda **o: conditional.WSGIConditionalMiddleware(o.pop("app", _wsgi), **o),
    )
    add("IfMatchRule", conditional.IfMatchRule, lambda **o: conditional.IfMatchRule(**o))
    # -- tokens -------------------------------------------------------------------------------
    from oncely import tokens

    add(
        "Tokens",
        tokens.Tokens,
        lambda **o: tokens.Tokens(**{"secret": SECRET, "store": "memory://", **o}),
    )
    add(
        "Tokens.issue",
        tokens.Tokens.issue,
        lambda **o: _tokens().issue(o.pop("subject", "alice"), o.pop("purpose", "checkout"), **o),
        skip=frozenset({"self"}),
    )
    # -- locks --------------------------------------------------------------------------------
    add(
        "Lock",
        locks.Lock,
        lambda **o: locks.Lock(o.pop("url", REDIS), o.pop("name", f"types-{RUN}"), **o),
    )
    add(
        "Redlock",
        locks.Redlock,
        lambda **o: locks.Redlock(o.pop("urls", [REDIS]), o.pop("name", "types"), **o),
    )
    add(
        "RedisLockBackend",
        redislock.RedisLockBackend,
        lambda **o: redislock.RedisLockBackend(o.pop("url", REDIS), **o),
    )
    add(
        "PostgresLockBackend",
        pglock.PostgresLockBackend,
        lambda **o: pglock.PostgresLockBackend(o.pop("url", POSTGRES), **o),
    )
    add(
        "SQLiteLockBackend",
        sqlitelock.SQLiteLockBackend,
        lambda **o: sqlitelock.SQLiteLockBackend(o.pop("url", _tmpdb("lock")), **o),
    )
    add(
        "RedlockBackend",
        redlock.RedlockBackend,
        lambda **o: redlock.RedlockBackend(o.pop("urls", [REDIS]), **o),
    )
    add(
        "fenced_table_sql",
        locks.fenced_table_sql,
        lambda **o: locks.fenced_table_sql(o.pop("table", "fenced"), **o),
    )
    # -- optimistic -----------------------------------------------------------------------------
    add("ConflictRetry", optimistic.ConflictRetry, lambda **o: optimistic.ConflictRetry(**o))
    add(
        "retry_on_conflict",
        optimistic.retry_on_conflict,
        lambda **o: optimistic.retry_on_conflict(**o)(_handler),
        skip=frozenset({"fn"}),
    )
    add(
        "RedisVersioned",
        optredis.RedisVersioned,
        lambda **o: optredis.RedisVersioned(o.pop("client_or_url", REDIS), **o),
    )
    # -- state machines, sagas, barriers -------------------------------------------------------
    add(
        "Machine",
        statemachine.Machine,
        lambda **o: statemachine.Machine(
            **{
                "name": "order",
                "states": ["new", "paid"],
                "initial": "new",
                "transitions": [statemachine.Transition("pay", "new", "paid")],
                **o,
            }
        ),
    )
    add(
        "Transition",
        statemachine.Transition,
        lambda **o: statemachine.Transition(
            **{"name": "pay", "source": "new", "target": "paid", **o}
        ),
    )
    add(
        "RedisStateMachine",
        smredis.RedisStateMachine,
        lambda **o: smredis.RedisStateMachine(o.pop("machine", _machine()), **o),
    )
    add(
        "SqlStateMachine",
        smsql.SqlStateMachine,
        lambda **o: smsql.SqlStateMachine(
            o.pop("machine", _machine()), o.pop("table", smsql.Table("orders")), **o
        ),
    )
    add("Table", smsql.Table, lambda **o: smsql.Table(o.pop("name", "orders"), **o))
    add(
        "Step",
        saga.Step,
        lambda **o: saga.Step(o.pop("name", "reserve"), o.pop("action", _handler), **o),
    )
    add(
        "HttpStep",
        saga.HttpStep,
        lambda **o: saga.HttpStep(
            **{"name": "pay", "url": "http://x/pay", "client": _UserObject(), **o}
        ),
    )
    add(
        "redis_barrier",
        barrier.redis_barrier,
        lambda **o: barrier.redis_barrier(
            o.pop("client", _redis()),
            *[o.pop(k, f"{k}-{RUN}") for k in ("gid", "branch")],
            o.pop("op", "try"),
            **o,
        ),
    )
    # -- messaging ------------------------------------------------------------------------------
    add(
        "IdempotentConsumer",
        messaging.IdempotentConsumer,
        lambda **o: messaging.IdempotentConsumer(
            o.pop("handler", _ahandler), **{"name": f"types-{RUN}", "store": "memory://", **o}
        ),
    )
    add(
        "Deduplicator",
        messaging.Deduplicator,
        lambda **o: messaging.Deduplicator(
            o.pop("store", REDIS), **{"window": 60, "namespace": f"types-{RUN}", **o}
        ),
    )
    add("Inbox", messaging.Inbox, lambda **o: messaging.Inbox(**o))
    add("Outbox", messaging.Outbox, lambda **o: messaging.Outbox(**o))
    add(
        "Relay",
        messaging.Relay,
        lambda **o: messaging.Relay(
            o.pop("outbox", messaging.Outbox()),
            o.pop("connection", _sqlite()),
            **{"publish": _handler, **o},
        ),
    )
    add(
        "RabbitMQConsumer",
        rabbitmq.RabbitMQConsumer,
        lambda **o: rabbitmq.RabbitMQConsumer(
            o.pop("consumer", _consumer()), o.pop("queue", _UserObject()), **o
        ),
    )
    add(
        "JetStreamConsumer",
        nats.JetStreamConsumer,
        lambda **o: nats.JetStreamConsumer(
            o.pop("consumer", _consumer()), o.pop("subscription", _UserObject()), **o
        ),
    )
    add(
        "MQTTConsumer",
        mqtt.MQTTConsumer,
        lambda **o: mqtt.MQTTConsumer(
            o.pop("consumer", _consumer(sync=True)),
            o.pop("client", _UserObject()),
            o.pop("topic", "orders"),
            **o,
        ),
    )
    add(
        "RedisStreamConsumer",
        redis_streams.RedisStreamConsumer,
        lambda **o: redis_streams.RedisStreamConsumer(
            o.pop("consumer", _consumer()),
            o.pop("client", _UserObject()),
            *[o.pop(k, f"{k}-{RUN}") for k in ("stream", "group", "member")],
            **o,
        ),
    )
    # -- observability --------------------------------------------------------------------------
    add("LogObserver", logs.LogObserver, lambda **o: logs.LogObserver(**o))
    add(
        "with_metrics_asgi",
        prometheus.with_metrics_asgi,
        lambda **o: prometheus.with_metrics_asgi(o.pop("app", _asgi), **o),
    )
    add(
        "with_metrics_wsgi",
        prometheus.with_metrics_wsgi,
        lambda **o: prometheus.with_metrics_wsgi(o.pop("app", _wsgi), **o),
    )
    from oncely.core import observe

    add("set_log_key", observe.set_log_key, lambda **o: observe.set_log_key(**o))
    # -- web frameworks ---------------------------------------------------------------------
    from oncely.http import fastapi as fastapi_layer
    from oncely.http import flask as flask_layer

    add(
        "fastapi.Idempotency",
        fastapi_layer.Idempotency,
        lambda **o: fastapi_layer.Idempotency(**o),
        extra={"ttl": "float | str", "wait": "float | str", "methods": "Collection[str]"},
    )
    add(
        "fastapi.RequireToken",
        fastapi_layer.RequireToken,
        lambda **o: fastapi_layer.RequireToken(o.pop("purpose", "checkout"), **o),
        extra={"ttl": "float | None"},
    )
    add(
        "flask.install",
        flask_layer.install,
        lambda **o: flask_layer.install(
            o.pop("app", _flask()), **{"store": "memory://", "scope": _global(), **o}
        ),
        extra={"ttl": "float | str", "max_request_body": "int | str", "header": "str"},
    )
    add(
        "flask.conditional",
        flask_layer.conditional,
        lambda **o: flask_layer.conditional(o.pop("app", _flask()), **o),
        extra={"methods": "Iterable[str]", "problem_base": "str"},
    )
    # -- SQL ----------------------------------------------------------------------------------
    import oncely.sql as osql
    from oncely.http import litestar as litestar_layer

    add("Operation", osql.Operation, lambda **o: osql.Operation(o.pop("name", "ship"), **o))
    add(
        "idempotent_transaction",
        osql.idempotent_transaction,
        lambda **o: osql.idempotent_transaction(**{"key": "order_id", "scope": "s", **o})(
            _conn_handler
        ),
    )
    add(
        "reap",
        osql.reap,
        lambda **o: osql.reap(o.pop("conn", _sqlite_keys()), **o),
        skip=frozenset(),
    )
    add(
        "create_tables",
        osql.create_tables,
        lambda **o: osql.create_tables(o.pop("conn", _sqlite()), **o),
    )
    add(
        "transaction",
        osql.transaction,
        lambda **o: osql.transaction(
            o.pop("conn", _sqlite_keys()), **{"operation": "op", "key": "k", "scope": "s", **o}
        ),
    )
    add(
        "litestar.IdempotencyPlugin",
        litestar_layer.IdempotencyPlugin,
        lambda **o: litestar_layer.IdempotencyPlugin(
            **{"store": "memory://", "scope": _global(), **o}
        ),
        extra={"ttl": "float | str", "max_key_length": "int", "header": "str"},
    )
    return t


def _sqlite_keys() -> Any:
    from oncely.sql import create_tables

    conn = _sqlite()
    create_tables(conn)
    return conn


def _conn_handler(conn: Any, order_id: str) -> None:
    return None


def _global() -> Any:
    from oncely.http import GLOBAL

    return GLOBAL


def _redis() -> Any:
    import redis

    return redis.Redis.from_url(REDIS)


def _flask() -> Any:
    import flask

    return flask.Flask(f"types{uuid.uuid4().hex[:6]}")


#: Parameters that take anything (code, user objects, connections, payloads): (target, name),
#: or ("*", name) for every target.
ANYTHING: frozenset[tuple[str, str]] = frozenset(
    {
        ("*", "self"),
        ("*", "fn"),
        ("*", "app"),
        ("*", "on_lost"),
        ("*", "on_retry"),
        ("*", "retry_on"),
        ("*", "on_dead_letter"),
        ("*", "handler"),
        ("*", "action"),
        ("*", "compensation"),
        ("*", "guard"),
        ("*", "client"),
        ("*", "async_client"),
        ("*", "client_or_url"),
        ("*", "connection"),
        ("*", "consumer"),
        ("*", "queue"),
        ("*", "subscription"),
        ("*", "resolver"),
        ("*", "config"),
        ("*", "codec"),
        ("*", "registry"),
        ("*", "logger"),
        ("*", "publish"),
        ("*", "hooks"),
        ("*", "after_commit"),
        ("transaction", "payload"),  # any JSON-able value, None included, is a payload
        ("*", "tokens"),
        ("*", "machine"),
        ("*", "outbox"),
        ("*", "inbox"),
        ("*", "json"),
        ("*", "routes"),
        ("*", "key"),  # a list of argument names or a callable
        ("*", "scope"),  # a string or a callable (checked by its own tests)
        ("*", "subject"),
        ("*", "fingerprint"),  # a spec: names, a callable or a Fingerprinter
        ("*", "validate"),
        ("*", "dedup_id"),
        ("*", "connect"),
        ("*", "store_errors"),
        ("*", "return_type"),
        ("*", "paths"),  # patterns or a callable
        ("Deduplicator", "store"),  # a URL or a client
        ("SqlStateMachine", "table"),
        ("*", "options"),
        ("*", "pool_options"),
        ("*", "settings"),
        ("*", "rule"),
        ("*", "conn"),
        ("*", "view"),
        ("*", "conn_arg"),
    }
)


def _anything(target: str, name: str) -> bool:
    return ("*", name) in ANYTHING or (target, name) in ANYTHING


@dataclass(frozen=True)
class Bad:
    value: Any
    why: str


def _bad_values(annotation: str, default: Any) -> list[Bad]:
    """Wrong values for a parameter annotated ``annotation`` (a string: the modules use
    ``from __future__ import annotations``)."""
    a = annotation.replace(" ", "")
    parts = set(re.split(r"[|\[\],]", a))
    bad: list[Bad] = []
    from oncely.settings import UNSET

    nullable = "None" in parts or default is None or default is UNSET  # None: "not given"
    if not nullable and default is not inspect.Parameter.empty:
        bad.append(Bad(None, "None where not allowed"))
    numeric = bool(parts & {"float", "int"}) and not a.startswith(("Sequence", "Collection"))
    if numeric:
        if "str" not in parts:
            bad.append(Bad("abc", "a str for a number"))
        else:
            bad.append(Bad("abc", "text that is no number"))
        bad.append(Bad(True, "a bool for a number"))
        bad.append(Bad(-1, "a negative number"))
        bad.append(Bad(["1"], "a list for a number"))
        if "float" in parts:
            bad.append(Bad(math.nan, "NaN"))
            bad.append(Bad(math.inf, "inf"))
            # past MAX_SECONDS: accepted once, then every call failed (a Redis PX overflow)
            bad.append(Bad(1e18, "a huge number"))
        else:
            bad.append(Bad(1.5, "a fraction for a whole number"))
    elif parts & {"Mapping"}:
        bad.append(Bad(1, "an int for a mapping"))
        bad.append(Bad(["x"], "a list for a mapping"))
    elif parts & {"str"} and not parts & {"Sequence", "Collection", "Iterable", "bytes"}:
        bad.append(Bad(1, "an int for a str"))
        bad.append(Bad(["x"], "a list for a str"))
    elif parts & {"Sequence", "Collection", "Iterable"} and "str" in parts:
        bad.append(Bad(1, "an int for a list"))
        bad.append(Bad([1], "a list of ints for a list of str"))
    if "bool" in parts and not numeric and not parts & {"str", "Sequence"}:
        bad.append(Bad("yes", "a str for a bool"))
        bad.append(Bad(2, "an int for a bool"))
    return bad


#: (target, parameter, why) that are fine as they are: documented meanings of a value.
ACCEPTED: frozenset[tuple[str, str, str]] = frozenset(
    {
        ("Lock", "timeout", "a negative number"),  # -1: wait forever (documented)
        ("Redlock", "timeout", "a negative number"),
        ("Tokens", "secret", "a list for a str"),  # a list of keys: rotation (documented)
        ("scope_from_cookie", "secret", "a list for a str"),
        ("Transition", "source", "a list for a str"),  # several sources (documented)
        ("Redlock", "ttl", "None where not allowed"),  # None: the lock_ttl setting, as Lock
        ("Redlock", "auto_renew", "None where not allowed"),
    }
)


def _cases() -> Iterator[Any]:
    for name, target in _targets().items():
        params = dict(inspect.signature(target.fn).parameters)
        annotations = {
            p.name: (str(p.annotation), p.default)
            for p in params.values()
            if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        }
        for extra, annotation in target.extra.items():
            annotations[extra] = (annotation, None)
        for param, (annotation, default) in annotations.items():
            if _anything(name, param) or param in target.skip:
                continue
            for bad in _bad_values(annotation, default):
                if (name, param, bad.why) in ACCEPTED:
                    continue
                yield pytest.param(name, param, bad, id=f"{name}-{param}-{bad.why}")


def _close(obj: Any) -> None:
    close = getattr(obj, "close", None)
    if callable(close) and not inspect.iscoroutinefunction(close):
        with contextlib.suppress(Exception):
            close()


@pytest.mark.parametrize("name", sorted(_targets()))
def test_the_probe_call_works(name: str) -> None:
    """The call each probe starts from is valid, so an error in the probe is the bad value's."""
    _close(_targets()[name].call())


def _documented() -> tuple[type[BaseException], ...]:
    from oncely.errors import InvalidBarrierCall, InvalidIdentifier, InvalidLockName

    # A lock name and a barrier's gid/branch/op are data more than configuration: their own
    # documented errors (ValueError subclasses) are the typed error.
    return (ConfigurationError, InvalidLockName, InvalidBarrierCall, InvalidIdentifier)


DOCUMENTED = _documented()


def _check(what: str, param: str, bad: Bad, call: Callable[[], Any]) -> None:
    try:
        obj = call()
    except DOCUMENTED as exc:
        assert re.search(rf"\b{re.escape(param)}\b", str(exc), re.IGNORECASE), (
            f"{what}({param}={bad.value!r}) [{bad.why}]: the error does not name {param!r}: {exc}"
        )
        return
    except Exception as exc:
        pytest.fail(
            f"{what}({param}={bad.value!r}) [{bad.why}] raised {type(exc).__name__}: {exc}",
            pytrace=False,
        )
    _close(obj)
    pytest.fail(f"{what}({param}={bad.value!r}) [{bad.why}] was accepted", pytrace=False)


@pytest.mark.parametrize(("name", "param", "bad"), list(_cases()))
def test_a_wrong_value_is_a_configuration_error_naming_the_option(
    name: str, param: str, bad: Bad
) -> None:
    target = _targets()[name]
    _check(name, param, bad, lambda: target.call(**{param: bad.value}))


# -- URL options: every numeric option of every backend -------------------------------------------
def _url_cases() -> Iterator[Any]:
    from oncely.backends import postgres, redis, sqlite

    bases = {
        "sqlite": (sqlite.NUMBERS, _tmpdb("url")),
        "postgresql": (postgres.NUMBERS, POSTGRES),
        "redis": (redis.NUMBERS, REDIS),
    }
    for scheme, (numbers, base) in bases.items():
        for option in numbers:
            for text in ("abc", "nan", "inf", "-1", "1e999", ""):
                yield pytest.param(base, option, text, id=f"{scheme}-{option}-{text or 'empty'}")


@pytest.mark.parametrize(("base", "option", "text"), list(_url_cases()))
def test_a_wrong_url_option_is_a_configuration_error(base: str, option: str, text: str) -> None:
    from oncely.stores import open_store

    url = f"{base}{'&' if '?' in base else '?'}{option}={text}"
    _check(url, option, Bad(text, "URL option"), lambda: open_store(url))


# -- coverage: every public callable with a plain-valued option is probed -----------------------
PUBLIC_MODULES = (
    "oncely",
    "oncely.stores",
    "oncely.http",
    "oncely.http.conditional",
    "oncely.http.fastapi",
    "oncely.http.flask",
    "oncely.tokens",
    "oncely.locks",
    "oncely.locks.redis",
    "oncely.locks.postgres",
    "oncely.locks.sqlite",
    "oncely.locks.redlock",
    "oncely.optimistic",
    "oncely.optimistic.redis",
    "oncely.statemachine",
    "oncely.statemachine.redis",
    "oncely.statemachine.sql",
    "oncely.statemachine.saga",
    "oncely.messaging",
    "oncely.messaging.rabbitmq",
    "oncely.messaging.nats",
    "oncely.messaging.mqtt",
    "oncely.messaging.redis_streams",
    "oncely.observability.logs",
    "oncely.observability.prometheus",
    "oncely.sql",
    "oncely.http.litestar",
    "oncely.http.django",
    "oncely.contrib.django.conf",
)

#: Public callables that take no configuration (they take data, requests, results), by name
#: or by module.name.
NOT_CONFIGURATION = frozenset(
    {
        "Claimed",
        "JsonCodec",
        "RawCodec",
        "Store",
        "current_claim",
        "HandlerEntry",
        "HttpRequest",
        "HttpResponse",
        "IdempotencyInfo",
        "ProblemType",
        "request_fingerprint",
        "EntityTag",
        "IfMatch",
        "etag",
        "if_match",
        "parse_if_match",
        "problem_for",
        "version_of",
        "amend_openapi",
        "document",
        "problem_handler",
        "watch_validation",
        "FlaskResolver",
        "require_token",
        "TokenClaims",
        "TokenUse",
        "LockBackend",
        "afenced_set",
        "afenced_update",
        "fenced_get",
        "fenced_set",
        "fenced_update",
        "Scope",
        "advisory_key",
        "drift",
        "StaleVersion",
        "HistoryEntry",
        "Outcome",
        "HookCall",
        "table_of",
        "SagaResult",
        "StepContext",
        "idempotency_key",
        "Ack",
        "DeadLetter",
        "Delivery",
        "OutboxMessage",
        "Retry",
        "Verdict",
        "dedup_id_reader",
        "delivery_of",
        "publish",
        "connect",
        "uninstall",
        "install",
        "asgi_app",
        "wsgi_app",
        "served_registry",
        "PrometheusObserver",
        "configured_store",
        "shared_store",
        "store_class",
        "DedupSource",
        "Saga",
        # oncely.sql: data arguments (a row's id and version), the Transaction the function
        # transaction() returns, async twins that share the sync functions' checks
        "PhaseContext",
        "Transaction",
        "versioned_update",
        "aversioned_update",
        "areap",
        "acreate_tables",
        # Django: read from django.conf.settings (probed in tests/test_http_django.py)
        "oncely.http.django.IdempotencyMiddleware",
        "oncely.http.django.idempotent_view",
        "oncely.http.django.middleware_problems",
        "oncely.contrib.django.conf.store_url",
    }
)


def test_every_public_configurable_is_probed() -> None:
    probed = {id(t.fn) for t in _targets().values()}
    missing = []
    for module_name in PUBLIC_MODULES:
        module = importlib.import_module(module_name)
        for name in getattr(module, "__all__", ()):
            obj = getattr(module, name)
            full = f"{module_name}.{name}"
            if not callable(obj) or {name, full} & NOT_CONFIGURATION or id(obj) in probed:
                continue
            if inspect.isclass(obj) and issubclass(obj, BaseException):
                continue
            try:
                params = inspect.signature(obj).parameters.values()
            except (TypeError, ValueError):
                continue
            if any(p.default is not p.empty for p in params):
                missing.append(f"{module_name}.{name}")
    assert not missing, f"public callables with options the probe does not cover: {missing}"


# -- CLI options: a wrong value is a usage error, never a traceback ----------------------------
#: Commands that start work (a demo, a load, a broker consumer) rather than read options and
#: answer; their options are those of the objects probed above.
CLI_STARTS_WORK = ("demo", "storm", "probe", "consume")


def _cli_cases() -> Iterator[Any]:
    import typer.main

    from oncely.cli import app

    def walk(command: Any, path: list[str]) -> Iterator[Any]:
        if hasattr(command, "commands"):
            for name, sub in sorted(command.commands.items()):
                if name not in CLI_STARTS_WORK:
                    yield from walk(sub, [*path, name])
            return
        for param in command.params:
            if param.param_type_name != "option" or param.is_flag:
                continue
            for value in ("abc", "-1", "nan", "inf", "1.5", ""):
                yield pytest.param(
                    path, param.opts[0], value, id=f"{' '.join(path)} {param.opts[0]}={value!r}"
                )

    yield from walk(typer.main.get_command(app), [])


@pytest.mark.parametrize(("command", "option", "value"), list(_cli_cases()))
def test_a_wrong_cli_option_is_a_message_not_a_traceback(
    tmp_path: Any, command: list[str], option: str, value: str
) -> None:
    from typer.testing import CliRunner

    from oncely.cli import app

    url = f"sqlite:///{tmp_path}/cli.db"
    assert CliRunner().invoke(app, ["init", url]).exit_code == 0
    args = [*command, url]
    if command[0] in ("barrier", "inbox", "outbox") and command[-1] == "purge":
        CliRunner().invoke(app, [command[0], "init", url] if command[0] == "barrier" else [])
    result = CliRunner().invoke(app, [*args, option, value])
    output = result.output + str(result.stderr_bytes or b"")
    assert "Traceback" not in output, output
    assert result.exception is None or isinstance(result.exception, SystemExit), (
        f"oncely {' '.join(args)} {option} {value!r} raised "
        f"{type(result.exception).__name__}: {result.exception}"
    )
