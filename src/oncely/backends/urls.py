"""URL helpers every backend shares: the scheme of a URL, and a URL fit to be logged."""

from __future__ import annotations

__all__ = ["redact_url", "scheme_of"]


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
