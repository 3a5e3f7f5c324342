"""Bad inputs against a real in-process server over gRPC: exact status, a clear message, no state change."""

from __future__ import annotations

import hashlib
import io
import json
import os
import sqlite3
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from common.fm import FoundationModel
from common.package import KnowledgePackage, encode_package
from common.stubs.fcl.v1 import fcl_pb2 as pb
from common.stubs.fcl.v1 import fcl_pb2_grpc
from common.zoo import SmallModel, parse_spec
from fcl_server.app import RunningServer
from fcl_server.schema import heads
from fcl_server.service import ServerLimits
from tests.servers import held_parts, inprocess_server, package_bytes

LABELS = ["open_door", "close_door"]
TIMEOUT = 30.0
Code = grpc.StatusCode
LIMITS = ServerLimits()
Msgs = list[pb.UploadKnowledgeRequest]


# -- packages -------------------------------------------------------------------------------------
def unpack(data: bytes) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and string metadata of a safetensors file (to re-save them edited)."""
    header_len = int.from_bytes(data[:8], "little")
    return st_load(data), json.loads(data[8 : 8 + header_len])["__metadata__"]


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Armed:
    """Unpickling this creates a directory: proof that a pickle payload was (never) executed."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.mkdir, (str(self.marker),))


@dataclass(frozen=True)
class Kit:
    """What the cases build on: the server's FM, a valid package (stats with a rank-2 basis), ids."""

    digest: str
    dim: int
    good: bytes
    marker: Path
    bob_job: int
    alice_job: int

    def edit(self, tensors: Mapping[str, torch.Tensor | None] | None = None, **meta: object) -> bytes:
        """The good package with tensors replaced (None: removed) and metadata fields replaced."""
        current, metadata = unpack(self.good)
        for name, value in (tensors or {}).items():
            if value is None:
                current.pop(name)
            else:
                current[name] = value
        for key, value in meta.items():
            metadata[key] = value if isinstance(value, str) else json.dumps(value)
        return st_save(current, metadata=metadata)

    def basis(self, *shape: int, fill: float | None = None) -> bytes:
        tensor = torch.full(shape, fill) if fill is not None else 0.1 * torch.randn(*shape)
        return self.edit({"stats.basis": tensor})

    def pickled(self, zip_format: bool) -> bytes:
        buf = io.BytesIO()
        payload = {"model.out.weight": torch.zeros(2, self.dim), "x": Armed(self.marker)}
        torch.save(payload, buf, _use_new_zipfile_serialization=zip_format)
        return buf.getvalue()


def good_package(fm: FoundationModel) -> bytes:
    tensors, metadata = unpack(package_bytes(fm, LABELS))
    tensors["stats.basis"] = 0.1 * torch.randn(len(LABELS), 2, fm.feature_dim)
    return st_save(tensors, metadata=metadata)


def head_package(fm: FoundationModel) -> bytes:
    model = SmallModel(parse_spec("linear"), fm.feature_dim, len(LABELS))
    return encode_package(KnowledgePackage.from_model(model, LABELS, fm.digest, kind="head"))


def upload(kit: Kit, data: bytes, uid: str, chunks: list[bytes] | None = None, **header: Any) -> Msgs:
    """An UploadKnowledge stream: a header describing `data` (fields overridable), then its chunks."""
    fields: dict[str, Any] = {
        "upload_id": uid,
        "task_key": "task-00",
        "task_index": 0,
        "fm_digest": kit.digest,
        "size": len(data),
        "sha256": sha(data),
    }
    fields.update(header)
    first = pb.UploadKnowledgeRequest(header=pb.UploadHeader(**fields))
    return [first] + [pb.UploadKnowledgeRequest(chunk=c) for c in ([data] if chunks is None else chunks)]


# -- server and state --------------------------------------------------------------------------------
@dataclass
class Env:
    server: RunningServer
    stub: fcl_pb2_grpc.FclServiceStub
    kit: Kit
    tokens: dict[str, str]

    def md(self, who: str) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.tokens[who]}"),)


def seed(server: RunningServer, fm: FoundationModel, data: bytes) -> tuple[int, int]:
    """Give alice and bob a queued job and a personalised head each (no distillation: it takes minutes)."""
    blob = server.service.blobs.put_bytes(data)
    head_blob = server.service.blobs.put_bytes(head_package(fm))
    jobs = []
    for client in ("alice", "bob"):
        server.state.touch_client(client)
        job_id, _ = server.state.add_upload_and_job(client, "seed-1", "task-00", 0, len(data), blob)
        jobs.append(job_id)
        with server.state.tx() as db:
            row = {"scope": "personal", "client_id": client, "version": 1, "blob": head_blob}
            db.execute(heads.insert(), {**row, "job_id": job_id, "num_labels": 2, "created": 0})
    return jobs[0], jobs[1]


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, fm: FoundationModel) -> Iterator[Env]:
    tmp = tmp_path_factory.mktemp("bad-inputs")
    # the upload-rate limit has its own tests; here every case uploads twice
    server = inprocess_server(tmp, fm, uploads_per_minute=0)
    server.worker.stop()  # jobs stay queued: these tests are about the RPC layer, not distillation
    tokens = {"alice": "tok-alice", "bob": "tok-bob", "ops": "tok-ops", "carol": "tok-carol"}
    for name, tok in tokens.items():
        server.state.add_token(tok, name, name == "ops")
    server.state.revoke_tokens("carol")
    data = good_package(fm)
    alice_job, bob_job = seed(server, fm, data)
    kit = Kit(fm.digest, fm.feature_dim, data, tmp / "pickle-ran", bob_job, alice_job)
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield Env(server, fcl_pb2_grpc.FclServiceStub(channel), kit, tokens)
    server.stop(grace=1)


def snapshot(server: RunningServer) -> dict[str, list[Any]]:
    """Every row of every table of the state DB, and every file of the blob store (temp files too).

    Upload ids bound to bytes held for a resume are left out: keeping those is the point."""
    db = sqlite3.connect(f"file:{server.state_dir / 'state.sqlite3'}?mode=ro", uri=True)
    try:
        names = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table' ORDER BY name")]
        out = {name: sorted(db.execute(f"SELECT * FROM {name}").fetchall()) for name in names}
    finally:
        db.close()
    # rate accounting, not stored data: a refused upload was still sent, and its bytes count
    out.pop("rate_buckets", None)
    # an upload id stays bound while bytes of it are held for a resume; a binding without them leaks
    out["upload_reservations"] = [
        r for r in out["upload_reservations"] if r[1] not in held_parts(server.state_dir, r[0])
    ]
    blobs = server.service.blobs.root
    out["blob files"] = sorted(str(p.relative_to(blobs)) for p in blobs.rglob("*") if p.is_file())
    assert out["jobs"] and out["heads"]  # the snapshot sees the seeded state
    return out


def expect_error(call: Callable[[], object], code: grpc.StatusCode, says: str) -> str:
    with pytest.raises(grpc.RpcError) as exc:
        call()
    err = exc.value
    assert isinstance(err, grpc.Call)
    assert err.code() == code, err.details()
    details = err.details() or ""
    assert says.lower() in details.lower(), details
    return details


def good_upload_works(env: Env, upload_id: str) -> None:
    """The server still takes a valid upload, under the id the rejected one used (it was not burned)."""
    receipt = env.stub.UploadKnowledge(
        iter(upload(env.kit, env.kit.good, upload_id)), metadata=env.md("alice"), timeout=TIMEOUT
    )
    assert not receipt.duplicate and receipt.job_id > 0 and receipt.sha256 == sha(env.kit.good)


def own_head_works(env: Env) -> None:
    chunks = list(env.stub.GetKnowledge(pb.GetKnowledgeRequest(), metadata=env.md("alice"), timeout=TIMEOUT))
    header, data = chunks[0].header, b"".join(c.chunk for c in chunks[1:])
    assert header.client_id == "alice" and header.version == 1 and sha(data) == header.sha256


# -- malformed upload streams and packages --------------------------------------------------------------
@dataclass(frozen=True)
class BadUpload:
    id: str
    build: Callable[[Kit, str], Msgs]  # (kit, upload id) → the stream to send
    code: grpc.StatusCode
    says: str | Callable[[Kit], str]  # a fragment of the error message (some depend on the FM)


def stream_case(
    id: str, build: Callable[[Kit, str], Msgs], code: Code, says: str | Callable[[Kit], str]
) -> Any:
    return pytest.param(BadUpload(id, build, code, says), id=id)


def package_case(
    id: str,
    data: Callable[[Kit], bytes],
    says: str | Callable[[Kit], str],
    code: Code = Code.INVALID_ARGUMENT,
) -> Any:
    """A well-formed stream whose header truthfully describes a bad package."""
    return stream_case(id, lambda k, uid: upload(k, data(k), uid), code, says)


NAN, INF = float("nan"), float("inf")
MAX_CHUNK, MAX_UPLOAD = LIMITS.max_chunk_bytes, LIMITS.max_upload_bytes

STREAM_CASES = [
    stream_case("no-messages", lambda k, uid: [], Code.INVALID_ARGUMENT, "first UploadKnowledge message"),
    stream_case(
        "chunk-before-header",
        lambda k, uid: [pb.UploadKnowledgeRequest(chunk=k.good), *upload(k, k.good, uid)],
        Code.INVALID_ARGUMENT,
        "must be the header",
    ),
    stream_case(
        "second-header",
        lambda k, uid: (m := upload(k, k.good, uid))[:1] + m,
        Code.INVALID_ARGUMENT,
        "only chunks may follow the header",
    ),
    stream_case(
        "stream-ends-early",
        lambda k, uid: upload(k, k.good, uid, chunks=[k.good[: len(k.good) // 2]]),
        Code.INVALID_ARGUMENT,
        lambda k: f"received {len(k.good) // 2} bytes but the header announced {len(k.good)}",
    ),
    stream_case(
        "more-bytes-than-declared",
        lambda k, uid: upload(k, k.good, uid, chunks=[k.good, b"x"]),
        Code.INVALID_ARGUMENT,
        "more bytes arrived than the",
    ),
    stream_case(
        "wrong-sha256",
        lambda k, uid: upload(k, k.good, uid, sha256=sha(b"other")),
        Code.INVALID_ARGUMENT,
        "sha256 of the received bytes does not match",
    ),
    stream_case(
        "malformed-sha256",
        lambda k, uid: upload(k, k.good, uid, sha256="not-a-digest"),
        Code.INVALID_ARGUMENT,
        "sha256 must be 64 lowercase hex digits",
    ),
    stream_case(
        "oversized-chunk",
        lambda k, uid: upload(k, bytes(MAX_CHUNK + 1), uid),
        Code.RESOURCE_EXHAUSTED,
        f"chunk over {MAX_CHUNK} bytes",
    ),
    stream_case(
        "declared-size-over-limit",
        lambda k, uid: upload(k, k.good, uid, size=MAX_UPLOAD + 1),
        Code.RESOURCE_EXHAUSTED,
        f"upload size {MAX_UPLOAD + 1} is over the limit of {MAX_UPLOAD}",
    ),
    stream_case(
        "declared-size-zero",
        lambda k, uid: upload(k, b"", uid, size=0, chunks=[]),
        Code.INVALID_ARGUMENT,
        "size must be at least 1 byte",
    ),
    stream_case(
        "bad-upload-id",
        lambda k, uid: upload(k, k.good, uid, upload_id="../../etc/passwd"),
        Code.INVALID_ARGUMENT,
        "upload_id must be",
    ),
    stream_case(
        "bad-task-key",
        lambda k, uid: upload(k, k.good, uid, task_key=""),
        Code.INVALID_ARGUMENT,
        "task_key must be",
    ),
    stream_case(
        "negative-task-index",
        lambda k, uid: upload(k, k.good, uid, task_index=-1),
        Code.INVALID_ARGUMENT,
        "task_index must be >= 0",
    ),
    stream_case(
        "header-names-another-fm",
        lambda k, uid: upload(k, k.good, uid, fm_digest="f" * 64),
        Code.FAILED_PRECONDITION,
        "different FM than the server's",
    ),
]

PAYLOAD_CASES = [
    package_case("pickle-payload", lambda k: k.pickled(zip_format=False), "zip/pickle (torch.save) payload"),
    package_case("zip-payload", lambda k: k.pickled(zip_format=True), "zip/pickle (torch.save) payload"),
    package_case(
        "garbage", lambda k: b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}", "not a valid safetensors"
    ),
    package_case("truncated-package", lambda k: k.good[: len(k.good) // 2], "not a valid safetensors"),
    package_case(
        "package-names-another-fm",
        lambda k: k.edit(fm_digest="e" * 64),
        "names a different FM digest",
        Code.FAILED_PRECONDITION,
    ),
    package_case("wrong-format", lambda k: k.edit(format="fcl-knowledge/99"), "format is 'fcl-knowledge/99'"),
    package_case("head-not-small", lambda k: k.edit(kind="head"), "must be small-model packages"),
    package_case("bad-spec", lambda k: k.edit(spec='{"kind": "transformer"}'), "not a valid zoo spec"),
]

WEIGHT_CASES = [
    package_case(
        "spec-weight-mismatch",
        lambda k: k.edit(spec=parse_spec("mlp:16").to_json()),
        "weights do not match the spec: missing ['body.0.bias', 'body.0.weight']",
    ),
    package_case(
        "weight-shape-mismatch",
        lambda k: k.edit({"model.out.weight": torch.zeros(3, k.dim)}),
        lambda k: f"weight out.weight has shape (3, {k.dim}), spec needs (2, {k.dim})",
    ),
    package_case(
        "extra-weight",
        lambda k: k.edit({"model.body.9.weight": torch.zeros(2, 2)}),
        "unexpected ['body.9.weight']",
    ),
    package_case(
        "tensor-outside-format",
        lambda k: k.edit({"evil.payload": torch.zeros(1)}),
        "tensors outside the format: ['evil.payload']",
    ),
    package_case(
        "integer-weights",
        lambda k: k.edit({"model.out.bias": torch.zeros(2, dtype=torch.int64)}),
        "out.bias has dtype torch.int64",
    ),
    package_case(
        "nan-weight",
        lambda k: k.edit({"model.out.weight": torch.full((2, k.dim), NAN)}),
        "weight out.weight contains NaN or Inf",
    ),
    package_case(
        "inf-weight",
        lambda k: k.edit({"model.out.bias": torch.tensor([0.0, INF])}),
        "weight out.bias contains NaN or Inf",
    ),
    package_case(
        "minus-inf-weight",
        lambda k: k.edit({"model.out.bias": torch.tensor([-INF, 0.0])}),
        "weight out.bias contains NaN or Inf",
    ),
    package_case(
        "feature-dim-differs-from-fm",
        lambda k: k.edit(
            {
                "model.out.weight": torch.zeros(2, 128),
                "stats.mean": torch.zeros(2, 128),
                "stats.std": torch.ones(2, 128),
                "stats.basis": torch.zeros(2, 2, 128),
            },
            feature_dim="128",
        ),
        "package feature_dim 128 differs from the FM's",
    ),
    package_case(
        "feature-dim-differs-from-weights",
        lambda k: k.edit(feature_dim="128"),
        "spec needs (2, 128)",
    ),
    package_case(
        "feature-dim-not-int", lambda k: k.edit(feature_dim="lots"), "feature_dim is not an integer"
    ),
]

LABEL_CASES = [
    package_case(
        "label-too-long",
        lambda k: k.edit(labels=["open_door", "x" * 129]),
        "is 129 characters long, over the limit of 128",
    ),
    package_case("label-empty", lambda k: k.edit(labels=["open_door", ""]), "label '' is empty"),
    package_case(
        "label-newline",
        lambda k: k.edit(labels=["open_door", "a\nb"]),
        "label 'a\\nb' has a control character (Cc) U+000A",
    ),
    package_case(
        "label-rtl-override",
        lambda k: k.edit(labels=["open_door", "abc\u202edef"]),
        "label 'abc\\u202edef' has a format character (Cf) U+202E RIGHT-TO-LEFT OVERRIDE at position 4",
    ),
    package_case(
        "label-line-separator",
        lambda k: k.edit(labels=["open_door", "a\u2028b"]),
        "has a line separator (Zl) U+2028",
    ),
    package_case(
        "label-not-nfc",
        lambda k: k.edit(labels=["open_door", "cafe\u0301"]),
        "is not NFC-normalised (its NFC form is 'café')",
    ),
    package_case(
        "label-not-string",
        lambda k: k.edit(labels=["open_door", 7]),
        "label '7' is of type int, not a string",
    ),
    package_case("labels-not-list", lambda k: k.edit(labels={"a": 1}), "non-empty JSON list"),
    package_case("labels-empty", lambda k: k.edit(labels=[]), "non-empty JSON list"),
    package_case("labels-not-json", lambda k: k.edit(labels="[open_door"), "labels are not a JSON list"),
    package_case("duplicate-labels", lambda k: k.edit(labels=["open_door", "open_door"]), "duplicates"),
    package_case(
        "too-many-labels",
        lambda k: k.edit(labels=[f"label_{i}" for i in range(LIMITS.max_labels + 1)]),
        f"has {LIMITS.max_labels + 1} labels, over the limit of {LIMITS.max_labels}",
    ),
    package_case("counts-mismatch", lambda k: k.edit(counts=[4, 4, 4]), "3 counts for 2 labels"),
    package_case("negative-count", lambda k: k.edit(counts=[4, -1]), "non-negative integers"),
]

STATS_CASES = [
    package_case(
        "stats-shape",
        lambda k: k.edit({"stats.mean": torch.zeros(3, k.dim)}),
        "statistics shapes do not match 2 labels",
    ),
    package_case("stats-missing-std", lambda k: k.edit({"stats.std": None}), "statistics need stats.count"),
    package_case(
        "stats-basis-alone",
        lambda k: k.edit({"stats.count": None, "stats.mean": None, "stats.std": None}),
        "statistics need stats.count",
    ),
    package_case(
        "stats-unknown-label",
        lambda k: k.edit(stats_labels=["close_door", "ghost_label"]),
        "statistics name labels that the package does not have",
    ),
    package_case(
        "stats-label-twice", lambda k: k.edit(stats_labels=["open_door", "open_door"]), "a label twice"
    ),
    package_case("stats-nan-mean", lambda k: k.edit({"stats.mean": torch.full((2, k.dim), NAN)}), "NaN/Inf"),
    package_case("stats-inf-std", lambda k: k.edit({"stats.std": torch.full((2, k.dim), INF)}), "NaN/Inf"),
    package_case(
        "stats-zero-count", lambda k: k.edit({"stats.count": torch.tensor([4.0, 0.0])}), "non-positive counts"
    ),
    package_case(
        "stats-negative-count",
        lambda k: k.edit({"stats.count": torch.tensor([-4.0, 4.0])}),
        "non-positive counts",
    ),
    package_case(
        "stats-count-half", lambda k: k.edit({"stats.count": torch.tensor([0.5, 4.0])}), "whole numbers"
    ),
    package_case(
        "stats-fractional-count", lambda k: k.edit({"stats.count": torch.tensor([1.5, 4.0])}), "whole numbers"
    ),
    package_case(
        "stats-huge-count", lambda k: k.edit({"stats.count": torch.tensor([1e12, 4.0])}), "at most 1000000000"
    ),
    package_case(
        "label-blank", lambda k: k.edit(labels=["open_door", "   "]), "has leading or trailing whitespace"
    ),
    package_case("basis-2d", lambda k: k.basis(2, k.dim), "stats.basis has shape"),
    package_case("basis-wrong-labels", lambda k: k.basis(3, 2, k.dim), "it must be (2, k, "),
    package_case("basis-wrong-dim", lambda k: k.basis(2, 2, k.dim - 1), "it must be (2, k, "),
    package_case("basis-rank-over-64", lambda k: k.basis(2, 65, k.dim), "with k <= 64"),
    package_case("basis-nan", lambda k: k.basis(2, 2, k.dim, fill=NAN), "NaN/Inf"),
    package_case("basis-inf", lambda k: k.basis(2, 2, k.dim, fill=-INF), "NaN/Inf"),
]


@pytest.mark.parametrize("case", STREAM_CASES + PAYLOAD_CASES + WEIGHT_CASES + LABEL_CASES + STATS_CASES)
def test_bad_upload_is_rejected_without_state_change(env: Env, case: BadUpload) -> None:
    upload_id = f"case-{case.id}"
    says = case.says if isinstance(case.says, str) else case.says(env.kit)
    before = snapshot(env.server)
    messages = case.build(env.kit, upload_id)
    details = expect_error(
        lambda: env.stub.UploadKnowledge(iter(messages), metadata=env.md("alice"), timeout=TIMEOUT),
        case.code,
        says,
    )
    assert len(details) < 2000  # a message, not an echo of the payload
    assert snapshot(env.server) == before
    assert not env.kit.marker.exists(), "the server unpickled an uploaded payload"
    good_upload_works(env, upload_id)


def test_labels_as_real_datasets_have_them_are_accepted(env: Env) -> None:
    """Any printable Unicode is a label (common/labels.py): what LABEL_RE once refused is taken now."""
    pairs = [
        ["reverted_card_payment?", "cancel & refund"],
        ["what's my balance", "top up (card)"],
        ["<b>x</b>", "a;drop"],
        ["../x", "#tag +1"],
        ["汇率 (exchange rate)", "丢失的卡"],
        ["שלום עולם", "مرحبا بالعالم"],
        ["🎉 party", "👨\u200d👩\u200d👧 family"],  # joiners inside an emoji sequence
        ["é" * 128, "😀" * 128],  # 128 characters, 2 and 4 bytes each in UTF-8
    ]
    for i, labels in enumerate(pairs):
        data = env.kit.edit(labels=labels, stats_labels=labels)
        receipt = env.stub.UploadKnowledge(
            iter(upload(env.kit, data, f"unicode-{i}")), metadata=env.md("alice"), timeout=TIMEOUT
        )
        assert not receipt.duplicate and receipt.sha256 == sha(data), labels


def test_valid_basis_variants_are_accepted(env: Env) -> None:
    """The checks above reject bad statistics, not good ones: no basis, rank 0 and rank 64 all pass."""
    variants = {
        "no-basis": env.kit.edit({"stats.basis": None}),
        "rank-0": env.kit.basis(2, 0, env.kit.dim),
        "rank-64": env.kit.basis(2, 64, env.kit.dim),
    }
    for name, data in variants.items():
        receipt = env.stub.UploadKnowledge(
            iter(upload(env.kit, data, f"ok-{name}")), metadata=env.md("alice"), timeout=TIMEOUT
        )
        assert not receipt.duplicate and receipt.sha256 == sha(data), name


def padded_to(kit: Kit, total: int) -> bytes:
    """The good package grown to exactly `total` bytes by a metadata field the format ignores."""
    pad = ""
    for _ in range(8):  # the safetensors header is padded to 8 bytes, so this converges in a few steps
        data = kit.edit(pad=pad)
        if len(data) == total:
            return data
        pad = "p" * (len(pad) + total - len(data))
    raise AssertionError(f"could not pad the package to {total} bytes")


def test_chunk_of_exactly_the_limit_is_accepted(env: Env) -> None:
    """A chunk of max_chunk_bytes passes the transport (gRPC's own 4 MiB cap counts framing bytes too)."""
    data = padded_to(env.kit, MAX_CHUNK)
    messages = upload(env.kit, data, "chunk-at-limit")
    assert len(messages) == 2 and len(messages[1].chunk) == MAX_CHUNK
    receipt = env.stub.UploadKnowledge(iter(messages), metadata=env.md("alice"), timeout=TIMEOUT)
    assert receipt.size == MAX_CHUNK and not receipt.duplicate


def test_pickle_payload_would_run_if_unpickled(env: Env, tmp_path: Path) -> None:
    """Keeps the pickle cases honest: their payload really executes code when loaded with pickle."""
    marker = tmp_path / "ran"
    kit = Kit(env.kit.digest, env.kit.dim, env.kit.good, marker, 0, 0)
    torch.load(io.BytesIO(kit.pickled(zip_format=True)), weights_only=False)
    assert marker.is_dir()


def test_reused_upload_id_with_other_content_is_refused(env: Env) -> None:
    env.stub.UploadKnowledge(iter(upload(env.kit, env.kit.good, "reused")), metadata=env.md("alice"))
    other = env.kit.edit(counts=[5, 5])
    before = snapshot(env.server)
    expect_error(
        lambda: env.stub.UploadKnowledge(iter(upload(env.kit, other, "reused")), metadata=env.md("alice")),
        Code.FAILED_PRECONDITION,
        "upload id 'reused' was already used for different content",
    )
    assert snapshot(env.server) == before
    good_upload_works(env, "reused-then-fresh")


# -- credentials and ownership ------------------------------------------------------------------------
def _rpcs(env: Env) -> dict[str, Callable[[Any], object]]:
    """One call of each RPC (streams consumed) with the given metadata; valid requests otherwise."""
    s, k = env.stub, env.kit
    return {
        "Register": lambda md: s.Register(
            pb.RegisterRequest(client_id="alice"), metadata=md, timeout=TIMEOUT
        ),
        "GetFoundationModel": lambda md: list(
            s.GetFoundationModel(pb.GetFoundationModelRequest(), metadata=md, timeout=TIMEOUT)
        ),
        "UploadKnowledge": lambda md: s.UploadKnowledge(
            iter(upload(k, k.good, "auth-case")), metadata=md, timeout=TIMEOUT
        ),
        "WatchJob": lambda md: list(
            s.WatchJob(pb.WatchJobRequest(job_id=k.alice_job), metadata=md, timeout=5)
        ),
        "GetKnowledge": lambda md: list(
            s.GetKnowledge(pb.GetKnowledgeRequest(), metadata=md, timeout=TIMEOUT)
        ),
        "ReportMetrics": lambda md: s.ReportMetrics(
            pb.ReportMetricsRequest(task_key="task-00", metrics={"small/acc": 0.5}),
            metadata=md,
            timeout=TIMEOUT,
        ),
        "GetStatus": lambda md: s.GetStatus(pb.GetStatusRequest(), metadata=md, timeout=TIMEOUT),
    }


CREDENTIALS = {
    "wrong-token": (("authorization", "Bearer fcl_not-a-token-anyone-was-given"),),
    "revoked-token": (("authorization", "Bearer tok-carol"),),
    "no-bearer-scheme": (("authorization", "tok-alice"),),
    "no-metadata": (),
}
RPC_NAMES = [
    "Register",
    "GetFoundationModel",
    "UploadKnowledge",
    "WatchJob",
    "GetKnowledge",
    "ReportMetrics",
    "GetStatus",
]


@pytest.mark.parametrize("rpc", RPC_NAMES)
@pytest.mark.parametrize("credential", list(CREDENTIALS))
def test_bad_credentials_are_unauthenticated(env: Env, rpc: str, credential: str) -> None:
    before = snapshot(env.server)
    says = (
        "missing bearer token" if credential in ("no-bearer-scheme", "no-metadata") else "unknown or revoked"
    )
    expect_error(lambda: _rpcs(env)[rpc](CREDENTIALS[credential]), Code.UNAUTHENTICATED, says)
    assert snapshot(env.server) == before
    own_head_works(env)


ACCESS_CASES = {
    # name: (caller, rpc, request, code, message fragment)
    "another-clients-head": (
        "alice",
        "GetKnowledge",
        pb.GetKnowledgeRequest(client_id="bob"),
        Code.PERMISSION_DENIED,
        "only its own personalised head",
    ),
    "global-head-as-client": (
        "alice",
        "GetKnowledge",
        pb.GetKnowledgeRequest(scope=pb.HEAD_SCOPE_GLOBAL),
        Code.PERMISSION_DENIED,
        "admin token only",
    ),
    "another-clients-job": ("alice", "WatchJob", None, Code.NOT_FOUND, "no job"),
    "register-as-another-client": (
        "alice",
        "Register",
        pb.RegisterRequest(client_id="bob"),
        Code.PERMISSION_DENIED,
        "token belongs to client 'alice', not 'bob'",
    ),
    "status-as-client": ("alice", "GetStatus", pb.GetStatusRequest(), Code.PERMISSION_DENIED, "admin token"),
    "metrics-as-admin": (
        "ops",
        "ReportMetrics",
        pb.ReportMetricsRequest(task_key="t", metrics={"a": 1.0}),
        Code.PERMISSION_DENIED,
        "admin token has no client identity",
    ),
}


def _call(env: Env, rpc: str, request: Any, who: str) -> object:
    method = getattr(env.stub, rpc)
    result = method(request, metadata=env.md(who), timeout=TIMEOUT)
    return list(result) if rpc in ("GetKnowledge", "WatchJob", "GetFoundationModel") else result


@pytest.mark.parametrize("name", list(ACCESS_CASES))
def test_access_to_what_is_not_yours_is_refused(env: Env, name: str) -> None:
    who, rpc, request, code, says = ACCESS_CASES[name]
    if request is None:  # bob's job id is known only once the fixture ran
        request = pb.WatchJobRequest(job_id=env.kit.bob_job)
    before = snapshot(env.server)
    details = expect_error(lambda: _call(env, rpc, request, who), code, says)
    assert "bob's" not in details and "open_door" not in details  # nothing of bob's leaks
    assert snapshot(env.server) == before
    own_head_works(env)


def test_admin_cannot_upload_as_a_client(env: Env) -> None:
    before = snapshot(env.server)
    expect_error(
        lambda: env.stub.UploadKnowledge(
            iter(upload(env.kit, env.kit.good, "by-admin")), metadata=env.md("ops")
        ),
        Code.PERMISSION_DENIED,
        "an admin token has no client identity",
    )
    assert snapshot(env.server) == before


def test_another_clients_job_looks_like_no_job(env: Env) -> None:
    """NOT_FOUND for bob's job says exactly what it says for a job that does not exist: no existence leak."""

    def details(job_id: int) -> str:
        request = pb.WatchJobRequest(job_id=job_id)
        return expect_error(lambda: _call(env, "WatchJob", request, "alice"), Code.NOT_FOUND, "no job")

    missing = 10**9
    assert details(env.kit.bob_job).replace(str(env.kit.bob_job), "N") == details(missing).replace(
        str(missing), "N"
    )
    call = env.stub.WatchJob(
        pb.WatchJobRequest(job_id=env.kit.alice_job), metadata=env.md("alice"), timeout=5
    )
    assert next(call).state == pb.JOB_STATE_QUEUED  # while alice follows her own job
    call.cancel()


# -- other RPC arguments ----------------------------------------------------------------------------------
MISC_CASES = {
    "metric-nan": (pb.ReportMetricsRequest(task_key="t", metrics={"acc": NAN}), "finite number"),
    "metric-inf": (pb.ReportMetricsRequest(task_key="t", metrics={"acc": INF}), "finite number"),
    "metric-minus-inf": (pb.ReportMetricsRequest(task_key="t", metrics={"acc": -INF}), "finite number"),
    "metric-bad-name": (pb.ReportMetricsRequest(task_key="t", metrics={"a b;c": 1.0}), "use a short name"),
    "too-many-metrics": (
        pb.ReportMetricsRequest(task_key="t", metrics={f"m{i}": 1.0 for i in range(LIMITS.max_metrics + 1)}),
        f"at most {LIMITS.max_metrics} metrics",
    ),
    "register-bad-digest": (pb.RegisterRequest(fm_digest="not-a-digest"), "64-character lowercase hex"),
    "fm-offset-negative": (pb.GetFoundationModelRequest(offset=-1), "offset -1 is outside the archive"),
    "fm-offset-past-end": (pb.GetFoundationModelRequest(offset=1 << 40), "is outside the archive"),
}


@pytest.mark.parametrize("name", list(MISC_CASES))
def test_bad_arguments_are_invalid(env: Env, name: str) -> None:
    request, says = MISC_CASES[name]
    rpc = {
        pb.ReportMetricsRequest: "ReportMetrics",
        pb.RegisterRequest: "Register",
        pb.GetFoundationModelRequest: "GetFoundationModel",
    }[type(request)]
    before = snapshot(env.server)
    expect_error(lambda: _call(env, rpc, request, "alice"), Code.INVALID_ARGUMENT, says)
    assert snapshot(env.server) == before
    stored = env.stub.ReportMetrics(
        pb.ReportMetricsRequest(task_key="t", metrics={"acc": 0.5}), metadata=env.md("alice"), timeout=TIMEOUT
    )
    assert stored.stored == 1


def test_changed_fm_archive_is_a_failed_precondition(env: Env) -> None:
    request = pb.GetFoundationModelRequest(offset=10, archive_sha256="0" * 64)
    before = snapshot(env.server)
    expect_error(
        lambda: _call(env, "GetFoundationModel", request, "alice"),
        Code.FAILED_PRECONDITION,
        "the server's FM archive changed; restart the download from offset 0",
    )
    assert snapshot(env.server) == before
