"""oncely.sql.transaction on Django's connection, alone and inside transaction.atomic(), on
SQLite, PostgreSQL and MariaDB (each in a fresh interpreter: Django settings are global)."""

from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


@pytest.mark.parametrize("vendor", ["sqlite", "postgresql", "mysql"])
def test_django_connection(vendor: str, tmp_path: Path) -> None:
    pytest.importorskip("django")
    if vendor == "mysql":
        pytest.importorskip("MySQLdb", reason="Django's MySQL backend needs mysqlclient")
    tag = uuid.uuid4().hex[:10]
    target = f"sqlite:{tmp_path / 'dj.db'}" if vendor == "sqlite" else vendor
    out = subprocess.run(
        [sys.executable, str(HERE / "sql_django_check.py"), target, f"okeys_{tag}", f"eff_{tag}"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=HERE.parent,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("OK")
