"""Every bounded request field, past its bound, over gRPC: the right code, a short message that names the
field, and no state change; per-client storage quotas; the .proto's `bound:` comments equal the code's."""

from __future__ import annotations

import hashlib
import json
import re
import sqlite3
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from sqlalchemy import select

from common import wire_limits as wire
from common.fm import FoundationModel
from common.package import PackageLimits
from common.stubs.fcl.v1 import fcl_pb2 as pb
from common.stubs.fcl.v1 import fcl_pb2_grpc
from fcl_server.app import RunningServer
from fcl_server.errors import InvalidArgument
from fcl_server.schema import clients
from fcl_server.service import METRIC_ROW_BYTES, ServerLimits
from fcl_server.state import Principal
from tests.servers import inprocess_server, package_bytes

ROOT = Path(__file__).resolve().parents[1]
PROTO = ROOT / "protos" / "fcl" / "v1" / "fcl.proto"
TIMEOUT = 30.0
MAX_DETAILS = 512  # a status message, never an echo of the input
MB = 1024 * 1024
QUOTA_MB = 1  # the module's server: a small storage quota, so the quota tests fill it quickly
MAX_ROWS = 300  # and few metric rows per client (a full report of 256 still fits)
Code = grpc.StatusCode
CLIENTS = ["alice", "bob", "meter-1", "meter-2", "full", "full-other", "part"]


@dataclass
class Env:
    server: RunningServer
    stub: fcl_pb2_grpc.FclServiceStub
    fm: FoundationModel
    good: bytes

    def md(self, who: str) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer tok-{who}"),)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, fm: FoundationModel) -> Iterator[Env]:
    tmp = tmp_path_factory.mktemp("bounds")
    server = inprocess_server(
        tmp, fm, uploads_per_minute=0, client_quota_mb=QUOTA_MB, max_metric_rows=MAX_ROWS
    )
    server.worker.stop()  # jobs stay queued: these tests are about what the RPCs accept and store
    for name in [*CLIENTS, "ops"]:
        server.state.add_token(f"tok-{name}", name, name == "ops")
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield Env(server, fcl_pb2_grpc.FclServiceStub(channel), fm, package_bytes(fm, ["open_door", "close"]))
    server.stop(grace=1)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def padded(good: bytes, total: int) -> bytes:
    """A valid package grown to exactly `total` bytes by a metadata field the format ignores."""
    header_len = int.from_bytes(good[:8], "little")
    tensors, metadata = st_load(good), json.loads(good[8 : 8 + header_len])["__metadata__"]
    pad = ""
    for _ in range(8):  # the safetensors header is padded to 8 bytes: converges in a few steps
        data = st_save(tensors, metadata={**metadata, "pad": pad})
        if len(data) == total:
            return data
        pad = "p" * (len(pad) + total - len(data))
    raise AssertionError(f"could not pad the package to {total} bytes")


def header(env: Env, data: bytes, upload_id: str = "", **fields: Any) -> pb.UploadKnowledgeRequest:
    """An UploadKnowledge header that describes `data`, with any field overridden."""
    values: dict[str, Any] = dict(
        upload_id=upload_id, task_key="task-00", task_index=0, fm_digest=env.fm.digest, size=len(data)
    )
    values["sha256"] = sha(data)
    values.update(fields)
    return pb.UploadKnowledgeRequest(header=pb.UploadHeader(**values))


def upload(env: Env, who: str, data: bytes, upload_id: str = "", **fields: Any) -> pb.UploadReceipt:
    messages = [header(env, data, upload_id, **fields), pb.UploadKnowledgeRequest(chunk=data)]
    return env.stub.UploadKnowledge(iter(messages), metadata=env.md(who), timeout=TIMEOUT)


def report(
    env: Env, who: str, metrics: dict[str, float], task_index: int = 0, task_key: str = "task-00"
) -> int:
    request = pb.ReportMetricsRequest(task_key=task_key, task_index=task_index, metrics=metrics)
    return env.stub.ReportMetrics(request, metadata=env.md(who), timeout=TIMEOUT).stored


def snapshot(server: RunningServer) -> dict[str, Any]:
    """Every row of every table, and every file under the state dir but the database's own (with sizes)."""
    db = sqlite3.connect(f"file:{server.state_dir / 'state.sqlite3'}?mode=ro", uri=True)
    try:
        names = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table' ORDER BY name")]
        out: dict[str, Any] = {name: sorted(db.execute(f"SELECT * FROM {name}").fetchall()) for name in names}
    finally:
        db.close()
    out.pop("rate_buckets", None)  # rate accounting, not stored data: bytes sent count even when refused
    out["files"] = sorted(
        (str(p.relative_to(server.state_dir)), p.stat().st_size)
        for p in server.state_dir.rglob("*")
        if p.is_file() and not p.name.startswith("state.sqlite3")
    )
    return out


def refused(call: Callable[[], object], code: grpc.StatusCode, names: str) -> str:
    """The call fails with `code`; its message is short and names the field (or limit) `names`."""
    with pytest.raises(grpc.RpcError) as exc:
        call()
    err = exc.value
    assert isinstance(err, grpc.Call)
    details = err.details() or ""
    assert err.code() == code, details
    assert len(details) < MAX_DETAILS, f"{len(details)} chars: {details[:200]}"
    assert names in details, details
    return details


# -- every bounded field, one past (or far past) its bound ----------------------------------------------
BIG = "a" * MB  # 1 MiB of valid id characters: only the length is wrong
HEX_BIG = "a" * (MB // 2)


def _register(env: Env, **fields: Any) -> object:
    return env.stub.Register(pb.RegisterRequest(**fields), metadata=env.md("alice"), timeout=TIMEOUT)


def _fm(env: Env, **fields: Any) -> object:
    request = pb.GetFoundationModelRequest(**fields)
    return next(iter(env.stub.GetFoundationModel(request, metadata=env.md("alice"), timeout=TIMEOUT)))


def _upload(env: Env, **fields: Any) -> object:
    fields.setdefault("upload_id", "bound-case")
    return upload(env, "alice", env.good, **fields)


def _oversized_chunk(env: Env) -> object:
    """A header within the quota, then one chunk over max_chunk_bytes."""
    messages = [
        header(env, env.good, "bound-chunk"),
        pb.UploadKnowledgeRequest(chunk=bytes(wire.MAX_CHUNK_BYTES + 1)),
    ]
    return env.stub.UploadKnowledge(iter(messages), metadata=env.md("alice"), timeout=TIMEOUT)


def _upload_status(env: Env, upload_id: str) -> object:
    request = pb.GetUploadStatusRequest(upload_id=upload_id)
    return env.stub.GetUploadStatus(request, metadata=env.md("alice"), timeout=TIMEOUT)


def _knowledge(env: Env, **fields: Any) -> object:
    request = pb.GetKnowledgeRequest(**fields)
    return list(env.stub.GetKnowledge(request, metadata=env.md("alice"), timeout=TIMEOUT))


def _metrics(env: Env, **fields: Any) -> object:
    values: dict[str, Any] = dict(task_key="task-00", task_index=0, metrics={"small/acc": 0.5})
    values.update(fields)
    request = pb.ReportMetricsRequest(**values)
    return env.stub.ReportMetrics(request, metadata=env.md("alice"), timeout=TIMEOUT)


def _status(env: Env, max_jobs: int) -> pb.ServerStatus:
    return env.stub.GetStatus(pb.GetStatusRequest(max_jobs=max_jobs), metadata=env.md("ops"), timeout=TIMEOUT)


INV, EXH = Code.INVALID_ARGUMENT, Code.RESOURCE_EXHAUSTED
CASES: dict[str, tuple[Callable[[Env], object], grpc.StatusCode, str]] = {
    # name: (call, code, what the message names)
    "register-client-id-1MiB": (lambda e: _register(e, client_id=BIG), INV, "client_id"),
    "register-client-id-129": (lambda e: _register(e, client_id="a" * 129), INV, "client_id"),
    "register-client-id-newline": (lambda e: _register(e, client_id="alice\n"), INV, "client_id"),
    "register-fm-digest-long": (lambda e: _register(e, fm_digest=HEX_BIG), INV, "fm_digest"),
    "register-fm-digest-65": (lambda e: _register(e, fm_digest="a" * 65), INV, "fm_digest"),
    "register-model-spec-4097": (lambda e: _register(e, model_spec_json="x" * 4097), INV, "model_spec_json"),
    "register-model-spec-utf8": (lambda e: _register(e, model_spec_json="é" * 2049), INV, "model_spec_json"),
    "register-model-spec-1MiB": (lambda e: _register(e, model_spec_json=BIG), INV, "model_spec_json"),
    "fm-archive-sha-long": (lambda e: _fm(e, archive_sha256=HEX_BIG), INV, "archive_sha256"),
    "fm-archive-sha-upper": (lambda e: _fm(e, archive_sha256="A" * 64), INV, "archive_sha256"),
    "fm-offset-negative": (lambda e: _fm(e, offset=-1), INV, "offset"),
    "upload-id-1MiB": (lambda e: _upload(e, upload_id=BIG), INV, "upload_id"),
    "upload-id-newline": (lambda e: _upload(e, upload_id="bound-case\n"), INV, "upload_id"),
    "upload-task-key-1MiB": (lambda e: _upload(e, task_key=BIG), INV, "task_key"),
    "upload-task-key-129": (lambda e: _upload(e, task_key="t" * 129), INV, "task_key"),
    "upload-task-index-over": (lambda e: _upload(e, task_index=wire.TASK_INDEX_MAX + 1), INV, "task_index"),
    "upload-task-index-negative": (lambda e: _upload(e, task_index=-1), INV, "task_index"),
    "upload-fm-digest-long": (lambda e: _upload(e, fm_digest=HEX_BIG), INV, "fm_digest"),
    "upload-sha256-long": (lambda e: _upload(e, sha256=HEX_BIG), INV, "sha256"),
    "upload-size-over": (lambda e: _upload(e, size=ServerLimits().max_upload_bytes + 1), EXH, "upload size"),
    "upload-offset-over": (lambda e: _upload(e, offset=len(e.good) + 1), INV, "offset"),
    "upload-chunk-over": (lambda e: _oversized_chunk(e), EXH, "chunk over"),
    "upload-status-id-1MiB": (lambda e: _upload_status(e, BIG), INV, "upload_id"),
    "upload-status-id-empty": (lambda e: _upload_status(e, ""), INV, "upload_id"),
    "knowledge-client-id-1MiB": (lambda e: _knowledge(e, client_id=BIG), INV, "client_id"),
    "knowledge-version-negative": (lambda e: _knowledge(e, version=-1), INV, "version"),
    "metrics-task-key-1MiB": (lambda e: _metrics(e, task_key=BIG), INV, "task_key"),
    "metrics-task-key-empty": (lambda e: _metrics(e, task_key=""), INV, "task_key"),
    "metrics-task-index-over": (lambda e: _metrics(e, task_index=wire.TASK_INDEX_MAX + 1), INV, "task_index"),
    "metrics-task-index-negative": (lambda e: _metrics(e, task_index=-1), INV, "task_index"),
    "metrics-name-65": (lambda e: _metrics(e, metrics={"m" * 65: 1.0}), INV, "metric name"),
    "metrics-name-1MiB": (lambda e: _metrics(e, metrics={BIG: 1.0}), INV, "metric name"),
    "metrics-name-leading-slash": (lambda e: _metrics(e, metrics={"/acc": 1.0}), INV, "metric name"),
    "metrics-too-many": (
        lambda e: _metrics(e, metrics={f"m{i}": 1.0 for i in range(wire.MAX_METRICS + 1)}),
        INV,
        "metrics per report",
    ),
    "status-max-jobs-over": (lambda e: _status(e, wire.MAX_STATUS_JOBS + 1), INV, "max_jobs"),
    "status-max-jobs-negative": (lambda e: _status(e, -1), INV, "max_jobs"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_value_past_its_bound_is_refused_and_stores_nothing(env: Env, name: str) -> None:
    call, code, names = CASES[name]
    before = snapshot(env.server)
    refused(lambda: call(env), code, names)
    assert snapshot(env.server) == before


def test_an_oversized_value_is_quoted_as_a_short_prefix(env: Env) -> None:
    """The 1 MiB metric name is not echoed: a prefix and its length, so the client sees the real error."""
    details = refused(lambda: _metrics(env, metrics={BIG: 1.0}), INV, "metric name")
    assert f"...({MB} chars)" in details and "a" * (wire.QUOTE_CHARS + 1) not in details
    assert wire.quoted("short") == "'short'"
    assert wire.quoted(b"x" * 100, 4) == "b'xxxx'...(100 bytes)"


def test_client_version_past_its_bound_is_refused(env: Env) -> None:
    """Checked in the domain (the transport passes RegisterRequest.client_version to it)."""
    service, alice = env.server.service, Principal("alice", False)
    before = snapshot(env.server)
    with pytest.raises(InvalidArgument, match="client_version") as exc:
        service.register(alice, "alice", "", "", client_version="v" * (wire.CLIENT_VERSION_MAX_CHARS + 1))
    assert len(str(exc.value)) < MAX_DETAILS
    assert snapshot(env.server) == before
    service.register(alice, "alice", "", "", client_version="v" * wire.CLIENT_VERSION_MAX_CHARS)


def test_values_at_their_bounds_are_accepted(env: Env) -> None:
    spec = "x" * wire.MODEL_SPEC_JSON_MAX_BYTES
    assert _register(env, client_id="alice", model_spec_json=spec)
    with env.server.state.tx() as db:  # stored whole: no silent truncation
        assert db.execute(select(clients.c.model_spec).where(clients.c.client_id == "alice")).scalar() == spec
    top_key, top_name = "k" * wire.ID_MAX_CHARS, "n" * wire.METRIC_NAME_MAX_CHARS
    assert report(env, "bob", {top_name: 1.0}, wire.TASK_INDEX_MAX, top_key) == 1
    assert report(env, "bob", {f"m{i}": 1.0 for i in range(wire.MAX_METRICS)}, 1) == wire.MAX_METRICS
    receipt = upload(
        env, "bob", env.good, "u" * wire.ID_MAX_CHARS, task_key=top_key, task_index=wire.TASK_INDEX_MAX
    )
    assert receipt.job_id > 0 and not receipt.duplicate
    assert len(_status(env, wire.MAX_STATUS_JOBS).jobs) >= 1


# -- per-client storage quotas --------------------------------------------------------------------------
def test_metric_rows_quota_refuses_that_client_only(env: Env) -> None:
    """Past max_metric_rows a client's new rows are refused; its old rows update; other clients report."""
    assert report(env, "meter-1", {f"m{i}": 1.0 for i in range(200)}, 0) == 200
    assert report(env, "meter-1", {f"m{i}": 1.0 for i in range(MAX_ROWS - 200)}, 1) == MAX_ROWS - 200
    before = snapshot(env.server)
    for task_index in (1, 2, 3):  # a repeated task_index with new names, or a fresh one: new rows
        details = refused(partial(report, env, "meter-1", {"fresh": 1.0}, task_index), EXH, "metric rows")
        assert f"{MAX_ROWS}" in details and "--max-metric-rows" in details
    assert snapshot(env.server) == before
    assert report(env, "meter-1", {"m0": 0.75}, 0) == 1  # replacing a stored row adds none: accepted
    assert report(env, "meter-2", {"m0": 0.5, "m1": 0.5}, 0) == 2  # another client is not affected
    assert upload(env, "meter-1", env.good, "meter-1-up").job_id > 0  # nor the client's other calls


def test_storage_quota_covers_packages_and_metrics(env: Env) -> None:
    """A client whose packages fill its quota can store nothing more; retries and other clients go on."""
    room = QUOTA_MB * MB - METRIC_ROW_BYTES // 2  # one more metric row would not fit
    big = padded(env.good, room)
    first = upload(env, "full", big, "full-1")
    assert not first.duplicate
    before = snapshot(env.server)
    refused(lambda: report(env, "full", {"acc": 0.5}), EXH, "storage quota")
    details = refused(lambda: upload(env, "full", env.good, "full-2"), EXH, "storage quota")
    assert "--client-quota-mb" in details and f"{room} bytes of packages" in details
    assert snapshot(env.server) == before
    assert upload(env, "full", big, "full-1").duplicate  # a retry of an accepted upload stores nothing
    assert upload(env, "full-other", env.good, "other-1").job_id > 0  # the quota is per client
    assert report(env, "full-other", {"acc": 0.5}) == 1


def test_storage_quota_covers_unfinished_uploads(env: Env) -> None:
    """Bytes held of an unfinished upload count (at its declared size); resuming it is not refused."""
    data = padded(env.good, 700 * 1024)
    half = len(data) // 2
    broken = [header(env, data, "part-1"), pb.UploadKnowledgeRequest(chunk=data[:half])]
    refused(
        lambda: env.stub.UploadKnowledge(iter(broken), metadata=env.md("part"), timeout=TIMEOUT),
        INV,
        "the server keeps them",
    )
    before = snapshot(env.server)
    other = padded(env.good, 400 * 1024)
    details = refused(lambda: upload(env, "part", other, "part-2"), EXH, "storage quota")
    assert f"{len(data)} of unfinished uploads" in details
    assert snapshot(env.server) == before
    rest = [header(env, data, "part-1", offset=half), pb.UploadKnowledgeRequest(chunk=data[half:])]
    receipt = env.stub.UploadKnowledge(iter(rest), metadata=env.md("part"), timeout=TIMEOUT)
    assert receipt.size == len(data) and not receipt.duplicate
    refused(lambda: upload(env, "part", other, "part-2"), EXH, "storage quota")  # now as a package


# -- the contract states the same bounds as the code --------------------------------------------------------
def proto_bounds(text: str) -> dict[str, str]:
    """ "Message.field" → the text of the `// bound:` comment line just above that field in the .proto."""
    found: dict[str, str] = {}
    message, pending = "", ""
    for line in text.splitlines():
        if m := re.match(r"\s*message (\w+) \{", line):
            message, pending = m.group(1), ""
        elif m := re.match(r"\s*// bound: (.+)$", line):
            pending = m.group(1).strip()
        elif m := re.match(r"\s*(?:repeated\s+)?(?:map<[^>]+>|[\w.]+)\s+(\w+)\s*=\s*\d+;", line):
            if pending:
                found[f"{message}.{m.group(1)}"] = pending
            pending = ""
        elif not line.strip().startswith("//"):
            pending = ""
    return found


def request_messages() -> list[Descriptor]:
    """Every message a client sends: the RPCs' request types and the messages they contain."""
    seen: dict[str, Descriptor] = {}
    todo = [m.input_type for m in pb.DESCRIPTOR.services_by_name["FclService"].methods]
    while todo:
        msg = todo.pop()
        if msg.full_name in seen or msg.GetOptions().map_entry:
            continue
        seen[msg.full_name] = msg
        todo += [f.message_type for f in msg.fields if f.message_type is not None]
    return list(seen.values())


def test_proto_bound_comments_equal_the_limits_module() -> None:
    assert proto_bounds(PROTO.read_text()) == wire.PROTO_BOUNDS


def test_every_string_bytes_repeated_and_map_request_field_has_a_bound() -> None:
    unbounded = []
    for msg in request_messages():
        for f in msg.fields:
            many = f.is_repeated or f.type in (FieldDescriptor.TYPE_STRING, FieldDescriptor.TYPE_BYTES)
            if many and f"{msg.name}.{f.name}" not in wire.PROTO_BOUNDS:
                unbounded.append(f"{msg.name}.{f.name}")
    assert not unbounded, f"request fields without a bound in common/wire_limits.py: {unbounded}"
    assert {"ReportMetricsRequest.metrics", "UploadKnowledgeRequest.chunk"} <= set(wire.PROTO_BOUNDS)


def test_enforced_defaults_come_from_the_limits_module() -> None:
    limits, package = ServerLimits(), PackageLimits()
    assert (limits.max_chunk_bytes, limits.max_metrics, limits.max_labels) == (
        wire.MAX_CHUNK_BYTES,
        wire.MAX_METRICS,
        wire.MAX_LABELS,
    )
    assert (package.max_labels, package.max_feature_dim) == (wire.MAX_LABELS, wire.MAX_FEATURE_DIM)
