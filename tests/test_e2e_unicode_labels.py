"""Labels as real datasets have them, end to end over real processes (issue 14, "Must show").

A labelled CSV whose labels carry '?', '&', "'", '(…)' and CJK runs through `fcl-data split`, then a
`make demo`-style run (`python -m benchmarks.demo --train`: one fcl-server and two fcl-client processes
on the default FM), then `fcl-report`; the page shows every label, escaped. A malformed file is refused
by `fcl-data split` before anything is written, with every problem listed.
"""

from __future__ import annotations

import csv
import json
import os
import sqlite3
import subprocess
import sys
from contextlib import closing
from html import escape
from pathlib import Path

import pytest

from common.datasets import builtin

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "data"
LABELS = {
    "reverted_card_payment?",
    "cancel & refund",
    "what's my balance",
    "top up (card)",
    "汇率 (exchange rate)",
    "丢失的卡",
}


def _env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def _public(tmp_path: Path) -> Path:
    path = tmp_path / "public.txt"
    path.write_text("\n".join(builtin.load_public()[:300]) + "\n", encoding="utf-8")
    return path


def test_the_example_csv_holds_the_labels_of_the_issue() -> None:
    with (EXAMPLES / "intents-unicode.csv").open(encoding="utf-8-sig", newline="") as fh:
        assert {row["label"] for row in csv.DictReader(fh)} == LABELS


def test_unicode_labels_from_a_csv_through_server_and_clients_to_the_report(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    demo = [sys.executable, "-m", "benchmarks.demo", "--train", str(EXAMPLES / "intents-unicode.csv")]
    demo += ["--public", str(_public(tmp_path)), "--tasks", "2", "--clients", "2", "--epochs", "5"]
    demo += ["--metrics-listen", "", "--out", str(out)]
    done = subprocess.run(demo, capture_output=True, text=True, timeout=900, env=_env(), cwd=ROOT)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert "process exit codes: {'client-0': 0, 'client-1': 0, 'server': 0}" in done.stdout, done.stdout

    # the server took every label through its validator into its registry, spelt as in the CSV
    with closing(sqlite3.connect(out / "work" / "server" / "state.sqlite3")) as db:
        registry = {row[0] for row in db.execute("SELECT name FROM labels")}
    assert registry == LABELS
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert {y for ys in report["tasks"].values() for y in ys} == LABELS
    fm_global = report["results"][0]["fm_global"]
    assert fm_global["acc_final"] is not None and fm_global["acc_final"] > 0.5, fm_global

    pytest.importorskip("matplotlib")
    page = tmp_path / "report"
    shown = subprocess.run(
        [sys.executable, "-m", "common.report.cli", str(out / "report.json"), "--out", str(page)],
        capture_output=True,
        text=True,
        timeout=300,
        env=_env(),
        cwd=ROOT,
    )
    assert shown.returncode == 0, shown.stderr
    html = (page / "report.html").read_text(encoding="utf-8")
    for label in LABELS:
        assert f'<bdi class="label">{escape(label)}</bdi>' in html, label
    assert "cancel &amp; refund" in html and "cancel & refund" not in html
    assert "what&#x27;s my balance" in html and "what's my balance" not in html


def test_a_malformed_file_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    out = tmp_path / "out"
    split = [sys.executable, "-m", "common.datasets.cli", "split"]
    split += [
        "--train",
        str(EXAMPLES / "intents-malformed.csv"),
        "--test",
        str(EXAMPLES / "intents-cp1252.csv"),
    ]
    split += ["--public", str(_public(tmp_path)), "--tasks", "2", "--clients", "2", "--out", str(out)]
    done = subprocess.run(split, capture_output=True, text=True, timeout=300, env=_env(), cwd=ROOT)
    assert done.returncode == 2 and done.stdout == ""
    assert not out.exists()
    err = done.stderr
    assert err.startswith(
        "fcl-data: error: the data cannot be used, nothing was written: 8 problems (7 distinct)"
    )
    malformed, cp1252 = EXAMPLES / "intents-malformed.csv", EXAMPLES / "intents-cp1252.csv"
    for part in (
        f"{malformed} lines 4, 9, column 'label': label 'reverted_card_payment\\u202e?' has a format",
        f"{malformed} line 5, column 'label': label 'cancel\\t& refund' has a control character (Cc) U+0009",
        f"{malformed} line 6, column 'label': label \"what's my balance",
        "is 142 characters long, over the limit of 128",
        f"{malformed} line 7, column 'label': label is empty",
        f"{malformed} line 8: has 3 fields where the header has 2",
        f"{malformed} line 10, column 'label': label '汇率\\u2028(exchange rate)' has a line separator (Zl)",
        f"{cp1252}: is not UTF-8 at byte 42 (line 2, byte 32 of the line: 0x80); byte 66 (line 3, byte 7",
    ):
        assert part in err, (part, err)
