"""URL helpers every backend shares: the scheme of a URL, a URL fit to be logged, and the
check that refuses query options a backend does not know (a typo is never ignored)."""

from __future__ import annotations

from collections.abc import Iterable

from oncely.settings import unknown_option

__all__ = ["check_options", "redact_url", "scheme_of"]


def check_options(given: Iterable[str], known: Iterable[str], url: str, what: str) -> None:
    """Refuse a URL query option that is not in ``known``, naming the closest known one.

    ``sqlite:///x.db?busy_timout=5`` must not silently run with the default timeout.

    :param what: the kind of URL, for the message (``"SQLite URL"``).
    :raises ConfigurationError: ``unknown option 'busy_timout'; did you mean 'busy_timeout'?``.
    """
    allowed = set(known)
    for name in given:
        if name not in allowed:
            raise unknown_option(name, allowed, f"{what} {redact_url(url)!r}")


def scheme_of(url: str) -> str:
    """The lowercase scheme of ``url`` without a SQLAlchemy driver part: ``postgresql`` for
    ``postgresql+psycopg://…``, ``mysql`` for ``MySQL+pymysql://…``; ``""`` if there is none."""
    scheme, sep, _ = url.partition("://")
    return scheme.lower().split("+", 1)[0] if sep else ""


def redact_url(url: str) -> str:
    """Hide a password in a URL so it can be logged."""
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return url
    creds, _, host = rest.rpartition("@")
    user = creds.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}" if ":" in creds else url
