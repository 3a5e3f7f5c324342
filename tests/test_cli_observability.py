"""The real `fcl-server serve` process: options from file + environment + flags, JSON logs, /metrics."""

from __future__ import annotations

import json
import re
import time
import urllib.request
from pathlib import Path

import pytest

from benchmarks.cluster import enroll, start_server
from fcl_client.connection import Connection


def _metrics_port(log: Path, timeout: float = 30) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = re.search(r"fcl-server metrics on port (\d+)", log.read_text(errors="replace"))
        if found:
            return int(found.group(1))
        time.sleep(0.1)
    raise AssertionError(f"no metrics port in the server output:\n{log.read_text()[-2000:]}")


def test_serve_takes_layered_options_logs_json_and_serves_metrics(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    corpus = tmp_path / "public.txt"  # tiny: the worker encodes it at start
    corpus.write_text("\n".join(f"public sentence {i}" for i in range(8)))
    state = tmp_path / "state"
    token = enroll(state, "edge-1")
    config = tmp_path / "server.toml"
    config.write_text('log_format = "text"\nuploads_per_minute = 3\n')
    monkeypatch.setenv("FCL_LOG_FORMAT", "json")  # environment over the file
    monkeypatch.setenv("FCL_METRICS_LISTEN", "127.0.0.1:0")
    log = tmp_path / "server.log"
    server = start_server(state, log, "--config", str(config), "--public-corpus", str(corpus))
    try:
        port = _metrics_port(log)
        with Connection(server.target, token) as conn:
            conn.register("edge-1", "")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
            scrape = resp.read().decode()
    finally:
        assert server.stop() == 0, server.log_tail()
    assert 'fcl_rpc_handled_total{code="OK",method="Register",service="fcl.v1.FclService"} 1.0' in scrape
    lines = [line for line in log.read_text().splitlines() if not line.startswith("fcl-server ")]
    records = [json.loads(line) for line in lines]  # every log line is one JSON object
    (register,) = [r for r in records if r.get("event") == "rpc" and r["method"] == "Register"]
    assert register["client_id"] == "edge-1" and register["code"] == "OK" and register["level"] == "INFO"
    assert any("shutting down" in r["msg"] for r in records)
