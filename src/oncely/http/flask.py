"""Flask helpers: install the WSGI middleware with route rules, and mark views.

::

    from flask import Flask
    from oncely.http import IdempotencyConfig, idempotent_route
    from oncely.http.flask import install, require_token

    app = Flask(__name__)
    install(app, IdempotencyConfig(store="redis://localhost:6379/0",
                                   scope=lambda request: request.raw.get("REMOTE_USER")))

    @app.post("/payments")
    @idempotent_route(fingerprint=["amount"])
    def pay(): ...

    @app.route("/checkout", methods=["GET", "POST"])
    @require_token("checkout")          # a double-submitted form has one effect
    def checkout(): ...

The decorators only mark views; the middleware (installed around ``app.wsgi_app``) finds the
view Flask will dispatch to and applies its rule before the view runs. ``install`` also tells
the middleware when Flask actually calls a view: a request Flask refuses before that (routing
404/405, a ``before_request`` function that answers or raises, e.g. a CSRF check) is sent as
it is and does not use up its key. A view that raises an exception no error handler of the
app takes gets Flask's 500 page (``got_request_exception`` tells the middleware), which is kept
for its key as the ``500`` ``handler-failed`` problem: a retry gets that problem, replayed.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

from flask import Flask, got_request_exception, request
from werkzeug.exceptions import HTTPException
from werkzeug.routing import RequestRedirect

from oncely.errors import ConfigurationError, HttpProblem
from oncely.http.config import IdempotencyConfig
from oncely.http.engine import SAFE_METHODS
from oncely.http.messages import ENTRY_KEY, HandlerEntry
from oncely.http.routes import MARKER, Rule, idempotent_route, rule_of
from oncely.http.wsgi import INFO_KEY, WSGIIdempotencyMiddleware

__all__ = ["FlaskResolver", "conditional", "install", "require_token"]

F = TypeVar("F", bound=Callable[..., Any])


_TRACKING = "__oncely_entry__"


def _view_raised(sender: Flask, exception: BaseException, **extra: Any) -> None:
    """Flask's ``got_request_exception``: an exception no error handler of the app took (Flask
    answers it with its 500 page); the middleware keeps that 500 as ``handler-failed``."""
    entry = request.environ.get(ENTRY_KEY)
    if isinstance(entry, HandlerEntry) and not isinstance(exception, HttpProblem):
        entry.raised()


def _track_entry(app: Flask) -> None:
    """Wrap ``app.dispatch_request`` (after ``before_request`` functions, where Flask calls
    the view) to report the view's start to the middleware (:class:`HandlerEntry`), and
    report an exception Flask answers with its own 500 (``got_request_exception``)."""
    original = app.dispatch_request
    if getattr(original, _TRACKING, False):
        return
    got_request_exception.connect(_view_raised, app, weak=False)

    @functools.wraps(original)
    def dispatch_request(*args: Any, **kwargs: Any) -> Any:
        entry = request.environ.get(ENTRY_KEY)
        if isinstance(entry, HandlerEntry) and request.routing_exception is None:
            entry.started()
        return original(*args, **kwargs)

    setattr(dispatch_request, _TRACKING, True)
    app.dispatch_request = dispatch_request  # type: ignore[method-assign]


class FlaskResolver:
    """Callable ``environ -> Rule | None``: the rule of the view Flask will dispatch to.

    Building one also makes ``app`` report when it calls a view (``tracks_entry``), so that a
    request refused before its view does not use up its key.
    """

    #: The middleware learns from Flask when a view starts (see :class:`HandlerEntry`).
    tracks_entry = True

    def __init__(self, app: Flask) -> None:
        self.app = app
        self._marked: bool | None = None
        _track_entry(app)

    def _any_marked(self) -> bool:
        for view in self.app.view_functions.values():
            if rule_of(view) is not None:
                return True
            view_class = getattr(view, "view_class", None)
            if view_class is not None and any(
                rule_of(getattr(view_class, m, None)) is not None
                for m in ("post", "put", "patch", "delete", "get", "dispatch_request")
            ):
                return True
        return False

    def __call__(self, environ: dict[str, Any]) -> Rule | None:
        if self._marked is None:
            self._marked = self._any_marked()
        if not self._marked:
            return None
        try:
            endpoint, _ = self.app.url_map.bind_to_environ(environ).match()
        except (HTTPException, RequestRedirect):
            return None
        view = self.app.view_functions.get(endpoint)
        rule = rule_of(view)
        if rule is None:
            view_class = getattr(view, "view_class", None)
            method = environ.get("REQUEST_METHOD", "").lower()
            rule = rule_of(getattr(view_class, method, None)) or rule_of(
                getattr(view_class, "dispatch_request", None)
            )
        return rule


def install(app: Flask, config: IdempotencyConfig | None = None, **options: Any) -> Any:
    """Wrap ``app.wsgi_app`` in the middleware (with a route resolver); returns the middleware."""
    middleware = WSGIIdempotencyMiddleware(
        app.wsgi_app, config, resolver=FlaskResolver(app), **options
    )
    app.wsgi_app = middleware  # type: ignore[method-assign]
    app.extensions["oncely"] = middleware
    return middleware


def require_token(purpose: str, **settings: Any) -> Callable[[F], F]:
    """Mark a view as requiring a one-time token of ``purpose`` on unsafe methods (the
    middleware's :class:`~oncely.http.config.TokenGuard` checks and consumes it)."""
    rule = idempotent_route(token=purpose, **settings)

    def decorate(view: F) -> F:
        @functools.wraps(view)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            _check(request.environ, request.method, purpose)
            return view(*args, **kwargs)

        setattr(wrapper, MARKER, rule)
        return wrapper  # type: ignore[return-value]

    return decorate


def _check(environ: dict[str, Any], method: str, purpose: str) -> None:
    if INFO_KEY not in environ:
        raise ConfigurationError(
            "this view requires a one-time token but the oncely middleware is not installed; "
            "call oncely.http.flask.install(app, config)"
        )
    if method in SAFE_METHODS:
        return
    info = environ[INFO_KEY]
    if info is None or info.token_purpose != purpose:
        raise ConfigurationError(
            f"the one-time token of purpose {purpose!r} was not checked for {method}; pass "
            "tokens=TokenGuard(...) to the config"
        )


def conditional(app: Flask, **options: Any) -> Any:
    """Conditional requests for a Flask app (:mod:`oncely.http.conditional`): wraps
    ``app.wsgi_app`` in :class:`~oncely.http.conditional.WSGIConditionalMiddleware` (428
    without ``If-Match`` on ``methods`` under ``paths``, 400 for a malformed one) and registers
    error handlers answering :class:`~oncely.errors.StaleVersion` and
    :class:`~oncely.errors.PreconditionFailed` with 412, and :class:`~oncely.errors.NotFound`
    with 412 if the request sent ``If-Match``, else 404 (Flask turns view exceptions into 500
    before a WSGI middleware sees them). ``options``: ``methods``, ``paths``,
    ``problem_base``. Returns the middleware.
    """
    from flask import Response, request

    from oncely.errors import (
        InvalidIfMatch,
        NotFound,
        PreconditionFailed,
        PreconditionRequired,
        StaleVersion,
    )
    from oncely.http.conditional import IF_MATCH_KEY, WSGIConditionalMiddleware, problem_for

    middleware = WSGIConditionalMiddleware(app.wsgi_app, **options)
    base = middleware.rule.base

    def handle(exc: Exception) -> Any:
        sent = request.environ.get(IF_MATCH_KEY) is not None
        answer = problem_for(exc, base, if_match=sent)
        if answer is None:  # pragma: no cover - registered for these types only
            raise exc
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in answer.headers]
        return Response(answer.body, status=answer.status, headers=headers)

    for kind in (StaleVersion, NotFound, PreconditionFailed, PreconditionRequired, InvalidIfMatch):
        app.register_error_handler(kind, handle)
    app.wsgi_app = middleware  # type: ignore[method-assign]
    return middleware
