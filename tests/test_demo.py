"""``make demo`` keeps working: ``oncely demo`` runs the shop under the duplicate-and-fault
storm with oncely on (no double effect, no lost operation, no stock drift) and off (double
effects and oversold stock where the mechanism exists), and prints both side by side."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow


def _oncely(*args: str, timeout: float = 280) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "oncely.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "COLUMNS": "160"},
    )


@pytest.mark.timeout(300)
def test_demo_with_and_without_oncely(tmp_path: Path) -> None:
    out = _oncely("demo", "--operations", "150", "--json", "--seed", "7", "--workdir",
                  str(tmp_path))  # fmt: skip
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    on, off = json.loads(out.stdout)
    assert on["label"] == "oncely on" and off["label"] == "oncely off"

    assert on["operations"] == 150
    assert on["requests"] > on["operations"] * 3
    assert on["duplicates"] == 300
    assert on["double_effects"] == 0, on["double_effects_by_kind"]
    assert on["lost_operations"] == 0, on["lost_examples"]
    assert on["stock_drift"] == 0, on["stock_drift_by_sku"]
    assert on["bad_input"]["sent"] > 0 and on["bad_input"]["failures"] == 0
    assert on["effects_applied"] >= on["operations"]
    assert on["ok"] is True
    faults = " | ".join(on["faults"])
    assert "SIGKILL of web worker" in faults
    assert "SIGSTOP of settlement process" in faults
    assert on["lost_updates"] == 0, on["lost_updates_by_account"]
    assert on["operations_by_kind"].get("credit", 0) > 0
    assert on["operations_by_kind"].get("cancel", 0) > 0
    assert on["operations_by_kind"].get("webhook", 0) > 0
    assert on["operations_by_kind"].get("ship", 0) > 0
    assert on["skipped"] == {}

    # the same storm with oncely switched off: duplicates place orders again, take the stock
    # again, and the settlement jobs pay orders out twice
    assert off["double_effects_by_kind"].get("order", 0) > 0
    assert off["stock_drift"] > 0
    # credits: read-modify-write without If-Match overwrites concurrent credits
    assert off["lost_updates"] > 0
    assert off["double_effects_by_kind"].get("credit", 0) > 0
    assert off["double_effects_by_kind"].get("restock", 0) > 0
    assert off["double_effects_by_kind"].get("webhook", 0) > 0
    assert off["double_effects_by_kind"].get("ship", 0) > 0
    assert off["ok"] is False
    assert off["bad_input"]["failures"] == 0
    assert (tmp_path / "protected" / "shop.db").exists()


def test_decorator_example_runs_one_execution_per_order(tmp_path: Path) -> None:
    """examples/decorator_demo.py: 3 processes x many threads, one execution per order."""
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "decorator_demo.py")],
        env={"ONCELY_DEMO_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.count(": 1 charge(s)") == 3
    assert "ok: duplicates in, one execution out" in out.stdout
    assert (tmp_path / "oncely.db").exists()


@pytest.mark.timeout(200)
def test_storm_exits_non_zero_on_double_effects(tmp_path: Path) -> None:
    """`oncely storm URL` against the unprotected shop fails; against the shop it passes."""
    import secrets

    from oncely.demo.service import Service
    from oncely.demo.shop.settings import Settings

    for protected, code in ((True, 0), (False, 1)):
        settings = Settings(
            workdir=tmp_path / str(protected),
            protected=protected,
            run=secrets.token_hex(4),
            secret=secrets.token_urlsafe(32),
        )
        with Service(settings, settlers=0) as shop:
            out = _oncely("storm", shop.url, "-n", "60", "--seed", "3")
        assert out.returncode == code, out.stdout[-3000:] + out.stderr[-2000:]
        assert "double effects" in out.stdout and "lost operations" in out.stdout
        assert "skipped" not in out.stdout
