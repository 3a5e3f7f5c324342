"""Metrics over HTTP and per-RPC / per-job log lines of a real in-process server (text and JSON)."""

from __future__ import annotations

import json
import logging
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from common.config import OBODConfig
from common.fm import FoundationModel
from common.logs import JsonFormatter, formatter, setup_logging
from common.stubs.fcl.v1 import fcl_pb2 as pb
from fcl_client.connection import Connection
from fcl_server.cli import new_token
from tests.servers import inprocess_server, package_bytes


class Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@dataclass
class Session:
    """What one client session against a server with metrics on port 0 produced."""

    scrape: str
    records: list[logging.LogRecord]
    upload_size: int
    head_size: int
    fm_size: int
    upload_progress: list[tuple[int, int]] = field(default_factory=list)
    fm_progress: list[tuple[int, int]] = field(default_factory=list)

    def value(self, name: str, **labels: str) -> float:
        for family in text_string_to_metric_families(self.scrape):
            for sample in family.samples:
                if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                    return float(sample.value)
        raise AssertionError(f"no sample {name}{labels} in the scrape")

    def events(self, kind: str) -> list[logging.LogRecord]:
        return [r for r in self.records if getattr(r, "fields", {}).get("event") == kind]


@pytest.fixture(scope="module")
def session(tmp_path_factory: pytest.TempPathFactory, fm: FoundationModel) -> Iterator[Session]:
    tmp = tmp_path_factory.mktemp("observed")
    collect = Collect()
    logger = logging.getLogger("fcl_server")
    old_level = logger.level
    logger.setLevel(logging.DEBUG)
    logger.addHandler(collect)
    # a short distillation: what is measured here is the bookkeeping around the job, not its quality
    obod = OBODConfig(epochs=1, min_steps=20, personal_epochs=0)
    server = inprocess_server(tmp, fm, metrics_listen="127.0.0.1:0", obod=obod)
    try:
        assert server.metrics_port
        alice, ops = new_token(), new_token()
        server.state.add_token(alice, "alice", False)
        server.state.add_token(ops, "ops", True)
        target = f"127.0.0.1:{server.port}"
        data = package_bytes(fm, ["open_door", "close_door"])
        upload_progress: list[tuple[int, int]] = []
        fm_progress: list[tuple[int, int]] = []
        with Connection(target, alice) as conn:
            conn.register("alice", fm.digest)
            receipt = conn.upload(
                data, "u-1", "task-00", 0, fm.digest, progress=lambda *a: upload_progress.append(a)
            )
            assert conn.watch_job(receipt.job_id, timeout=300).state == pb.JOB_STATE_DONE
            _, head = conn.get_knowledge()
            info = conn.download_fm(tmp / "fm.tar", progress=lambda *a: fm_progress.append(a))
        with Connection(target, "fcl_not-a-token", retries=0) as stranger, pytest.raises(grpc.RpcError):
            stranger.register("alice", fm.digest)
        with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10) as resp:
            assert resp.status == 200
            scrape = resp.read().decode()
    finally:
        server.stop(grace=1)
        logger.removeHandler(collect)
        logger.setLevel(old_level)
    yield Session(
        scrape, collect.records, len(data), len(head), info.archive_size, upload_progress, fm_progress
    )


def test_rpcs_are_counted_by_method_and_status_code(session: Session) -> None:
    assert session.value("fcl_rpc_handled_total", method="Register", code="OK") == 1
    assert session.value("fcl_rpc_handled_total", method="Register", code="UNAUTHENTICATED") == 1
    assert session.value("fcl_rpc_handled_total", method="UploadKnowledge", code="OK") == 1
    assert session.value("fcl_rpc_handled_total", method="GetKnowledge", code="OK") == 1
    assert session.value("fcl_rpc_handled_total", method="WatchJob", code="OK") >= 1
    assert session.value("fcl_rpc_duration_seconds_count", method="UploadKnowledge", code="OK") == 1
    assert session.value("fcl_rpc_duration_seconds_sum", method="UploadKnowledge", code="OK") > 0
    assert session.value("fcl_rpc_in_flight", method="Register") == 0


def test_transfer_bytes_are_counted(session: Session) -> None:
    assert session.value("fcl_rpc_received_bytes_total", method="UploadKnowledge") >= session.upload_size
    assert session.value("fcl_rpc_sent_bytes_total", method="GetKnowledge") >= session.head_size
    assert session.value("fcl_rpc_sent_bytes_total", method="GetFoundationModel") >= session.fm_size


def test_jobs_queue_clients_and_heads_are_exported(session: Session) -> None:
    assert session.value("fcl_jobs_total", outcome="done") == 1
    assert session.value("fcl_job_duration_seconds_count", outcome="done") == 1
    assert session.value("fcl_job_duration_seconds_sum", outcome="done") > 0
    assert session.value("fcl_queue_depth") == 0 and session.value("fcl_worker_busy") == 0
    assert session.value("fcl_clients_seen") == 1 and session.value("fcl_labels") == 2
    assert session.value("fcl_head_version", scope="global") == 1
    assert session.value("fcl_head_versions", scope="personal") == 1
    assert session.value("fcl_process_cpu_seconds_total") > 0


def test_every_metric_name_has_the_fcl_prefix(session: Session) -> None:
    names = [f.name for f in text_string_to_metric_families(session.scrape)]
    assert names and all(n.startswith("fcl_") for n in names), [n for n in names if not n.startswith("fcl_")]


def test_one_log_line_per_rpc_with_method_client_code_duration_and_bytes(session: Session) -> None:
    rpcs = [r.fields for r in session.events("rpc")]  # type: ignore[attr-defined]
    by_method = {(f["method"], f["code"]): f for f in rpcs}
    assert by_method[("Register", "OK")]["client_id"] == "alice"
    assert by_method[("Register", "UNAUTHENTICATED")]["client_id"] is None
    assert by_method[("UploadKnowledge", "OK")]["bytes_in"] >= session.upload_size
    assert by_method[("GetKnowledge", "OK")]["bytes_out"] >= session.head_size
    assert all(f["duration_ms"] >= 0 for f in rpcs)
    handled = sum(
        sample.value
        for family in text_string_to_metric_families(session.scrape)
        for sample in family.samples
        if sample.name == "fcl_rpc_handled_total"
    )
    assert len(rpcs) == handled  # exactly one line per RPC


def test_rpc_lines_in_text_and_json(session: Session) -> None:
    record = next(r for r in session.events("rpc") if r.fields["method"] == "UploadKnowledge")  # type: ignore[attr-defined]
    text = formatter("text").format(record)
    assert " INFO fcl_server.rpc: UploadKnowledge client=alice peer=ipv4:127.0.0.1:" in text
    assert " code=OK " in text and " ms in=" in text
    line = JsonFormatter().format(record)
    assert "\n" not in line
    parsed = json.loads(line)
    assert parsed["logger"] == "fcl_server.rpc" and parsed["level"] == "INFO"
    assert parsed["method"] == "UploadKnowledge" and parsed["client_id"] == "alice" and parsed["code"] == "OK"
    assert parsed["bytes_in"] >= session.upload_size and parsed["duration_ms"] > 0
    assert parsed["peer"].startswith("ipv4:127.0.0.1:")
    assert parsed["msg"].startswith("UploadKnowledge client=alice peer=") and parsed["ts"].endswith("+00:00")


def test_one_log_line_per_job_in_text_and_json(session: Session) -> None:
    (job,) = session.events("job")
    assert "done in" in formatter("text").format(job) and "client alice" in job.getMessage()
    parsed = json.loads(formatter("json").format(job))
    assert parsed["outcome"] == "done" and parsed["client_id"] == "alice" and parsed["job_id"] == 1
    assert parsed["duration_ms"] > 0 and parsed["global_version"] == 1 and parsed["level"] == "INFO"


def test_transfer_progress_callbacks_reach_the_total(session: Session) -> None:
    assert session.upload_progress[-1] == (session.upload_size, session.upload_size)
    assert session.fm_progress[-1] == (session.fm_size, session.fm_size)
    assert [done for done, _ in session.fm_progress] == sorted(done for done, _ in session.fm_progress)


def test_setup_logging_writes_the_chosen_format(capsys: pytest.CaptureFixture[str]) -> None:
    handler = setup_logging("info", "json")
    try:
        logging.getLogger("fcl_server.rpc").info("hello %s", "there", extra={"fields": {"code": "OK"}})
        assert json.loads(capsys.readouterr().err) | {"ts": "t"} == {
            "ts": "t",
            "level": "INFO",
            "logger": "fcl_server.rpc",
            "msg": "hello there",
            "code": "OK",
        }
        setup_logging("info", "text")  # replaces the JSON handler: one line, not two
        logging.getLogger("fcl_server.rpc").info("hello again")
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.rstrip().endswith("INFO fcl_server.rpc: hello again")
    finally:
        logging.getLogger().removeHandler(handler)
        setup_logging("warning", "text")
