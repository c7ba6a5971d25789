"""``make demo`` keeps working: the demo runs and proves one execution per order."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_demo_runs_one_execution_per_order(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "demo.py")],
        env={"ONCELY_DEMO_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.count(": 1 charge(s)") == 3
    assert "ok: duplicates in, one execution out" in out.stdout
    assert (tmp_path / "oncely.db").exists()
