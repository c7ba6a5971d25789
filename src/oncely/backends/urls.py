"""URL helpers every backend shares: the scheme of a URL, a URL fit to be logged, and the
check that refuses query options a backend does not know (a typo is never ignored)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs

from oncely.errors import ConfigurationError
from oncely.settings import plain_number, seconds, unknown_option

__all__ = [
    "Number",
    "check_numbers",
    "check_options",
    "query_options",
    "redact_url",
    "scheme_of",
]


@dataclass(frozen=True, slots=True)
class Number:
    """How a numeric option of a URL (or a keyword option) is read and range-checked.

    ``whole``: a whole number (a count, a port), else seconds; ``minimum`` and ``maximum``
    bound it (``above``: strictly above ``minimum``); ``units``: seconds may carry a unit
    (``"5s"``, oncely reads the option) or must be a plain number (the driver reads the text).
    """

    whole: bool = False
    minimum: float = 0.0
    above: bool = False
    maximum: float | None = None
    units: bool = True


def check_numbers(
    options: Mapping[str, Any], numbers: Mapping[str, Number], url: str, what: str
) -> dict[str, Any]:
    """Parse and range-check the numeric options among ``options`` (a ``parse_qs`` mapping of
    lists, or keyword values) when the store is built, not at its first call.

    :returns: each numeric option given, converted (int, or float seconds).
    :raises ConfigurationError: a value that is not a number of the right kind or is out of
        range; the message names the option, the value and the URL.
    """
    where = f"{what} {redact_url(url)!r}"
    found: dict[str, Any] = {}
    for name, spec in numbers.items():
        if name not in options:
            continue
        value = options[name]
        if value is None:  # a keyword option left unset
            continue
        if isinstance(value, list):
            value = value[-1] if value else ""
        found[name] = _number(value, name, spec, where)
    return found


def _number(value: Any, name: str, spec: Number, where: str) -> Any:
    if spec.whole:
        number: Any = value
        if isinstance(value, str):
            try:
                number = int(plain_number(value, whole=True))
            except ValueError:
                number = None
        if isinstance(number, bool) or not isinstance(number, int):
            raise ConfigurationError(f"{where}: {name}={value!r} is not valid: give a whole number")
        low_ok = number > spec.minimum if spec.above else number >= spec.minimum
        if not low_ok or (spec.maximum is not None and number > spec.maximum):
            bound = f"{'above' if spec.above else 'at least'} {spec.minimum:g}"
            if spec.maximum is not None:
                bound += f" and at most {spec.maximum:g}"
            raise ConfigurationError(f"{where}: {name}={value!r} is not valid: must be {bound}")
        return number
    if isinstance(value, str) and not spec.units:
        try:
            plain_number(value)
        except ValueError:
            raise ConfigurationError(
                f"{where}: {name}={value!r} is not valid: give a plain number of seconds"
            ) from None
    return seconds(
        value, name, where=where, minimum=spec.minimum, above=spec.above, maximum=spec.maximum
    )


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


def query_options(query: str, url: str, what: str) -> dict[str, list[str]]:
    """The options of a URL's ``query`` (the part after ``?``), as :func:`urllib.parse.parse_qs`
    gives them (name -> list of values, blank values kept), each given once.

    ``?socket_timeout=1&socket_timeout=2`` is refused: which one was meant is not known, and
    each driver picks another (the first, the last, or all).

    :param what: the kind of URL, for the message (``"SQLite URL"``).
    :raises ConfigurationError: an option given twice or more; the message names it.
    """
    options = parse_qs(query, keep_blank_values=True)
    for name, values in options.items():
        if len(values) > 1:
            raise ConfigurationError(
                f"{what} {redact_url(url)!r}: option {name!r} is given {len(values)} times "
                f"({', '.join(map(repr, values))}); give it once"
            )
    return options


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
