"""One self-contained HTML page for a result document: summary table and PNGs embedded as data URIs."""

from __future__ import annotations

import base64
import time
from collections.abc import Sequence
from dataclasses import dataclass
from html import escape
from pathlib import Path
from typing import Any

from common.report.summary import PART_METRICS, PART_TITLES, PARTS, format_stat, summarize

METRIC_TITLES: dict[str, str] = {
    "acc_final": "acc_final (%)",
    "acc_avg": "acc_avg (%)",
    "forgetting": "forgetting (pp)",
    "bwt": "BWT (pp)",
}
# (group, metric key of summarize(), header, format kind) of the two tables' columns
ACCURACY_COLUMNS: tuple[tuple[str, str, str, str], ...] = tuple(
    (PART_TITLES[p], f"{p}.{m}", METRIC_TITLES[m], "pct") for p in PARTS for m in PART_METRICS
)
COST_COLUMNS: tuple[tuple[str, str, str, str], ...] = (
    ("per client and round", "bytes_up_per_client_round", "uploaded (kB)", "kb"),
    ("per client and round", "bytes_down_per_client_round", "downloaded (kB)", "kb"),
    ("per run", "wall_s", "wall (s)", "s"),
    ("per run", "peak_rss_mb", "peak RSS (MB)", "mb"),
)
# No external resource can load, even when the page is opened from a web server.
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
STYLE = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 24px auto; max-width: 1400px;
       padding: 0 16px; color: #1d2430; }
h1 { font-size: 22px; margin-bottom: 4px; } h2 { font-size: 17px; margin-top: 28px; }
.meta { color: #5a6472; } code { background: #f2f4f7; padding: 1px 4px; border-radius: 3px; }
table { border-collapse: collapse; font-variant-numeric: tabular-nums; font-size: 12.5px; }
th, td { border: 1px solid #d9dee5; padding: 3px 6px; } th { background: #f2f4f7; }
td.num { text-align: right; white-space: nowrap; } td.method { font-weight: 600; white-space: nowrap; }
.scroll { overflow-x: auto; margin-bottom: 12px; } figure { margin: 12px 0 20px; }
figcaption { color: #5a6472; font-size: 13px; }
img { max-width: 100%; height: auto; border: 1px solid #eef0f3; }
"""


@dataclass(frozen=True)
class ReportImage:
    section: str
    caption: str
    path: Path


def data_uri(path: Path) -> str:
    """The PNG file as a data: URI."""
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _groups(cols: Sequence[tuple[str, str, str, str]]) -> list[tuple[str, int]]:
    """Consecutive columns of the same group, as (group, how many)."""
    groups: list[tuple[str, int]] = []
    for group, *_ in cols:
        if groups and groups[-1][0] == group:
            groups[-1] = (group, groups[-1][1] + 1)
        else:
            groups.append((group, 1))
    return groups


def metrics_table(doc: dict[str, Any], columns: Sequence[tuple[str, str, str, str]], table_id: str) -> str:
    """Table method × metrics (mean ± std over seeds); columns without any value are left out, and the
    whole table when none has one."""
    summary = summarize(doc)
    cols = [c for c in columns if any(stats.get(c[1], (None, None, 0))[2] for stats in summary.values())]
    if not cols:
        return ""
    seeds = {m: sum(1 for r in doc["results"] if str(r.get("method")) == m) for m in summary}
    head1 = "".join(f'<th colspan="{n}">{escape(g)}</th>' for g, n in _groups(cols))
    head2 = "".join(f"<th>{escape(h)}</th>" for _, _, h, _ in cols)
    rows = []
    for method, stats in summary.items():
        cells = "".join(
            f'<td class="num">{escape(format_stat(stats.get(k, (None, None, 0)), kind))}</td>'
            for _, k, _, kind in cols
        )
        rows.append(
            f'<tr data-method="{escape(method)}"><td class="method">{escape(method)}</td>'
            f'<td class="num">{seeds[method]}</td>{cells}</tr>'
        )
    return (
        f'<div class="scroll"><table id="{table_id}">'
        '<thead><tr><th rowspan="2">method</th><th rowspan="2">seeds</th>'
        f"{head1}</tr><tr>{head2}</tr></thead>"
        f"<tbody>{''.join(rows)}</tbody></table></div>"
    )


def _meta(doc: dict[str, Any], source: str) -> str:
    seeds = ", ".join(str(s) for s in doc.get("seeds") or [])
    parts = [
        f"FM <code>{escape(str(doc.get('fm', '?')))}</code>",
        f"seeds {escape(seeds) or '–'}",
        f"source <code>{escape(source)}</code>",
    ]
    if doc.get("eval_split"):
        parts.append(f"evaluated on the {escape(str(doc['eval_split']))} split")
    parts.append("generated " + time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    meta = '<p class="meta">' + " · ".join(parts) + "</p>"
    if doc.get("command"):
        meta += f"<p>Produced by <code>{escape(str(doc['command']))}</code></p>"
    return meta


def _figures(images: Sequence[ReportImage]) -> str:
    out: list[str] = []
    section = None
    for image in images:
        if image.section != section:
            section = image.section
            out.append(f"<h2>{escape(section)}</h2>")
        out.append(
            f'<figure><img src="{data_uri(image.path)}" alt="{escape(image.caption)}">'
            f"<figcaption>{escape(image.caption)}</figcaption></figure>"
        )
    return "\n".join(out)


def tasks_table(doc: dict[str, Any]) -> str:
    """Task -> labels, when the document names them. Labels are any printable Unicode (common/labels.py):
    escaped, and each in its own <bdi> so that a right-to-left name cannot reorder its neighbours."""
    tasks = doc.get("tasks")
    if not isinstance(tasks, dict) or not tasks:
        return ""
    rows = "".join(
        f'<tr data-task="{escape(str(task))}"><td class="method">{escape(str(task))}</td>'
        f'<td class="num">{len(labels)}</td><td>'
        + ", ".join(f'<bdi class="label">{escape(str(y))}</bdi>' for y in labels)
        + "</td></tr>"
        for task, labels in tasks.items()
    )
    return (
        '<h2>Tasks and labels</h2><div class="scroll"><table id="tasks"><thead><tr><th>task</th>'
        f"<th>labels</th><th>names</th></tr></thead><tbody>{rows}</tbody></table></div>"
    )


def report_page(doc: dict[str, Any], images: Sequence[ReportImage], source: str) -> str:
    """The whole page: title, context, summary table, then every image grouped by section, in order."""
    title = f"fcl report — {doc.get('scenario', '?')}"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{CSP}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{escape(title)}</title><style>{STYLE}</style></head>
<body>
<h1>{escape(title)}</h1>
{_meta(doc, source)}
<h2>Summary</h2>
<p class="meta">Mean ± std over seeds (std with ddof=0); accuracies in %, forgetting and backward
transfer (BWT) in percentage points; – where a method has no value.</p>
{metrics_table(doc, ACCURACY_COLUMNS, "summary")}
{metrics_table(doc, COST_COLUMNS, "cost")}
{tasks_table(doc)}
{_figures(images)}
</body></html>
"""
