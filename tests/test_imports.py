"""The core imports no third-party package: drivers load only in the store that needs them."""

from __future__ import annotations

import subprocess
import sys

THIRD_PARTY = ["redis", "psycopg", "psycopg_pool", "pymysql", "aiomysql", "http_sf", "typer"]


def test_importing_oncely_loads_no_driver() -> None:
    code = (
        "import sys\n"
        "import oncely, oncely.functions, oncely.stores, oncely.locks, oncely.tokens\n"
        "import oncely.http, oncely.stores.memory, oncely.stores.sqlite\n"
        f"print([m for m in {THIRD_PARTY!r} if m in sys.modules])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
