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

from oncely.demo.service import _children, _cmdline  # the demo's own /proc readers

from lock_workers import RedisServer

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


@pytest.mark.parametrize(
    ("url", "says"),
    [("bogus://x", "unknown store URL scheme"), ("redis://127.0.0.1:1/0", "unavailable")],
)
def test_demo_checks_its_store_at_start(tmp_path: Path, url: str, says: str) -> None:
    """A bad or unreachable --store: one line naming the URL and what to do, exit 1, before
    the shop starts. A bad scheme used to print a traceback; an unreachable Redis ran the storm
    against a shop answering 500s for 25 minutes."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "oncely.cli", "demo", "--store", url, "--workdir", str(tmp_path)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "COLUMNS": "160"}, start_new_session=True,
    )  # fmt: skip
    try:
        stdout, stderr = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired as exc:
        raise AssertionError("the demo was still running after 60 s") from exc
    finally:
        if proc.poll() is None:  # the demo and the shop's processes (its session)
            os.killpg(proc.pid, 9)
            proc.wait()
    out = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    assert out.returncode == 1, out.stderr[-2000:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: the demo's store"), out.stderr
    assert url in lines[0] and says in lines[0] and "--store" in lines[0]
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "protected" / "service.log").exists()  # no shop was started


@pytest.mark.serial  # asserts a wall-clock bound: run alone, after the parallel phase
@pytest.mark.timeout(200)
def test_demo_stops_with_one_line_when_its_store_goes_away_mid_run(
    tmp_path: Path, private_redis: RedisServer
) -> None:
    """The store (a Redis of this test's own) is killed while the storm runs: the demo ends
    within seconds with exit 1 and one error line naming the store, and the shop's log stays
    small (each request used to be retried 25 times against 500s with a traceback each)."""
    import select
    import time

    proc = subprocess.Popen(
        [sys.executable, "-m", "oncely.cli", "demo", "--store", private_redis.url, "--operations",
         "20000", "--no-contrast", "--no-faults", "--workdir", str(tmp_path)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "COLUMNS": "160"}, start_new_session=True,
    )  # fmt: skip
    try:
        assert proc.stderr is not None
        ready, _, _ = select.select([proc.stderr], [], [], 60)
        assert ready and "oncely on" in proc.stderr.readline()
        log = tmp_path / "protected" / "service.log"
        deadline = time.monotonic() + 60  # the storm has begun once the shop took requests
        while time.monotonic() < deadline:
            if private_redis.proc is not None and _keys(private_redis.url) > 20:
                break
            time.sleep(0.2)
        private_redis.stop()
        stopped = time.monotonic()
        _, err = proc.communicate(timeout=90)
        took = time.monotonic() - stopped
    finally:
        if proc.poll() is None:  # the demo and the shop's processes (its session)
            os.killpg(proc.pid, 9)
            proc.wait()
    assert proc.returncode == 1, err[-2000:]
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert (
        len(errors) == 1 and private_redis.url in errors[0] and "has not answered" in errors[0]
    ), err
    assert "Traceback" not in err
    assert took < 60, took
    assert not log.exists() or log.stat().st_size < 5_000_000


def _keys(url: str) -> int:
    import redis

    client = redis.Redis.from_url(url)
    try:
        return int(client.dbsize())
    finally:
        client.close()


@pytest.mark.parametrize("command", ["storm", "probe"])
def test_storm_and_probe_name_an_unreachable_url_and_what_to_check(command: str) -> None:
    """Nothing listens at the URL: one line naming it, the cause and what to check (it used to
    be only `TransportError: ClientConnectorError`), exit 2, no traceback."""
    from lock_workers import free_port

    url = f"http://127.0.0.1:{free_port()}"
    out = _oncely(command, url, "--json", timeout=60)
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot reach"), out.stderr
    assert url in lines[0] and "Cannot connect" in lines[0] and "check" in lines[0], lines[0]
    assert "Traceback" not in out.stderr


def _running(pid: int) -> bool:
    """Alive and not a zombie (an orphan that init has not reaped yet is gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _shop_processes(port: int) -> list[int]:
    """Every process serving the shop on ``port`` (its supervisor and its workers, whoever
    their parent is now)."""
    pids = [int(entry.name) for entry in Path("/proc").iterdir() if entry.name.isdigit()]
    return [p for p in pids if f"--port {port} " in _cmdline(p) + " " and _running(p)]


def _demo_mid_storm(tmp_path: Path) -> tuple[subprocess.Popen[str], int, int]:
    """A long demo run (its storm of 20,000 operations, no faults) on a port of its own, once
    its storm has begun (the ledger has rows): (the demo's process, the shop's port, the
    shop's supervisor pid). The demo gets the default SIGINT handler (a background job's
    SIGINT may be ignored by its shell)."""
    import signal
    import time
    import urllib.request

    from lock_workers import free_port

    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "oncely.cli", "demo", "--operations", "20000", "--no-contrast",
         "--no-faults", "--port", str(port), "--workdir", str(tmp_path)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "COLUMNS": "160"}, start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.default_int_handler),
    )  # fmt: skip
    deadline = time.monotonic() + 60
    ledger: list[object] = []
    while not ledger and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/ledger", timeout=5) as r:
                ledger = json.loads(r.read())
        except OSError:
            pass
    if not ledger:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise AssertionError("the storm did not start")
    supervisor = next(p for p in _children(proc.pid) if "shop.serve" in _cmdline(p))
    return proc, port, supervisor


@pytest.mark.serial  # asserts a wall-clock bound: run alone, after the parallel phase
@pytest.mark.timeout(150)
@pytest.mark.parametrize("kill", ["supervisor-and-workers", "supervisor"])
def test_demo_ends_with_one_line_when_its_shop_dies_mid_storm(tmp_path: Path, kill: str) -> None:
    """SIGKILL of the shop's supervisor (and its workers, or not: then they are orphans still
    serving) while the storm runs: the demo ends within seconds with exit 1 and one error line
    naming the shop's address, the step and the process that died, no traceback, and no shop
    process (supervisor, workers, settlers) left running. It used to retry for 30 s and end
    with a `TransportError` traceback (or, with a long storm, run for hours), and orphaned
    workers kept serving the port after the demo exited."""
    import signal
    import time

    proc, port, supervisor = _demo_mid_storm(tmp_path)
    shop: list[int] = []
    try:
        workers = _children(supervisor)
        settlers = [p for p in _children(proc.pid) if "shop.settler" in _cmdline(p)]
        shop = [supervisor, *workers, *settlers]
        assert len(workers) == 2 and len(settlers) == 2, (workers, settlers)
        for pid in [supervisor, *workers] if kill == "supervisor-and-workers" else [supervisor]:
            os.kill(pid, signal.SIGKILL)
        killed = time.monotonic()
        try:
            _, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired as exc:
            raise AssertionError("the demo was still running 60 s after its shop died") from exc
        took = time.monotonic() - killed
        left = [p for p in {*shop, *_shop_processes(port)} if _running(p)]
    finally:
        if proc.poll() is None:  # the demo and what is left of the shop
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        for pid in {*shop, *_shop_processes(port)}:
            if _running(pid):
                os.kill(pid, signal.SIGKILL)
    assert proc.returncode == 1, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err[-3000:]
    assert f"the shop at http://127.0.0.1:{port} stopped during the storm" in errors[0], errors
    assert f"its supervisor (pid {supervisor}) was killed by SIGKILL" in errors[0], errors
    assert took < 30, took
    assert not left, [(p, _cmdline(p)) for p in left]


@pytest.mark.timeout(150)
@pytest.mark.parametrize(("signum", "status", "name"), [(2, 130, "Ctrl-C"), (15, 143, "SIGTERM")])
def test_an_interrupted_demo_says_so_in_one_line_and_stops_its_shop(
    tmp_path: Path, signum: int, status: int, name: str
) -> None:
    """Ctrl-C (SIGINT) or SIGTERM to the demo while its storm runs: it stops its shop and ends
    with one error line saying it was interrupted, exit status 128 + the signal, no traceback
    and no shop process left. It used to end with no line at all (a retest of round 10)."""
    import signal

    proc, port, supervisor = _demo_mid_storm(tmp_path)
    shop: list[int] = []
    try:
        shop = [supervisor, *_children(supervisor)]
        shop += [p for p in _children(proc.pid) if "shop.settler" in _cmdline(p)]
        os.kill(proc.pid, signum)
        try:
            _, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired as exc:
            raise AssertionError(f"the demo was still running 60 s after {name}") from exc
        left = [p for p in {*shop, *_shop_processes(port)} if _running(p)]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        for pid in {*shop, *_shop_processes(port)}:
            if _running(pid):
                os.kill(pid, signal.SIGKILL)
    assert proc.returncode == status, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert errors == [
        f"error: interrupted ({name}) during the oncely on run; the shop was stopped"
    ], err[-3000:]
    assert not left, [(p, _cmdline(p)) for p in left]
