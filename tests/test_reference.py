"""docs/reference.md documents every public name (each module's ``__all__``).

``make docs`` (in ``make test``) builds the site with ``--strict``, which fails on a broken
reference; this test checks coverage: the inventory of the built site must hold every name a
public module exports, so a new public function cannot be left out of the reference.
"""

from __future__ import annotations

import importlib
import subprocess
import sys
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PUBLIC = [
    "oncely",
    "oncely.functions",
    "oncely.core.records",
    "oncely.errors",
    "oncely.settings",
    "oncely.stores",
    "oncely.codecs",
    "oncely.locks",
    "oncely.locks.fencing",
    "oncely.optimistic",
    "oncely.optimistic.redis",
    "oncely.sql.versioned",
    "oncely.sql.sqlalchemy",
    "oncely.http.conditional",
    "oncely.tokens",
    "oncely.testing",
    "oncely.http",
    "oncely.http.config",
    "oncely.http.routes",
    "oncely.http.scopes",
    "oncely.http.fingerprint",
    "oncely.http.messages",
    "oncely.http.problems",
    "oncely.http.codec",
    "oncely.http.starlette",
    "oncely.http.fastapi",
    "oncely.http.flask",
    "oncely.http.django",
]


def inventory(site: Path) -> set[str]:
    raw = (site / "objects.inv").read_bytes()
    body = raw.split(b"\n", 4)[4]  # four header lines, then zlib
    return {line.split(" ", 1)[0] for line in zlib.decompress(body).decode().splitlines()}


def test_every_public_name_is_in_the_reference(tmp_path: Path) -> None:
    site = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet", "--site-dir", str(site)],
        cwd=ROOT,
        check=True,
    )
    documented = inventory(site)
    leaves = {name.rsplit(".", 1)[-1] for name in documented}
    missing = [
        f"{module}.{name}"
        for module in PUBLIC
        for name in importlib.import_module(module).__all__
        if f"{module}.{name}" not in documented and name not in leaves
    ]
    assert missing == [], f"not in docs/reference.md: {missing}"
