"""A smoke run of ``benchmarks/scale.py`` (the growth curves) on a tiny configuration: every part
measures something real, the saved measurements render the docs section and the plots."""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture
def scale() -> Iterator[Any]:
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import scale as module

        yield module
    finally:
        sys.path.remove(str(BENCHMARKS))


def test_quick_run_measures_every_part_and_renders(scale: Any, tmp_path: Path) -> None:
    if shutil.which("redis-server") is None:  # pragma: no cover - depends on the machine
        pytest.skip("redis-server is not installed")
    pytest.importorskip("matplotlib")
    saved = tmp_path / "scale.json"
    scale.main(
        ["--quick", "--seconds", "0.05", "--stores", "memory,sqlite,redis", "--save", str(saved)]
    )
    data = json.loads(saved.read_text())
    points = {(p["store"], p["face"], p["phase"], p["concurrency"]) for p in data["points"]}
    for store, faces in (
        ("memory", ("sync", "async")),
        ("sqlite", ("sync",)),
        ("redis", ("sync", "async")),
    ):
        for face in faces:
            for phase in ("first", "replay"):
                assert {c for s, f, ph, c in points if (s, f, ph) == (store, face, phase)} == {
                    1,
                    2,
                    4,
                }
    assert all(p["calls"] > 0 and len(p["latencies"]) == p["calls"] for p in data["points"])
    sizes = {(s["store"], s["result"], s["keys"]): s for s in data["sizes"]}
    assert {k[0] for k in sizes} == {"sqlite", "redis", "redis (layout before)"}
    assert all(s["bytes_per_key"] > 0 for s in sizes.values())
    redis_100 = sizes[("redis", "100-byte JSON", 500)]
    assert redis_100["memory_usage"] <= 2 * 100 + 200  # issue 13's target, in the real layout
    before = sizes[("redis (layout before)", "100-byte JSON", 200)]
    assert before["memory_usage"] > 2 * redis_100["memory_usage"]  # the reference, same run
    purged = {(p["store"], p["how"]): p["records"] for p in data["purges"]}
    assert purged[("memory", "purge_expired(100) loop")] == 300
    assert purged[("sqlite", "purge_expired(100) loop")] == 300
    assert purged[("sqlite", "`oncely purge --batch 100`")] == 300
    points_, sizes_, purges_ = (
        [scale.Point(**p) for p in data["points"]],
        [scale.Size(**s) for s in data["sizes"]],
        [scale.Purge(**p) for p in data["purges"]],
    )
    made = scale.plot(points_, sizes_, purges_, tmp_path)
    assert made == ["perf-concurrency.png", "perf-bytes-per-key.png", "perf-purge.png"]
    assert all((tmp_path / name).read_bytes().startswith(b"\x89PNG") for name in made)
    body = scale.section(data["command"], points_, sizes_, purges_, made)
    assert "| redis | async | 4 |" in body and "Bytes per stored key" in body
