"""fcl-report: schema errors, PNG plots and one self-contained HTML page; a real browser renders the page."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path
from typing import Any

import pytest

from common.report import cli
from common.report.schema import ResultFormatError, load_result_doc
from common.report.summary import method_order
from tests import browser

pytest.importorskip("matplotlib")

RESULTS = Path(__file__).resolve().parent.parent / "benchmarks" / "results"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _part(final: float, matrix: list[list[float | None]]) -> dict[str, Any]:
    return {"acc_final": final, "acc_avg": final, "forgetting": 0.01, "bwt": -0.01, "matrix": matrix}


def synthetic() -> dict[str, Any]:
    """Like a demo report, with two methods and two seeds; 'baseline' has no personal or small parts."""
    rows: list[dict[str, Any]] = []
    for seed, shift in ((0, 0.0), (1, 0.04)):
        rows.append(
            {
                "method": "ours",
                "seed": seed,
                "fm_global": _part(0.88 + shift, [[0.95, None], [0.9, 0.86 + shift]]),
                "fm_personal": _part(0.85, [[0.9, None], [0.88, 0.8]]),
                "small": _part(0.75, [[0.8, None], [0.7, 0.72]]),
                "bytes_up_per_client_round": 5.0e5,
                "bytes_down_per_client_round": 1.2e6,
                "wall_s": 40.0 + 4 * seed,
                "peak_rss_mb": 650.0,
            }
        )
        rows.append(
            {
                "method": "baseline",
                "seed": seed,
                "fm_global": _part(0.5, [[0.7, None], [0.3, 0.7]]),
                "fm_personal": None,
                "small": None,
                "bytes_up_per_client_round": None,
                "bytes_down_per_client_round": None,
                "wall_s": 3.0,
                "peak_rss_mb": None,
            }
        )
    return {"scenario": "synthetic-2x2", "fm": "tiny-fm", "seeds": [0, 1], "results": rows}


def check_self_contained(page: Path, pngs: list[Path]) -> str:
    """The page loads nothing from elsewhere and embeds every PNG (byte for byte) as a data URI."""
    html = page.read_text(encoding="utf-8")
    assert "http://" not in html and "https://" not in html
    assert not re.search(r"<script|<link|<iframe|@import|url\(", html, re.IGNORECASE)
    sources = re.findall(r"""(?:src|href)\s*=\s*["']([^"']*)""", html, re.IGNORECASE)
    assert sources and all(s.startswith("data:image/png;base64,") for s in sources)
    for png in pngs:
        data = png.read_bytes()
        assert data[:8] == PNG_SIGNATURE and len(data) > 1000, png
        assert f"data:image/png;base64,{base64.b64encode(data).decode()}" in html, png
    assert len(sources) == len(pngs)
    return html


def table_cells(html: str, table_id: str) -> dict[str, list[str]]:
    """{method: the texts of its numeric cells} of one table of the page."""
    table = re.search(rf'<table id="{table_id}">(.*?)</table>', html, re.DOTALL)
    assert table is not None, table_id
    rows = re.findall(r'<tr data-method="([^"]+)">(.*?)</tr>', table.group(1))
    return {method: re.findall(r'<td class="num">([^<]*)</td>', cells) for method, cells in rows}


def test_report_of_a_committed_result(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = RESULTS / "builtin-3x3-grpc.json"
    assert cli.main([str(source), "--out", str(tmp_path / "out")]) == 0
    printed = [Path(p) for p in capsys.readouterr().out.split()]
    assert printed[-1] == tmp_path / "out" / "report.html"
    names = {p.name for p in printed[:-1]}
    assert names == {"accuracy_over_tasks.png", "communication.png", "heatmap_ours.png"}
    assert {p.name for p in (tmp_path / "out").iterdir()} == names | {"report.html"}
    html = check_self_contained(printed[-1], printed[:-1])
    assert "fcl report — custom" in html and "builtin-3x3-grpc.json" in html  # scenario, source
    assert json.loads(source.read_text())["command"].split()[0] in html  # how the result was produced


def test_report_of_a_synthetic_result(tmp_path: Path) -> None:
    source = tmp_path / "report.json"
    source.write_text(json.dumps(synthetic()))
    assert cli.main([str(source)]) == 0
    out = tmp_path / "report-report"  # default: beside the file
    pngs = sorted(out.glob("*.png"))
    assert {p.name for p in pngs} == {
        "accuracy_over_tasks.png",
        "communication.png",
        "heatmap_ours.png",
        "heatmap_baseline.png",
    }
    html = check_self_contained(out / "report.html", pngs)
    accuracy, cost = (table_cells(html, name) for name in ("summary", "cost"))
    assert list(accuracy) == list(cost) == ["ours", "baseline"]  # order of first appearance
    # seeds, then FM-global acc_final, acc_avg, forgetting, BWT (%, pp), then FM-personal ...
    assert accuracy["ours"][:5] == ["2", "90.0 ± 2.0", "90.0 ± 2.0", "1.0 ± 0.0", "-1.0 ± 0.0"]
    assert len(accuracy["ours"]) == 1 + 12
    assert accuracy["baseline"][:2] == ["2", "50.0 ± 0.0"] and accuracy["baseline"][5:] == ["–"] * 8
    assert cost["ours"] == ["2", "500 ± 0", "1200 ± 0", "42 ± 2", "650 ± 0"]  # kB, kB, s, MB
    assert cost["baseline"] == ["2", "–", "–", "3 ± 0", "–"]
    assert html.index("Accuracy over tasks") < html.index("Communication") < html.index("heat-maps")


def test_no_bytes_no_matrices(tmp_path: Path) -> None:
    doc = synthetic()
    for row in doc["results"]:
        row["bytes_up_per_client_round"] = row["bytes_down_per_client_round"] = None
    page, pngs = cli.build_report(doc, tmp_path / "a", "x.json")
    assert "communication.png" not in {p.name for p in pngs} and page.exists()
    for row in doc["results"]:
        for part in ("fm_global", "fm_personal", "small"):
            if row[part]:
                row[part]["matrix"] = None
    page, pngs = cli.build_report(doc, tmp_path / "b", "x.json")
    assert pngs == [] and 'id="summary"' in page.read_text()  # still a table, just no plots


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("[1, 2]", "top level is a JSON list"),
        ("{not json", "not JSON"),
        ('{"results": []}', "scenario: Field required"),
        (
            json.dumps({**synthetic(), "results": [{"method": "m", "seed": "0"}]}),
            "results[0].seed: Input should be a valid integer",
        ),
        (
            json.dumps(
                {**synthetic(), "results": [{"method": "m", "seed": 0, "small": {"matrix": [["x"]]}}]}
            ),
            "results[0].small.matrix[0][0]: Input should be a valid number",
        ),
        (json.dumps({**synthetic(), "results": []}), "results: List should have at least 1 item"),
    ],
)
def test_files_outside_the_schema_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str, message: str
) -> None:
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ResultFormatError, match=re.escape(message)):
        load_result_doc(path)
    assert cli.main([str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fcl-report: error: ") and message in err and str(path) in err
    assert not (tmp_path / "out").exists()


def test_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main([str(tmp_path / "nope.json")]) == 2
    assert "No such file" in capsys.readouterr().err


@pytest.mark.browser
@browser.needs_chromium
def test_report_page_in_a_real_browser(tmp_path: Path) -> None:
    """Chromium renders the clinc150-5x5 report: table, every image decoded, a non-blank screenshot."""
    doc = load_result_doc(RESULTS / "clinc150-5x5.json")
    methods = len(method_order(doc))
    page, pngs = cli.build_report(doc, tmp_path, "clinc150-5x5.json")
    dom = browser.Elements(browser.dump_dom(page.as_uri(), tmp_path / "profile"))
    assert dom.by_id("summary") is not None and dom.by_id("cost") is not None
    assert methods >= 12
    assert (
        len([a for t, a in dom.elements if t == "tr" and "data-method" in a]) == 2 * methods
    )  # one per method
    assert len(dom.all("img")) == len(pngs) == 2 + methods  # curves, communication, a heat-map per method
    shot = browser.screenshot(page.as_uri(), tmp_path / "report.png", tmp_path / "profile")
    size, spread = browser.image_stats(shot)
    assert size == browser.WINDOW and spread > 10.0, (size, spread)
    browser.keep_screenshot(shot, "report.png")
