"""Settings: one precedence rule (argument, then ``ONCELY_<NAME>``, then default) everywhere.

Every component that takes a plain-valued option reads it through :mod:`oncely.settings`; these
tests set the environment and build the real objects (decorator, HTTP config and middleware,
tokens, locks) to see which value won, and feed bad values from every source.
"""

from __future__ import annotations

import re
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from oncely import ConfigurationError, idempotent
from oncely import settings as settings_module
from oncely.errors import SettingWarning
from oncely.http import IdempotencyConfig, Rule
from oncely.http.asgi import IdempotencyMiddleware
from oncely.http.scopes import GLOBAL
from oncely.locks import Lock
from oncely.settings import SETTINGS, check_environment, parse_duration, parse_size, resolve
from oncely.tokens import Tokens

ROOT = Path(__file__).resolve().parent.parent
SECRET = "s" * 32


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No ONCELY_* variable from the caller's shell leaks into these tests."""
    import os

    for name in [n for n in os.environ if n.startswith("ONCELY_")]:
        monkeypatch.delenv(name)
    monkeypatch.setattr(settings_module, "_warned", set())


# -- the value syntax -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("30", 30.0),
        ("1.5", 1.5),
        (".5", 0.5),
        ("500ms", 0.5),
        ("30s", 30.0),
        ("5m", 300.0),
        ("24h", 86400.0),
        ("1d", 86400.0),
        (" 2h ", 7200.0),
        ("1e3", 1000.0),
    ],
)
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds
    assert resolve("ttl", text) == seconds
    assert resolve("ttl", environ={"ONCELY_TTL": text}) == seconds


@given(st.integers(min_value=0, max_value=10**6), st.sampled_from(["", "s", "m", "h", "d", "ms"]))
def test_every_whole_number_with_a_unit_parses(number: int, unit: str) -> None:
    factor = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "ms": 0.001}[unit]
    assert parse_duration(f"{number}{unit}") == pytest.approx(number * factor)


@pytest.mark.parametrize(
    "text", ["5 minutes", "5x", "5M", "m", "", "1h30m", "-5", "abc", "1,5", "5mn", "0x10"]
)
def test_bad_durations_name_the_units(text: str) -> None:
    with pytest.raises(ValueError, match=r"500ms, 30s, 5m \(minutes\), 24h, 1d"):
        parse_duration(text)


@pytest.mark.parametrize(
    ("text", "size"),
    [("1048576", 1 << 20), ("1MiB", 1 << 20), ("512KiB", 512 * 1024), ("10MB", 10**7), ("0", 0)],
)
def test_sizes(text: str, size: int) -> None:
    assert parse_size(text) == size
    assert resolve("http_max_request_body", environ={"ONCELY_HTTP_MAX_REQUEST_BODY": text}) == size


@pytest.mark.parametrize("text", ["1.5MiB", "1 megabyte", "-1", "1TiB", "MiB"])
def test_bad_sizes(text: str) -> None:
    with pytest.raises(ValueError):
        parse_size(text)


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("ttl", 0, "ttl=0 is not valid: must be positive seconds"),
        ("ttl", -1, "ttl=-1 is not valid: must be positive seconds"),
        ("ttl", float("nan"), "finite"),
        ("ttl", float("inf"), "finite"),
        ("ttl", True, "ttl=True is not valid: expected a number, got bool"),
        ("ttl", [30], "expected a number, got list"),
        ("ttl", "5 minutes", "unknown unit 'minutes'"),
        ("ttl", "five", "not a duration"),
        ("ttl", "30x", "unknown unit 'x'"),
        ("wait_timeout", -0.5, "must be 0 seconds or more"),
        ("fail_open", "yes", "fail_open='yes' is not valid: expected True or False, got str"),
        ("fail_open", 1, "expected True or False, got int"),
        ("on_duplicate", "skip", "must be one of 'wait', 'raise'"),
        ("cache_size", -1, "must be 0 or more"),
        ("cache_size", 1.5, "expected a whole number, got float"),
        ("http_methods", "POST", "takes a list"),
        ("http_max_key_length", 5000, "between 1 and 4096"),
        ("http_retry_after", 1.5, "whole number of seconds"),
        ("http_transient_statuses", [42], "between 100 and 599"),
        ("http_max_request_body", -1, "0 or more bytes"),
        ("http_header", "", "must not be empty"),
        ("store", "oncely.db", "not a URL"),
        ("lock_ttl", 0.0001, "0.001 seconds or more"),
    ],
)
def test_bad_values_in_code_name_the_argument_and_the_value(
    name: str, value: Any, message: str
) -> None:
    with pytest.raises(ConfigurationError, match=re.escape(message)):
        resolve(name, value, where="here")
    with pytest.raises(ConfigurationError, match=r"^here: "):
        resolve(name, value, where="here")


@pytest.mark.parametrize(
    ("variable", "text", "message"),
    [
        ("ONCELY_TTL", "5 minutes", "unknown unit 'minutes'"),
        ("ONCELY_TTL", "1h30m", "not a duration"),
        ("ONCELY_TTL", "0", "must be positive seconds"),
        ("ONCELY_LEASE", "30x", "unknown unit 'x'"),
        ("ONCELY_FAIL_OPEN", "maybe", "not a boolean; use 1/true/yes/on or 0/false/no/off"),
        ("ONCELY_CACHE_SIZE", "ten", "not a whole number"),
        ("ONCELY_ON_DUPLICATE", "ignore", "must be one of 'wait', 'raise'"),
        ("ONCELY_HTTP_MAX_STORED_BODY", "1 gig", "unknown unit 'gig'"),
        ("ONCELY_HTTP_MAX_STORED_BODY", "1.5MiB", "not a size"),
        ("ONCELY_HTTP_TRANSIENT_STATUSES", "429,abc", "not a whole number"),
        ("ONCELY_STORE", "redis", "not a URL"),
        ("ONCELY_LOCK_TIMEOUT", "soon", "not a duration"),
    ],
)
def test_bad_environment_values_name_the_variable(variable: str, text: str, message: str) -> None:
    with pytest.raises(ConfigurationError) as caught:
        resolve("ttl", environ={variable: text})
    assert f"environment variable {variable}={text!r} is not valid" in str(caught.value)
    assert message in str(caught.value)


def test_booleans_from_the_environment() -> None:
    for text in ("1", "true", "TRUE", "yes", "on", " On "):
        assert resolve("fail_open", environ={"ONCELY_FAIL_OPEN": text}) is True
    for text in ("0", "false", "No", "off"):
        assert resolve("fail_open", environ={"ONCELY_FAIL_OPEN": text}) is False


def test_lists_from_the_environment() -> None:
    env = {"ONCELY_HTTP_METHODS": "POST, PUT,,DELETE", "ONCELY_HTTP_TRANSIENT_STATUSES": "429"}
    assert resolve("http_methods", environ=env) == ("POST", "PUT", "DELETE")
    assert resolve("http_transient_statuses", environ=env) == (429,)


def test_an_empty_variable_counts_as_unset() -> None:
    assert resolve("ttl", environ={"ONCELY_TTL": ""}) == 86400.0
    assert resolve("store", environ={"ONCELY_STORE": "  "}) == "sqlite:///oncely.db"


def test_a_secret_is_never_printed() -> None:
    with pytest.raises(ConfigurationError) as caught:
        resolve("token_secret", 12345, where="Tokens", param="secret")
    assert "12345" not in str(caught.value) and "<hidden>" in str(caught.value)


def test_a_required_setting_given_nowhere_says_both_ways() -> None:
    with pytest.raises(ConfigurationError, match=r"Tokens: secret= is required.*TOKEN_SECRET"):
        Tokens(store="memory://")


# -- unknown names --------------------------------------------------------------------------------
def test_an_unknown_variable_warns_with_the_closest_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ONCELY_TTLL", "60")
    with pytest.warns(SettingWarning, match=r"ONCELY_TTLL is not an oncely setting.*ONCELY_TTL\?"):

        @idempotent(store="memory://", key=["k"])
        def fn(k: str) -> int:
            return 1

    # once per name and process
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_environment()
    # and the misspelt value was not used
    assert fn.idempotency.policy.ttl == 86400.0  # type: ignore[attr-defined]


def test_misspelt_http_and_lock_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ONCELY_HTTP_MAX_BODY", "1")
    monkeypatch.setenv("ONCELY_LOCK_TTLS", "1")
    with pytest.warns(SettingWarning) as record:
        check_environment()
    messages = sorted(str(w.message) for w in record)
    assert "did you mean ONCELY_HTTP_MAX_STORED_BODY?" in messages[0] or (
        "did you mean ONCELY_HTTP_MAX_REQUEST_BODY?" in messages[0]
    )
    assert "did you mean ONCELY_LOCK_TTL?" in messages[1]


def test_a_bad_value_anywhere_stops_start_up(monkeypatch: pytest.MonkeyPatch) -> None:
    # The decorator does not read HTTP settings, but a broken one still stops it: every
    # ONCELY_* variable is checked the first time settings are read.
    monkeypatch.setenv("ONCELY_HTTP_WAIT", "forever")
    with pytest.raises(ConfigurationError, match="ONCELY_HTTP_WAIT='forever'"):

        @idempotent(store="memory://", key=["k"])
        def fn(k: str) -> int:
            return 1


def test_a_misspelt_lock_option_suggests_the_closest(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/locks.db"
    with pytest.raises(ConfigurationError, match=r"unknown option 'tabel'; did you mean 'table'\?"):
        Lock(url, "x", tabel="mine")
    with pytest.raises(ConfigurationError, match=r"unknown option 'ttls'; did you mean 'ttl'\?"):
        Lock(url, "x", ttls=5)


# -- each component follows the rule ------------------------------------------------------------
def test_decorator_precedence(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ONCELY_TTL", "1h")
    monkeypatch.setenv("ONCELY_LEASE", "10s")
    monkeypatch.setenv("ONCELY_ON_DUPLICATE", "raise")
    monkeypatch.setenv("ONCELY_WAIT_TIMEOUT", "2m")
    monkeypatch.setenv("ONCELY_FAIL_OPEN", "true")
    monkeypatch.setenv("ONCELY_CACHE_SIZE", "10")
    monkeypatch.setenv("ONCELY_STORE", "memory://")

    @idempotent(key=["k"])
    def from_env(k: str) -> int:
        return 1

    policy = from_env.idempotency.policy  # type: ignore[attr-defined]
    assert (policy.ttl, policy.lease, policy.on_duplicate) == (3600.0, 10.0, "raise")
    assert (policy.wait_timeout, policy.fail_open) == (120.0, True)
    assert policy.cache is not None
    assert from_env.idempotency.store.url == "memory://"  # type: ignore[attr-defined]

    @idempotent(key=["k"], ttl=60, lease="5s", on_duplicate="wait", fail_open=False, cache_size=0)
    def explicit(k: str) -> int:
        return 1

    policy = explicit.idempotency.policy  # type: ignore[attr-defined]
    assert (policy.ttl, policy.lease, policy.on_duplicate, policy.fail_open) == (
        60.0,
        5.0,
        "wait",
        False,
    )
    assert policy.cache is None


def test_decorator_errors_name_the_function_and_argument() -> None:
    with pytest.raises(ConfigurationError, match=r"^@idempotent billing\.charge: ttl='5 min'"):

        @idempotent(store="memory://", name="billing.charge", key=["k"], ttl="5 min")
        def charge(k: str) -> int:
            return 1


def test_http_config_precedence(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ONCELY_STORE", "memory://")
    monkeypatch.setenv("ONCELY_TTL", "2h")
    monkeypatch.setenv("ONCELY_HTTP_WAIT", "3s")
    monkeypatch.setenv("ONCELY_HTTP_METHODS", "POST,PUT")
    monkeypatch.setenv("ONCELY_HTTP_MAX_STORED_BODY", "64KiB")
    monkeypatch.setenv("ONCELY_HTTP_REQUIRED", "no")
    monkeypatch.setenv("ONCELY_HTTP_NAMESPACE", "api")
    config = IdempotencyConfig(scope=GLOBAL, ttl=60)
    assert config.store == "memory://"
    assert (config.ttl, config.wait, config.methods) == (60.0, 3.0, ("POST", "PUT"))
    assert (config.max_stored_body, config.required, config.namespace) == (65536, False, "api")
    assert config.lease == 30.0 and config.header == "Idempotency-Key"
    # The middleware uses the resolved store: no second copy of the rule in the engine.
    middleware = IdempotencyMiddleware(lambda *a: None, config)
    assert middleware.engine.store.url == "memory://"


def test_http_config_errors_name_the_field(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigurationError, match=r"^IdempotencyConfig: wait='soon' is not valid"):
        IdempotencyConfig(scope=GLOBAL, store="memory://", wait="soon")
    with pytest.raises(ConfigurationError, match=r"^IdempotencyConfig: methods='POST'"):
        IdempotencyConfig(scope=GLOBAL, store="memory://", methods="POST")
    with pytest.raises(ConfigurationError, match=r"^Rule: ttl=-5 is not valid"):
        Rule(ttl=-5)
    assert Rule(ttl="10m", max_request_body="1KiB").ttl == 600.0


def test_tokens_precedence(monkeypatch: pytest.MonkeyPatch) -> None:
    # Tokens used to require its store and ignored $ONCELY_STORE.
    monkeypatch.setenv("ONCELY_STORE", "memory://")
    monkeypatch.setenv("ONCELY_TOKEN_SECRET", f"{'n' * 20},{'o' * 20}")
    monkeypatch.setenv("ONCELY_TOKEN_TTL", "10m")
    tokens = Tokens()
    assert tokens.store.url == "memory://" and tokens.default_ttl == 600.0
    signed_by_first = tokens.issue("user", "checkout")
    assert Tokens(["n" * 20]).verify(signed_by_first, "user", "checkout").purpose == "checkout"
    signed_by_old_key = Tokens(["o" * 20]).issue("user", "checkout")  # rotation: still verifies
    assert tokens.verify(signed_by_old_key, "user", "checkout").purpose == "checkout"
    assert Tokens(SECRET, default_ttl=5).default_ttl == 5.0


def test_lock_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/locks.db"
    monkeypatch.setenv("ONCELY_LOCK_TTL", "2m")
    monkeypatch.setenv("ONCELY_LOCK_TIMEOUT", "5s")
    monkeypatch.setenv("ONCELY_LOCK_AUTO_RENEW", "1")
    lock = Lock(url, "from-env")
    assert (lock.lease, lock.timeout, lock.auto_renew) == (120.0, 5.0, True)
    lock = Lock(url, "explicit", ttl=10, timeout=-1, auto_renew=False)
    assert (lock.lease, lock.timeout, lock.auto_renew) == (10.0, None, False)
    monkeypatch.setenv("ONCELY_LOCK_TIMEOUT", "forever")
    assert Lock(url, "forever").timeout is None
    with pytest.raises(ConfigurationError, match=r"^Lock 'x': ttl=0 is not valid"):
        Lock(url, "x", ttl=0)


def test_no_copy_of_the_rule_is_left() -> None:
    """Only oncely.settings reads ONCELY_* variables."""
    offenders = [
        str(path.relative_to(ROOT))
        for path in (ROOT / "src" / "oncely").rglob("*.py")
        if path.name != "settings.py" and re.search(r"environ.*ONCELY_", path.read_text())
    ]
    assert offenders == []


def test_every_setting_is_documented() -> None:
    text = (ROOT / "docs" / "settings.md").read_text()
    for setting in SETTINGS.values():
        row = next((line for line in text.splitlines() if f"`{setting.env}`" in line), None)
        assert row is not None, f"{setting.env} is not in docs/settings.md"
        for user in setting.used_by:
            assert user.split("(")[0] in row, (setting.env, user)


def test_settings_import_only_the_standard_library() -> None:
    code = (
        "import sys; before = set(sys.modules)\n"
        "import oncely.settings\n"
        "print(sorted(m for m in set(sys.modules) - before if not m.startswith(('oncely', '_'))"
        " and m.split('.')[0] not in sys.stdlib_module_names))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
