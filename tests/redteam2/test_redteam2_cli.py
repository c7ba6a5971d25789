"""Red-team findings (redteam2) on `oncely inbox purge` / `oncely outbox purge`: each test failed
before branch fix2 (xfail reasons: git history)."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

from oncely.messaging.inbox import Inbox


def _oncely(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "oncely", *args], capture_output=True, text=True, timeout=60
    )


def test_purge_cli_bad_table_name_is_a_message_not_a_traceback(tmp_path: Path) -> None:
    db = tmp_path / "shop.db"
    Inbox().create_table(sqlite3.connect(db))
    done = _oncely("inbox", "purge", f"sqlite:///{db}", "--older-than", "1d", "--table", "a;b")
    assert done.returncode == 1
    assert "Traceback" not in done.stderr, done.stderr
    assert "not a plain SQL identifier" in done.stderr + done.stdout


def test_purge_cli_does_not_create_a_missing_sqlite_file(tmp_path: Path) -> None:
    missing = tmp_path / "typo.db"
    done = _oncely("inbox", "purge", f"sqlite:///{missing}", "--older-than", "1d")
    assert done.returncode == 1
    assert not missing.exists()
