"""The storm's report: a Rich table (one column per run, side by side), JSON, and a
self-contained HTML page with outcome and latency charts.

The HTML charts are SVG drawn by pygal (``oncely[report]``) and inlined in the page, with
pygal's tooltip script turned off: the file needs no network and no JavaScript, so it renders
the same in a browser, a mail client or a CI artifact viewer.
"""

from __future__ import annotations

import datetime as dt
import html
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.table import Table

from oncely.demo.storm import StormResult

__all__ = ["METRICS", "html_report", "json_report", "table", "write_html"]


def _kinds(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} {n}" for k, n in sorted(counts.items())) or "-"


#: (row title, how to read it from a result, is a failure when non-zero)
METRICS: list[tuple[str, Any, bool]] = [
    ("operations", lambda r: f"{r.operations:,} ({_kinds(r.by_kind)})", False),
    ("requests sent", lambda r: f"{r.requests:,}", False),
    ("duplicates", lambda r: f"{r.duplicates:,}", False),
    ("effects applied", lambda r: f"{r.effects:,}", False),
    ("double effects", lambda r: r.double_effects, True),
    ("lost operations", lambda r: r.lost, True),
    ("stock drift (units)", lambda r: r.stock_drift, True),
    ("lost updates (balance, cents)", lambda r: r.lost_updates, True),
    ("bad input: sent / mishandled", lambda r: f"{r.bad_sent} / {r.bad_failures}", False),
    ("latency p50 / p99", lambda r: f"{r.percentile(50):.0f} / {r.percentile(99):.0f} ms", False),
    ("time", lambda r: f"{r.seconds:.1f} s", False),
]


def _double(r: StormResult) -> str:
    if not r.double_effects:
        return "0"
    return f"{r.double_effects:,} ({_kinds(r.double_by_kind)})"


def rows(results: Sequence[StormResult]) -> list[tuple[str, list[tuple[str, str]]]]:
    """The report's rows: (title, [(text, verdict) per run]); verdict is "bad", "good" (for
    the figures that must be zero) or ""."""
    out = []
    for name, read, failure in METRICS:
        cells = []
        for r in results:
            value = read(r)
            if name == "double effects":
                text = _double(r)
            else:
                text = f"{value:,}" if isinstance(value, int) else str(value)
            cells.append((text, ("bad" if value else "good") if failure else ""))
        out.append((name, cells))
    for kind in sorted({k for r in results for k in r.skipped}):
        out.append((f"skipped: {kind}", [(r.skipped.get(kind, "-"), "") for r in results]))
    return out


def table(results: Sequence[StormResult], title: str = "oncely storm") -> Table:
    """The report as a Rich table, one column per run."""
    out = Table(title=title, title_justify="left")
    out.add_column("")
    for r in results:
        out.add_column(r.label or r.url, justify="right")
    colours = {"bad": "bold red", "good": "bold green"}
    for name, cells in rows(results):
        out.add_row(name, *[f"[{colours[v]}]{t}[/]" if v else t for t, v in cells])
    out.add_row("verdict", *[_verdict(r) for r in results])
    return out


def _verdict(r: StormResult) -> str:
    return "[bold green]PASS[/]" if r.ok else "[bold red]FAIL[/]"


def json_report(results: Sequence[StormResult]) -> str:
    data: Any = [r.to_json() for r in results]
    return json.dumps(data[0] if len(data) == 1 else data, indent=2)


def _chart_style() -> Any:
    from pygal.style import Style

    return Style(
        background="white",
        plot_background="white",
        font_family="DejaVu Sans, Arial, sans-serif",
        colors=("#2e7d32", "#c62828", "#1565c0", "#ef6c00", "#6a1b9a", "#00838f"),
        title_font_size=16,
        label_font_size=11,
        legend_font_size=12,
    )


def _svg(chart: Any) -> str:
    svg: str = chart.render(is_unicode=True, disable_xml_declaration=True)
    # pygal inlines its config for its tooltip script, which is off (js=[]): drop it too.
    return re.sub(r"<script\b.*?</script>", "", svg, flags=re.S)


def _chart(
    kind: str,
    title: str,
    labels: Sequence[str],
    results: Sequence[StormResult],
    values: Any,
    **options: Any,
) -> str:
    """One pygal chart as inline SVG: a series per run, ``values(result)`` per label."""
    import pygal

    chart = getattr(pygal, kind)(
        title=title, style=_chart_style(), js=[], width=900, legend_at_bottom=True, **options
    )
    chart.x_labels = list(labels)
    for r in results:
        chart.add(r.label or r.url, values(r))
    return _svg(chart)


def _outcome_chart(results: Sequence[StormResult]) -> str:
    labels = ["effects applied", "double effects", "lost operations", "stock drift"]
    return _chart(
        "HorizontalBar", "Effects per logical operation", labels, results,
        lambda r: [r.effects, r.double_effects, r.lost, r.stock_drift],
        height=360, print_values=True,
    )  # fmt: skip


def _answers_chart(results: Sequence[StormResult]) -> str:
    labels = sorted({k for r in results for k in r.outcomes})
    height = max(320, 34 * len(labels) * max(1, len(results)) // 2 + 120)
    return _chart(
        "HorizontalBar", "What the client was answered (per request)", labels, results,
        lambda r: [r.outcomes.get(k, 0) for k in labels], height=height, print_values=True,
    )  # fmt: skip


PERCENTILES = (10, 25, 50, 75, 90, 95, 99, 99.9, 100)


def _latency_chart(results: Sequence[StormResult]) -> str:
    labels = [f"p{p:g}" for p in PERCENTILES]
    return _chart(
        "Line", "Request latency by percentile (ms)", labels, results,
        lambda r: [max(0.1, round(r.percentile(p), 1)) for p in PERCENTILES],
        height=360, dots_size=4, logarithmic=True,
    )  # fmt: skip


def html_report(results: Sequence[StormResult], title: str = "oncely storm report") -> str:
    """The self-contained HTML report (inline SVG charts, no scripts, no network)."""
    head = "".join(f"<th>{html.escape(r.label or r.url)}</th>" for r in results)
    lines = []
    for name, cells in rows(results):
        tds = "".join(f'<td class="{v}">{html.escape(t)}</td>' for t, v in cells)
        lines.append(f"<tr><th>{html.escape(name)}</th>{tds}</tr>")
    verdicts = "".join(
        f'<td class="{"good" if r.ok else "bad"}">{"PASS" if r.ok else "FAIL"}</td>'
        for r in results
    )
    lines.append(f"<tr><th>verdict</th>{verdicts}</tr>")
    faults = "".join(
        f"<li><b>{html.escape(r.label or r.url)}</b>: {html.escape(f)}</li>"
        for r in results
        for f in r.faults
    )
    examples = "".join(
        f"<li><b>{html.escape(r.label or r.url)}</b>: {html.escape(e)}</li>"
        for r in results
        for e in [*r.lost_examples, *r.bad_examples]
    )
    charts = [_outcome_chart(results), _answers_chart(results), _latency_chart(results)]
    figures = "".join(f'<figure class="chart">{svg}</figure>' for svg in charts)
    when = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>{html.escape(title)}</title>
<style>
body {{ font-family: DejaVu Sans, Arial, sans-serif; margin: 2em auto; max-width: 960px;
       color: #222; }}
table {{ border-collapse: collapse; margin: 1em 0; }}
th, td {{ border: 1px solid #ccc; padding: 4px 10px; text-align: right; }}
tr th:first-child {{ text-align: left; }}
td.good {{ color: #2e7d32; font-weight: bold; }}
td.bad {{ color: #c62828; font-weight: bold; }}
figure.chart {{ margin: 1.5em 0; }}
figure.chart svg {{ width: 100%; height: auto; }}
</style></head><body>
<h1>{html.escape(title)}</h1>
<p>{len(results)} run(s), {html.escape(when)}. A double effect is a ledger row beyond the first
for one operation; a lost operation is one whose effect is missing although the client was told
it succeeded, or that never succeeded after all retries.</p>
<table><tr><th></th>{head}</tr>{"".join(lines)}</table>
{f"<h2>Faults injected</h2><ul>{faults}</ul>" if faults else ""}
{figures}
{f"<h2>Examples</h2><ul>{examples}</ul>" if examples else ""}
</body></html>
"""


def write_html(
    path: Path, results: Sequence[StormResult], title: str = "oncely storm report"
) -> Path:
    path = Path(path)
    path.write_text(html_report(results, title), encoding="utf-8")
    return path
