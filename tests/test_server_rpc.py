"""The gRPC contract of a real in-process server on port 0: auth, ownership, idempotency, errors, health."""

from __future__ import annotations

import contextlib
import hashlib
import io
import tarfile
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from common.fm import FoundationModel
from common.stubs.fcl.v1 import fcl_pb2 as pb
from fcl_client.connection import Connection
from fcl_server.app import RunningServer
from fcl_server.cli import main as server_cli
from tests.servers import inprocess_server, package_bytes


@pytest.fixture
def server(tmp_path: Path, fm: FoundationModel) -> Iterator[RunningServer]:
    running = inprocess_server(tmp_path, fm)
    yield running
    running.stop(grace=1)


def token(server: RunningServer, name: str, admin: bool = False) -> str:
    """A token issued by `fcl-server enroll` against the running server's state directory."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        args = ["enroll", "--state-dir", str(server.state_dir), name] + (["--admin"] if admin else [])
        assert server_cli(args) == 0
    return out.getvalue().strip()


def target(server: RunningServer) -> str:
    return f"127.0.0.1:{server.port}"


def code_of(excinfo: pytest.ExceptionInfo[grpc.RpcError]) -> grpc.StatusCode:
    err = excinfo.value
    assert isinstance(err, grpc.Call)
    return err.code()


def test_register_reports_fm_match(server: RunningServer, fm: FoundationModel) -> None:
    with Connection(target(server), token(server, "alice")) as conn:
        ok = conn.register("alice", fm.digest)
        assert ok.fm_matches and ok.foundation_model.digest == fm.digest
        assert ok.foundation_model.feature_dim == fm.feature_dim and ok.personal_head_version == 0
        assert not conn.register("alice", "0" * 64).fm_matches


def test_unknown_and_missing_tokens_are_unauthenticated(server: RunningServer) -> None:
    with Connection(target(server), "not-a-token", retries=0) as conn, pytest.raises(grpc.RpcError) as exc:
        conn.register("alice", "")
    assert code_of(exc) == grpc.StatusCode.UNAUTHENTICATED


def test_revoked_token_is_refused(server: RunningServer) -> None:
    tok = token(server, "bob")
    assert server_cli(["revoke", "--state-dir", str(server.state_dir), "bob"]) == 0
    with Connection(target(server), tok, retries=0) as conn, pytest.raises(grpc.RpcError) as exc:
        conn.register("bob", "")
    assert code_of(exc) == grpc.StatusCode.UNAUTHENTICATED


def test_client_cannot_impersonate_or_read_admin_views(server: RunningServer) -> None:
    with Connection(target(server), token(server, "alice"), retries=0) as conn:
        with pytest.raises(grpc.RpcError) as exc:
            conn.register("mallory", "")
        assert code_of(exc) == grpc.StatusCode.PERMISSION_DENIED
        with pytest.raises(grpc.RpcError) as exc:
            conn.status()
        assert code_of(exc) == grpc.StatusCode.PERMISSION_DENIED
        with pytest.raises(grpc.RpcError) as exc:
            conn.get_knowledge(pb.HEAD_SCOPE_GLOBAL)
        assert code_of(exc) == grpc.StatusCode.PERMISSION_DENIED
        with pytest.raises(grpc.RpcError) as exc:
            conn.get_knowledge(pb.HEAD_SCOPE_PERSONAL, client_id="bob")
        assert code_of(exc) == grpc.StatusCode.PERMISSION_DENIED


def test_upload_is_distilled_and_idempotent(server: RunningServer, fm: FoundationModel) -> None:
    data = package_bytes(fm, ["open_door", "close_door", "ring_bell"])
    with Connection(target(server), token(server, "alice")) as conn:
        first = conn.upload(data, "upload-1", "task-00", 0, fm.digest)
        again = conn.upload(data, "upload-1", "task-00", 0, fm.digest)
        assert not first.duplicate and again.duplicate and again.job_id == first.job_id
        event = conn.watch_job(first.job_id, timeout=300)
        assert event.state == pb.JOB_STATE_DONE, event.message
        header, blob = conn.get_knowledge()
        assert header.version == event.personal_version == 1 and header.num_labels == 3
        assert hashlib.sha256(blob).hexdigest() == header.sha256
        conn.report_metrics("task-00", 0, {"small/acc": 0.5})
    with Connection(target(server), token(server, "ops", admin=True)) as admin:
        status = admin.status()
        assert [j.job_id for j in status.jobs] == [first.job_id] and status.num_labels == 3
        assert status.clients[0].last_metrics["small/acc"] == 0.5
        header, _ = admin.get_knowledge(pb.HEAD_SCOPE_GLOBAL)
        assert header.version == 1


def test_upload_from_a_different_fm_is_refused(server: RunningServer, fm: FoundationModel) -> None:
    data = package_bytes(fm, ["a_label", "b_label"])
    with (
        Connection(target(server), token(server, "alice"), retries=0) as conn,
        pytest.raises(grpc.RpcError) as exc,
    ):
        conn.upload(data, "u-2", "task-00", 0, "f" * 64)
    assert code_of(exc) == grpc.StatusCode.FAILED_PRECONDITION
    assert server.service.state.queue_depth() == 0


def test_invalid_package_is_rejected_without_state_change(server: RunningServer, fm: FoundationModel) -> None:
    with Connection(target(server), token(server, "alice"), retries=0) as conn:
        for payload in (b"\x80\x04 pickle bytes", b"PK\x03\x04 zip", b"garbage" * 10):
            with pytest.raises(grpc.RpcError) as exc:
                conn.upload(payload, f"bad-{len(payload)}", "task-00", 0, fm.digest)
            assert code_of(exc) == grpc.StatusCode.INVALID_ARGUMENT
            assert "package" in exc.value.details()  # type: ignore[attr-defined]
    assert server.service.state.jobs() == []


def test_unknown_job_is_not_found(server: RunningServer) -> None:
    with (
        Connection(target(server), token(server, "alice"), retries=0) as conn,
        pytest.raises(grpc.RpcError) as exc,
    ):
        conn.watch_job(12345, timeout=5)
    assert code_of(exc) == grpc.StatusCode.NOT_FOUND


def test_fm_download_resumes_and_verifies(server: RunningServer, fm: FoundationModel, tmp_path: Path) -> None:
    dest = tmp_path / "fm.tar"
    archive = server.service.blobs.path(server.service.fm_host.info.archive_blob).read_bytes()
    (tmp_path / "fm.tar.part").write_bytes(archive[:1000])  # an earlier, interrupted download
    with Connection(target(server), token(server, "alice")) as conn:
        info = conn.download_fm(dest)
    assert dest.read_bytes() == archive and info.digest == fm.digest
    with tarfile.open(dest) as tar:
        assert "config.json" in tar.getnames()


def test_health_and_reflection(server: RunningServer) -> None:
    with grpc.insecure_channel(target(server)) as channel:
        health = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="fcl.v1.FclService")
        )
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        responses = stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        )
        names = {s.name for r in responses for s in r.list_services_response.service}
    assert "fcl.v1.FclService" in names and "grpc.health.v1.Health" in names
