"""The storm's HTML report is self-contained and its charts render in a real browser
(Debian's headless Chromium); the screenshot in docs/ comes from the same code path."""

from __future__ import annotations

import os
import re
import secrets
import shutil
import struct
import subprocess
import zlib
from pathlib import Path

import pytest

from oncely.demo.report import html_report, write_html
from oncely.demo.service import Service
from oncely.demo.shop.settings import Settings
from oncely.demo.storm import StormConfig, StormResult, run_storm

ROOT = Path(__file__).resolve().parent.parent
DOCS_SHOT = ROOT / "docs" / "demo-report.png"

pytestmark = pytest.mark.slow


def chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


def screenshot(html: Path, png: Path, profile: Path, height: int = 2600) -> str:
    """Render ``html`` headless; returns the DOM Chromium built (for checks)."""
    browser = chromium()
    assert browser is not None
    flags = [
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={profile}", "--hide-scrollbars", f"--window-size=1000,{height}",
    ]  # fmt: skip
    subprocess.run(
        [browser, *flags, f"--screenshot={png}", html.as_uri()],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    dom = subprocess.run(
        [browser, *flags, "--dump-dom", html.as_uri()],
        check=True, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    return dom.stdout


def png_colours(png: Path) -> int:
    """How many distinct RGB colours the PNG's pixels use (8-bit RGB/RGBA, any filter)."""
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, width, height, kind = 8, b"", 0, 0, 0
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        tag, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        if tag == b"IHDR":
            width, height, depth, kind = struct.unpack(">IIBB", body[:10])
            assert depth == 8 and kind in (2, 6)
        elif tag == b"IDAT":
            idat += body
        pos += 12 + length
    raw = zlib.decompress(idat)
    bpp = 3 if kind == 2 else 4
    stride = width * bpp
    prev = bytearray(stride)
    colours: set[bytes] = set()
    for y in range(height):
        filt, line = (
            raw[y * (stride + 1)],
            bytearray(raw[y * (stride + 1) + 1 : (y + 1) * (stride + 1)]),
        )
        for i in range(stride):
            a = line[i - bpp] if i >= bpp else 0
            b, c = prev[i], prev[i - bpp] if i >= bpp else 0
            if filt == 1:
                line[i] = (line[i] + a) & 255
            elif filt == 2:
                line[i] = (line[i] + b) & 255
            elif filt == 3:
                line[i] = (line[i] + (a + b) // 2) & 255
            elif filt == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                pred = a if pa <= pb and pa <= pc else b if pb <= pc else c
                line[i] = (line[i] + pred) & 255
        if y % 4 == 0:
            colours.update(bytes(line[i : i + 3]) for i in range(0, stride, bpp * 2))
        prev = line
    return len(colours)


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> list[StormResult]:
    out = []
    for protected in (True, False):
        settings = Settings(
            workdir=tmp_path_factory.mktemp("shop"),
            protected=protected,
            run=secrets.token_hex(4),
            secret=secrets.token_urlsafe(32),
        )
        with Service(settings, settlers=1) as shop:
            config = StormConfig(url=shop.url, operations=60, seed=11, grace=0.5)
            out.append(run_storm(config, "oncely on" if protected else "oncely off"))
    return out


def test_report_is_self_contained(results: list[StormResult]) -> None:
    page = html_report(results)
    assert page.count("<svg") == 3
    assert "<script" not in page  # pygal's tooltip script is off: nothing to fetch
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page)
    assert "double effects" in page and "oncely off" in page


@pytest.mark.timeout(300)
def test_report_charts_render_in_chromium(results: list[StormResult], tmp_path: Path) -> None:
    if chromium() is None:
        pytest.skip("Debian's chromium is not installed (apt-get install chromium)")
    html = write_html(tmp_path / "report.html", results)
    png = tmp_path / "report.png"
    dom = screenshot(html, png, tmp_path / "profile")
    # the browser parsed three charts, each with its bars / lines drawn
    assert dom.count("<svg") == 3
    assert len(re.findall(r'<rect[^>]*class="rect reactive', dom)) >= 4
    assert "<path" in dom
    assert png.stat().st_size > 20_000
    assert png_colours(png) >= 8, "the screenshot is (nearly) blank"
    if os.environ.get("ONCELY_UPDATE_DOCS") == "1":
        shutil.copyfile(png, DOCS_SHOT)
