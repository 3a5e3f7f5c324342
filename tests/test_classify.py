"""Classify over gRPC on real in-process servers: who may use which head, bounds, the answer itself (equal to
the head applied to FM features computed here), the head cache, the version that answers as new heads are
published (also on a front-end without a worker), and that a busy encoder blocks no other call."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import torch
from google.protobuf.descriptor_pb2 import FileDescriptorProto
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from common import wire_limits as wire
from common.algorithms.obod import Head
from common.datasets import builtin
from common.fm import FoundationModel
from common.package import decode_package
from common.stubs.fcl.v1 import fcl_pb2 as pb
from common.stubs.fcl.v1 import fcl_pb2_grpc
from fcl_client.connection import Connection
from fcl_server.app import RunningServer
from fcl_server.database import sqlite_url
from tests.servers import inprocess_server, package_bytes, wait_until

TIMEOUT = 60.0
Code = grpc.StatusCode
MAX_CALLS = 2  # the module server admits two Classify calls at once, so a test can fill it
ALICE_LABELS = ["open_door", "close_door", "ring_bell"]


@dataclass
class Env:
    server: RunningServer
    stub: fcl_pb2_grpc.FclServiceStub
    fm: FoundationModel

    def classify(self, who: str | None, texts: list[str], **fields: object) -> pb.ClassifyResponse:
        metadata = (("authorization", f"Bearer tok-{who}"),) if who else None
        request = pb.ClassifyRequest(texts=texts, **fields)  # type: ignore[arg-type]
        return self.stub.Classify(request, metadata=metadata, timeout=TIMEOUT)

    def refused(self, who: str | None, texts: list[str], code: Code, **fields: object) -> str:
        with pytest.raises(grpc.RpcError) as exc:
            self.classify(who, texts, **fields)
        err = exc.value
        assert isinstance(err, grpc.Call)
        assert err.code() == code, err.details()
        details = str(err.details())
        assert len(details) < 512, "a status message is short, never an echo of the input"
        return details


def distilled(server: RunningServer, token: str, fm: FoundationModel, labels: list[str], n: int) -> None:
    """Upload a package of `labels` as the n-th upload of its client and wait until its job is DONE."""
    with Connection(f"127.0.0.1:{server.port}", token) as conn:
        receipt = conn.upload(package_bytes(fm, labels), f"upload-{n}", f"task-{n:02d}", n, fm.digest)
        event = conn.watch_job(receipt.job_id, timeout=300)
    assert event.state == pb.JOB_STATE_DONE, event.message


def add_tokens(server: RunningServer, *names: str) -> None:
    for name in names:
        server.state.add_token(f"tok-{name}", name, name == "ops")


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, fm: FoundationModel) -> Iterator[Env]:
    """A server where alice's one upload was distilled (global and alice's personal head v1); bob has none."""
    server = inprocess_server(
        tmp_path_factory.mktemp("classify"), fm, uploads_per_minute=0, max_classify_calls=MAX_CALLS
    )
    add_tokens(server, "alice", "bob", "ops")
    distilled(server, "tok-alice", fm, ALICE_LABELS, 0)
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield Env(server, fcl_pb2_grpc.FclServiceStub(channel), fm)
    server.stop(grace=1)


def some_texts(n: int) -> list[str]:
    return [ex.text for ex in builtin.load_test()[:n]]


def head_of(conn: Connection, scope: pb.HeadScope.ValueType, client_id: str = "") -> tuple[int, Head]:
    """A head as GetKnowledge downloads it: its version, and the head itself."""
    header, data = conn.get_knowledge(scope, client_id=client_id)
    pkg = decode_package(data)
    return header.version, Head(pkg.build(), pkg.labels)


@torch.no_grad()
def expected(fm: FoundationModel, head: Head, texts: list[str], k: int) -> list[list[tuple[str, float]]]:
    """The top-k of each text from the head applied to FM features computed here (not on the server)."""
    probs = torch.softmax(head.model(fm.encode(texts)), dim=1)
    values, index = probs.topk(min(k, probs.shape[1]), dim=1)
    return [
        [(head.labels[i], v) for v, i in zip(vs, ix, strict=True)]
        for vs, ix in zip(values.tolist(), index.tolist(), strict=True)
    ]


def answers(response: pb.ClassifyResponse) -> list[list[tuple[str, float]]]:
    return [[(s.label, s.probability) for s in r.labels] for r in response.results]


def assert_same(got: list[list[tuple[str, float]]], want: list[list[tuple[str, float]]]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert [y for y, _ in g] == [y for y, _ in w]
        assert [p for _, p in g] == pytest.approx([p for _, p in w], abs=1e-5)


# -- who may use which head ---------------------------------------------------------------------------------
def test_admin_classifies_with_the_global_head_and_any_clients_personal_head(env: Env) -> None:
    g = env.classify("ops", ["open the door please"], scope=pb.HEAD_SCOPE_GLOBAL)
    assert (g.scope, g.client_id, g.head_version, g.num_labels) == (pb.HEAD_SCOPE_GLOBAL, "", 1, 3)
    p = env.classify("ops", ["open the door please"], scope=pb.HEAD_SCOPE_PERSONAL, client_id="alice")
    assert (p.scope, p.client_id, p.head_version) == (pb.HEAD_SCOPE_PERSONAL, "alice", 1)
    details = env.refused("ops", ["open the door"], Code.INVALID_ARGUMENT, scope=pb.HEAD_SCOPE_PERSONAL)
    assert "client_id" in details and "HEAD_SCOPE_GLOBAL" in details


def test_a_client_classifies_with_its_own_personal_head_only(env: Env) -> None:
    for fields in ({}, {"scope": pb.HEAD_SCOPE_PERSONAL}, {"client_id": "alice"}):  # UNSPECIFIED: personal
        own = env.classify("alice", ["ring the bell"], **fields)
        assert (own.scope, own.client_id, own.head_version, own.num_labels) == (
            pb.HEAD_SCOPE_PERSONAL,
            "alice",
            1,
            3,
        )
    details = env.refused("alice", ["ring the bell"], Code.PERMISSION_DENIED, client_id="bob")
    assert "own personalised head" in details
    details = env.refused("alice", ["ring the bell"], Code.PERMISSION_DENIED, scope=pb.HEAD_SCOPE_GLOBAL)
    assert "admin" in details
    env.refused(None, ["ring the bell"], Code.UNAUTHENTICATED)
    with pytest.raises(grpc.RpcError) as exc:
        Connection(f"127.0.0.1:{env.server.port}", "not-a-token", retries=0).classify(["x"])
    assert isinstance(exc.value, grpc.Call) and exc.value.code() == Code.UNAUTHENTICATED


def test_a_client_without_a_head_yet_gets_failed_precondition(env: Env) -> None:
    details = env.refused("bob", ["ring the bell"], Code.FAILED_PRECONDITION)
    assert "'bob' has no personalised head yet" in details
    details = env.refused("ops", ["x"], Code.FAILED_PRECONDITION, client_id="bob")
    assert "no personalised head yet" in details


# -- bounds -------------------------------------------------------------------------------------------------
def test_batch_size_is_bounded(env: Env) -> None:
    details = env.refused("alice", [], Code.INVALID_ARGUMENT)
    assert f"1-{wire.MAX_CLASSIFY_TEXTS} texts" in details and "not 0" in details
    details = env.refused("alice", ["a text"] * (wire.MAX_CLASSIFY_TEXTS + 1), Code.INVALID_ARGUMENT)
    assert f"not {wire.MAX_CLASSIFY_TEXTS + 1}" in details and "split them" in details
    full = env.classify("alice", ["a text"] * wire.MAX_CLASSIFY_TEXTS, top_k=1)
    assert len(full.results) == wire.MAX_CLASSIFY_TEXTS


def test_text_length_is_bounded_in_code_points(env: Env) -> None:
    at_bound = "😀" * wire.CLASSIFY_TEXT_MAX_CHARS  # 4 UTF-8 bytes each: the bound counts characters
    assert len(env.classify("alice", [at_bound]).results) == 1
    details = env.refused("alice", ["fine", at_bound + "x"], Code.INVALID_ARGUMENT)
    assert "text 1" in details and f"limit of {wire.CLASSIFY_TEXT_MAX_CHARS}" in details
    details = env.refused("alice", ["fine", " \t\n "], Code.INVALID_ARGUMENT)
    assert "text 1 is empty" in details


def test_top_k_scope_and_client_id_are_bounded(env: Env) -> None:
    for bad in (-1, wire.CLASSIFY_TOP_K_MAX + 1):
        details = env.refused("alice", ["x"], Code.INVALID_ARGUMENT, top_k=bad)
        assert f"<= {wire.CLASSIFY_TOP_K_MAX}" in details and f"not {bad}" in details
    assert "not a HeadScope" in env.refused("alice", ["x"], Code.INVALID_ARGUMENT, scope=7)
    assert "client_id must be" in env.refused("ops", ["x"], Code.INVALID_ARGUMENT, client_id="a b" * 100)


def test_reflection_describes_classify_for_grpcurl(env: Env) -> None:
    """grpcurl finds a method through server reflection: the file of the service, with its messages."""
    with grpc.insecure_channel(f"127.0.0.1:{env.server.port}") as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(file_containing_symbol="fcl.v1.FclService")
        (response,) = list(stub.ServerReflectionInfo(iter([request])))
    files = [
        FileDescriptorProto.FromString(b) for b in response.file_descriptor_response.file_descriptor_proto
    ]
    methods = {m.name: m for f in files for s in f.service for m in s.method}
    assert methods["Classify"].input_type == ".fcl.v1.ClassifyRequest"
    assert {"ClassifyRequest", "ClassifyResponse", "TextLabels", "LabelScore"} <= {
        m.name for f in files for m in f.message_type
    }


def test_the_proto_states_the_bounds() -> None:
    """tests/test_bounds.py compares every `bound:` comment with wire.PROTO_BOUNDS; these are Classify's."""
    assert {"ClassifyRequest.texts", "ClassifyRequest.top_k", "ClassifyRequest.client_id"} <= set(
        wire.PROTO_BOUNDS
    )
    assert str(wire.MAX_CLASSIFY_TEXTS) in wire.PROTO_BOUNDS["ClassifyRequest.texts"]


# -- the answer ----------------------------------------------------------------------------------------------
def test_top_k_is_ordered_and_probabilities_sum_to_at_most_one(env: Env) -> None:
    texts = some_texts(12)
    for k, want in ((0, min(wire.CLASSIFY_DEFAULT_TOP_K, 3)), (1, 1), (2, 2), (wire.CLASSIFY_TOP_K_MAX, 3)):
        response = env.classify("alice", texts, top_k=k)
        assert len(response.results) == len(texts)
        for row in response.results:
            probs = [s.probability for s in row.labels]
            assert len(probs) == want and len({s.label for s in row.labels}) == want
            assert probs == sorted(probs, reverse=True)
            assert all(0.0 <= p <= 1.0 for p in probs) and sum(probs) <= 1.0 + 1e-6
            assert {s.label for s in row.labels} <= set(ALICE_LABELS)
    full = env.classify("alice", texts, top_k=3)  # every label: a distribution
    assert all(sum(s.probability for s in r.labels) == pytest.approx(1.0, abs=1e-5) for r in full.results)


def test_answers_equal_the_head_on_fm_features_computed_directly(env: Env) -> None:
    texts = some_texts(40)  # of many lengths: the server encodes them sorted by length, in batches
    with Connection(f"127.0.0.1:{env.server.port}", "tok-ops") as admin:
        g_version, g_head = head_of(admin, pb.HEAD_SCOPE_GLOBAL)
        p_version, p_head = head_of(admin, pb.HEAD_SCOPE_PERSONAL, "alice")
    g = env.classify("ops", texts, top_k=3, scope=pb.HEAD_SCOPE_GLOBAL)
    assert g.head_version == g_version
    assert_same(answers(g), expected(env.fm, g_head, texts, 3))
    p = env.classify("alice", texts, top_k=2)
    assert p.head_version == p_version
    assert_same(answers(p), expected(env.fm, p_head, texts, 2))


def test_texts_are_nfc_normalised_and_stripped_as_training_texts_are(env: Env) -> None:
    plain = env.classify("alice", ["Café: open the door"], top_k=3)
    decomposed = env.classify("alice", ["  Cafe\u0301: open the door \n"], top_k=3)
    assert answers(decomposed) == answers(plain)


def test_a_head_is_decoded_once_per_version(env: Env) -> None:
    heads = env.server.service.classifier.heads
    env.classify("alice", ["open the door"])
    loads = heads.loads
    for _ in range(3):
        env.classify("alice", ["open the door"])
    assert heads.loads == loads, "a cached head was read from its blob again"


# -- concurrency ---------------------------------------------------------------------------------------------
def test_a_busy_encoder_blocks_no_other_call_and_excess_calls_are_refused(env: Env) -> None:
    classifier = env.server.service.classifier
    release = threading.Event()
    blocker = classifier.executor.submit(release.wait, 60)  # the one encoder thread is busy
    try:
        pending = [
            env.stub.Classify.future(
                pb.ClassifyRequest(texts=["open the door"]),
                metadata=(("authorization", "Bearer tok-alice"),),
                timeout=TIMEOUT,
            )
            for _ in range(MAX_CALLS)
        ]
        wait_until(lambda: classifier.calls == MAX_CALLS, "both Classify calls are admitted", 30)
        details = env.refused("alice", ["one too many"], Code.RESOURCE_EXHAUSTED)
        assert "--max-classify-calls" in details
        started = time.monotonic()  # other calls are served meanwhile: Classify waits hold no RPC thread
        with Connection(f"127.0.0.1:{env.server.port}", "tok-bob") as bob:
            assert bob.register("bob", env.fm.digest).fm_matches
            assert bob.report_metrics("task-00", 0, {"small/acc": 0.5}) == 1
            assert bob.upload_status("never-sent").committed_size == 0
        assert time.monotonic() - started < 10
        assert not any(f.done() for f in pending)
    finally:
        release.set()
    blocker.result(timeout=10)
    assert all(f.result(timeout=TIMEOUT).head_version == 1 for f in pending)
    wait_until(lambda: classifier.calls == 0, "the admitted calls are released", 10)


# -- new heads -----------------------------------------------------------------------------------------------
def test_the_answering_version_follows_each_newly_published_head(tmp_path: Path, fm: FoundationModel) -> None:
    server = inprocess_server(tmp_path, fm, uploads_per_minute=0)
    try:
        add_tokens(server, "carol", "ops")
        with Connection(f"127.0.0.1:{server.port}", "tok-ops", retries=0) as admin:
            with pytest.raises(grpc.RpcError) as exc:
                admin.classify(["hello"], scope=pb.HEAD_SCOPE_GLOBAL)
            assert isinstance(exc.value, grpc.Call) and exc.value.code() == Code.FAILED_PRECONDITION
            assert "no global head yet" in str(exc.value.details())
            distilled(server, "tok-carol", fm, ["book_flight", "cancel_flight"], 0)
            first = admin.classify(["book me a flight"], top_k=5, scope=pb.HEAD_SCOPE_GLOBAL)
            assert (first.head_version, first.num_labels) == (1, 2)
            # an upload is accepted and distilled while the encoder is busy with a Classify call
            release = threading.Event()
            blocker = server.service.classifier.executor.submit(release.wait, 120)
            try:
                busy = admin.stub.Classify.future(
                    pb.ClassifyRequest(texts=["x"], scope=pb.HEAD_SCOPE_GLOBAL),
                    metadata=admin.metadata,
                    timeout=TIMEOUT * 3,
                )
                wait_until(lambda: server.service.classifier.calls == 1, "the Classify call waits", 30)
                distilled(server, "tok-carol", fm, ["play_music", "stop_music", "skip_song"], 1)
            finally:
                release.set()
            blocker.result(timeout=10)
            assert busy.result(timeout=TIMEOUT).head_version == 1  # the latest when it began
            second = admin.classify(["play some music"], top_k=5, scope=pb.HEAD_SCOPE_GLOBAL)
            assert (second.head_version, second.num_labels) == (2, 5)
            g_version, g_head = head_of(admin, pb.HEAD_SCOPE_GLOBAL)
            assert g_version == 2
            assert_same(answers(second), expected(fm, g_head, ["play some music"], 5))
        with Connection(f"127.0.0.1:{server.port}", "tok-carol") as carol:
            own = carol.classify(["skip this song"])
            assert (own.client_id, own.head_version, own.num_labels) == ("carol", 2, 5)
    finally:
        server.stop(grace=1)


def test_a_front_end_without_a_worker_answers_with_the_heads_the_worker_publishes(
    tmp_path: Path, fm: FoundationModel
) -> None:
    """`serve --no-worker` on the database and blob dir of a server that distils: the front-end's head
    cache follows the versions in the database, whichever process published them."""
    for name in ("main", "front"):
        (tmp_path / name).mkdir()
    main = inprocess_server(tmp_path / "main", fm, uploads_per_minute=0)
    front = None
    try:
        shared = main.state_dir
        front = inprocess_server(
            tmp_path / "front",
            fm,
            worker=False,
            database=sqlite_url(shared / "state.sqlite3"),
            blob_dir=shared,
        )
        add_tokens(main, "dave", "ops")
        distilled(main, "tok-dave", fm, ["turn_on_light", "turn_off_light"], 0)
        with Connection(f"127.0.0.1:{front.port}", "tok-dave") as dave:
            assert dave.classify(["lights on"]).head_version == 1
            distilled(main, "tok-dave", fm, ["set_alarm", "cancel_alarm"], 1)
            answer = dave.classify(["wake me up at seven"], top_k=4)
        assert (answer.head_version, answer.num_labels) == (2, 4)
        assert front.service.classifier.heads.loads == 2
        with Connection(f"127.0.0.1:{main.port}", "tok-dave") as direct:
            version, head = head_of(direct, pb.HEAD_SCOPE_PERSONAL)
        assert version == 2
        assert_same(answers(answer), expected(fm, head, ["wake me up at seven"], 4))
    finally:
        if front is not None:
            front.stop(grace=1)
        main.stop(grace=1)
