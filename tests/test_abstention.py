"""Out-of-scope abstention: calibration keeps its coverage, far-off features abstain, thresholds survive a
checkpoint and a package, the client calibrates on training data only, and Classify answers out_of_scope
(real gRPC server)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch

from common.algorithms.abstention import (
    OUT_OF_SCOPE,
    AbstentionError,
    Threshold,
    abstains,
    apply,
    calibrate,
    calibrate_on_stats,
    calibrate_threshold,
    confidence,
    holdout_split,
)
from common.algorithms.obod import Head
from common.algorithms.stats import StatsBank
from common.config import AbstentionConfig, SMCFConfig
from common.fm import FoundationModel
from common.package import KnowledgePackage, PackageError, decode_package, encode_package
from common.stubs.fcl.v1 import fcl_pb2 as pb
from common.stubs.fcl.v1 import fcl_pb2_grpc
from common.zoo import parse_spec
from fcl_client import FclClient
from fcl_client import cli as client_cli
from fcl_client.checkpoint import CheckpointStore
from fcl_client.learner import Learner
from fcl_server.classify import score_features
from tests.servers import inprocess_server, package_bytes

DIM, LABELS, PER_LABEL = 16, ["a", "b", "c", "d"], 60
FAST = SMCFConfig(epochs=3, min_steps=150, consolidate_steps=50)


def clustered(per_label: int, seed: int) -> tuple[torch.Tensor, list[str], torch.Tensor]:
    """Unit-norm features around one mean per label (the means span only the first 4 dimensions)."""
    gen = torch.Generator().manual_seed(seed)
    means = torch.zeros(len(LABELS), DIM)
    means[:, : len(LABELS)] = 3 * torch.eye(len(LABELS))
    feats = means.repeat_interleave(per_label, 0) + 0.6 * torch.randn(
        len(LABELS) * per_label, DIM, generator=gen
    )
    return feats, [y for y in LABELS for _ in range(per_label)], means


def far_feature() -> torch.Tensor:
    """Orthogonal to every class mean, at the same distance from the origin: belongs to no label."""
    x = torch.zeros(1, DIM)
    x[0, -1] = 3.0
    return x


# -- the pure module ----------------------------------------------------------------------------------------
def test_calibration_keeps_the_stated_coverage_on_held_out_in_scope_data() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(40_000, 10, generator=gen)
    calib, held = logits[:20_000], logits[20_000:]
    for coverage in (0.8, 0.95, 0.99):
        t = calibrate(calib, coverage)
        kept_calib = int((~abstains(calib, t)).sum())
        assert kept_calib >= coverage * len(calib) - 1e-6  # at least the coverage it was fitted on ...
        assert kept_calib <= coverage * len(calib) + 1  # ... and no more than it must keep
        assert float((~abstains(held, t)).float().mean()) == pytest.approx(coverage, abs=0.01)


def test_calibrate_threshold_is_the_largest_that_keeps_the_coverage() -> None:
    scores = torch.arange(1, 101, dtype=torch.float32) / 100  # 0.01 .. 1.00
    assert calibrate_threshold(scores, 0.95) == pytest.approx(0.06)  # keeps 0.06..1.00: 95 of 100
    assert calibrate_threshold(scores, 1.0) == pytest.approx(0.01)
    with pytest.raises(AbstentionError, match="no held-out"):
        calibrate_threshold(torch.empty(0), 0.95)
    with pytest.raises(AbstentionError, match="coverage"):
        calibrate_threshold(scores, 0.0)


def test_scores_and_apply() -> None:
    logits = torch.tensor([[5.0, 0.0, 0.0], [0.1, 0.0, 0.0]])
    assert confidence(logits, "msp")[0] > 0.9 > confidence(logits, "msp")[1]
    assert confidence(logits, "energy").tolist() == pytest.approx(torch.logsumexp(logits, 1).tolist())
    t = Threshold(0.5)
    assert apply(logits, ["x", "y", "z"], t) == ["x", OUT_OF_SCOPE]
    assert apply(logits, ["x", "y", "z"], None) == ["x", "x"]  # no threshold: never abstains


def test_threshold_json_is_checked() -> None:
    t = Threshold(0.42, "energy", 0.9, "stats", 12)
    assert Threshold.from_json(t.to_json()) == t
    for bad in ('{"value": "x"}', '{"value": 1, "score": "magic"}', '{"value": 1, "coverage": 2}', "[1]"):
        with pytest.raises(AbstentionError):
            Threshold.from_json(bad)


def test_holdout_split_is_stratified_deterministic_and_keeps_singletons() -> None:
    labels = ["a"] * 10 + ["b"] * 5 + ["c"]
    train, held = holdout_split(labels, 0.2, seed=3)
    assert sorted(train + held) == list(range(len(labels)))
    assert [labels[i] for i in held].count("a") == 2 and [labels[i] for i in held].count("b") == 1
    assert "c" not in [labels[i] for i in held]  # its only example is needed to learn it
    assert holdout_split(labels, 0.2, seed=3) == (train, held)


def test_a_head_calibrated_on_statistics_abstains_far_from_every_class() -> None:
    feats, labels, _ = clustered(PER_LABEL, 0)
    bank = StatsBank(DIM, rank=4)
    bank.add_features(feats, labels)
    learner = Learner(parse_spec("linear"), DIM, "digest", abstention=AbstentionConfig(enabled=False))
    torch.manual_seed(0)
    learner.train(feats, labels, FAST)
    assert learner.model is not None
    t = calibrate_on_stats(learner.model, learner.labels, bank)
    assert t is not None and t.source == "stats" and t.samples == 64 * len(LABELS)
    test_feats, _, _ = clustered(50, 1)
    with torch.no_grad():
        in_scope = abstains(learner.model(test_feats), t)
        far = abstains(learner.model(far_feature()), t)
    assert bool(far[0]), "a feature of no label must be answered out_of_scope"
    assert float(in_scope.float().mean()) < 0.15, "in-scope features are answered"
    assert calibrate_on_stats(learner.model, ["unknown"], bank) is None  # the bank describes none of them


# -- the client's learner -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained() -> Learner:
    feats, labels, _ = clustered(PER_LABEL, 0)
    learner = Learner(parse_spec("mlp:32"), DIM, "digest")
    torch.manual_seed(0)
    learner.train(feats, labels, FAST, seed=5)
    return learner


def test_the_client_calibrates_on_a_held_out_slice_and_abstains_far_off(trained: Learner) -> None:
    t = trained.small_threshold
    assert t is not None and t.source == "holdout" and t.coverage == 0.95
    assert t.samples == round(0.2 * PER_LABEL) * len(LABELS)
    assert trained.calibration_s > 0
    test_feats, _, _ = clustered(50, 1)
    scoped = trained.predict_scoped(torch.cat([test_feats, far_feature()]), top=2)
    assert scoped[-1].out_of_scope and scoped[-1].ranked  # the ranking is still there
    assert sum(p.out_of_scope for p in scoped[:-1]) / len(test_feats) < 0.15
    raw = trained.predict_scoped(far_feature(), top=2, abstain=False)
    assert not raw[0].out_of_scope


def test_calibration_does_not_change_the_model_trained_on_everything() -> None:
    feats, labels, _ = clustered(PER_LABEL, 0)
    models = []
    for enabled in (True, False):
        learner = Learner(parse_spec("mlp:32"), DIM, "digest", abstention=AbstentionConfig(enabled=enabled))
        torch.manual_seed(0)
        learner.train(feats, labels, FAST, seed=5)
        learner.train(feats + 0.01, labels, FAST, seed=6)  # the second task's init draws follow the first's
        assert learner.model is not None
        models.append(learner.model.state_dict())
        assert (learner.small_threshold is not None) == enabled
    for key in models[0]:
        assert torch.equal(models[0][key], models[1][key]), key


def test_thresholds_survive_the_checkpoint(trained: Learner, tmp_path: Path) -> None:
    head = Head(trained.model, list(trained.labels), Threshold(0.3, source="stats"))  # type: ignore[arg-type]
    trained.absorb_personal(head, 1, FAST.model_copy(update={"consolidate_steps": 0}), 0)
    assert trained.personal_threshold is not None and trained.personal_threshold.source == "holdout"
    trained.save(tmp_path / "ckpt")
    loaded = Learner.load(tmp_path / "ckpt")
    assert loaded.small_threshold == trained.small_threshold
    assert loaded.personal_threshold == trained.personal_threshold
    assert loaded.personal is not None and loaded.personal.abstention == Threshold(0.3, source="stats")
    assert loaded.threshold("personal") == trained.personal_threshold  # the client's own comes first
    loaded.personal_threshold = None
    assert loaded.threshold("personal") == Threshold(0.3, source="stats")  # else the server's


def test_a_checkpoint_from_before_abstention_never_abstains(trained: Learner, tmp_path: Path) -> None:
    trained.save(tmp_path / "old")
    meta = tmp_path / "old" / "meta.json"
    raw = json.loads(meta.read_text())
    del raw["abstention"]
    meta.write_text(json.dumps(raw))
    loaded = Learner.load(tmp_path / "old")
    assert loaded.threshold("small") is None
    assert not any(p.out_of_scope for p in loaded.predict_scoped(far_feature()))


# -- packages and the server's heads ------------------------------------------------------------------------
def test_a_package_carries_its_threshold_and_an_old_one_has_none(trained: Learner) -> None:
    assert trained.model is not None
    plain = KnowledgePackage.from_model(trained.model, trained.labels, "d", "head")
    assert decode_package(encode_package(plain)).abstention is None
    t = Threshold(0.5, "msp", 0.95, "stats", 256)
    with_t = KnowledgePackage.from_model(trained.model, trained.labels, "d", "head", abstention=t)
    assert decode_package(encode_package(with_t)).abstention == t
    data = encode_package(with_t).replace(b'\\"coverage\\": 0.95', b'\\"coverage\\": 9.50')
    with pytest.raises(PackageError, match="abstention"):
        decode_package(data)


def test_a_head_without_a_threshold_never_abstains(trained: Learner) -> None:
    assert trained.model is not None
    with torch.no_grad():
        results = score_features(Head(trained.model, trained.labels), far_feature(), 2)
    assert not results[0].out_of_scope and results[0].confidence == 0.0
    with torch.no_grad():
        results = score_features(Head(trained.model, trained.labels, Threshold(0.99)), far_feature(), 2)
    assert results[0].out_of_scope


# -- end to end ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, fm: FoundationModel) -> Iterator[object]:
    tmp = tmp_path_factory.mktemp("oos-server")
    running = inprocess_server(tmp, fm, uploads_per_minute=0)
    running.state.add_token("tok-ops", "ops", True)
    running.state.add_token("tok-alice", "alice", False)
    yield running
    running.stop(grace=1)


def test_classify_answers_out_of_scope_with_the_threshold_the_worker_calibrated(
    server: object, fm: FoundationModel
) -> None:
    """The upload's statistics describe random features of norm ~20; real text features (norm 1) lie far
    from every class mean, so the head the worker calibrated on those statistics abstains on them."""
    from fcl_client.connection import Connection

    port = server.port  # type: ignore[attr-defined]
    labels = ["open_door", "close_door", "ring_bell"]
    with Connection(f"127.0.0.1:{port}", "tok-alice") as conn:
        receipt = conn.upload(package_bytes(fm, labels), "u-0", "task-00", 0, fm.digest)
        assert conn.watch_job(receipt.job_id, timeout=300).state == pb.JOB_STATE_DONE
        _, data = conn.get_knowledge(pb.HEAD_SCOPE_PERSONAL)
    personal = decode_package(data)
    assert personal.abstention is not None and personal.abstention.source == "stats"
    texts = ["open the door please", "what is the capital of mongolia"]
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = fcl_pb2_grpc.FclServiceStub(channel)
        for token, scope in (("tok-ops", pb.HEAD_SCOPE_GLOBAL), ("tok-alice", pb.HEAD_SCOPE_PERSONAL)):
            response = stub.Classify(
                pb.ClassifyRequest(texts=texts, top_k=2, scope=scope),
                metadata=(("authorization", f"Bearer {token}"),),
                timeout=60,
            )
            assert response.HasField("abstention")
            assert response.abstention.calibrated_on == "stats"
            assert response.abstention.coverage == AbstentionConfig().stats_coverage
            assert all(r.out_of_scope for r in response.results)
            assert all(r.confidence < response.abstention.threshold for r in response.results)
            assert all(len(r.labels) == 2 for r in response.results)  # the ranking is still answered
    with torch.no_grad():  # the verdict is the head's, on features computed here
        local = score_features(
            Head(personal.build(), personal.labels, personal.abstention), fm.encode(texts), 2
        )
    assert [r.out_of_scope for r in local] == [True, True]


def test_the_client_calibrates_on_its_training_data_never_its_test_data(
    tmp_path: Path, fm: FoundationModel, small_split: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two runs with the same training data and different test data calibrate the same thresholds; then
    `fcl-client predict` on the first run's work dir."""
    from common.datasets.streams import load_task_stream

    task = load_task_stream(small_split / "clients" / "client-0")[0]
    texts, labels = [ex.text for ex in task.train], [ex.label for ex in task.train]
    other = load_task_stream(small_split / "clients" / "client-1")[0].test
    thresholds = []
    for i, test in enumerate((task.test, other)):
        running = inprocess_server(tmp_path / f"s{i}", fm, public_corpus=small_split / "public.txt")
        running.state.add_token("tok-0", "client-0", False)
        try:
            torch.manual_seed(0)
            target = f"127.0.0.1:{running.port}"
            with FclClient(
                target, "client-0", "tok-0", tmp_path / f"w{i}", "mlp:64", fm=fm, smcf=FAST
            ) as client:
                client.run_task(task.name, texts, labels, [ex.text for ex in test], [ex.label for ex in test])
            learner = CheckpointStore(tmp_path / f"w{i}").load()[1]
            assert learner is not None
            thresholds.append((learner.small_threshold, learner.personal_threshold))
        finally:
            running.stop(grace=1)
    (small_a, personal_a), (small_b, personal_b) = thresholds
    assert small_a is not None and personal_a is not None
    assert small_a.samples == len(holdout_split(labels, 0.2, 0)[1])  # a slice of the training data
    assert small_a == small_b and personal_a == personal_b
    predict_prints_out_of_scope(tmp_path / "w0", capsys)


def predict_prints_out_of_scope(work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`fcl-client predict`: out_of_scope with the top label's probability where the head abstains (a
    threshold above any probability here); `--no-abstain` and `--json` still give the ranking."""
    store = CheckpointStore(work)
    progress, learner = store.load()
    assert learner is not None
    learner.small_threshold = Threshold(1.5, source="holdout")
    store.save(progress, learner)
    assert client_cli.main(["predict", "--work-dir", str(work), "--top", "2", "open the door"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "open the door"
    assert lines[1].strip().startswith(f"{OUT_OF_SCOPE}  (top label ") and "< threshold 1.500" in lines[1]
    assert len(lines) == 2  # no ranking under it
    assert (
        client_cli.main(["predict", "--work-dir", str(work), "--top", "2", "--no-abstain", "open the door"])
        == 0
    )
    raw = capsys.readouterr().out.splitlines()
    assert len(raw) == 3 and OUT_OF_SCOPE not in "".join(raw)
    assert client_cli.main(["predict", "--work-dir", str(work), "--json", "open the door"]) == 0
    answer = json.loads(capsys.readouterr().out)[0]
    assert answer["out_of_scope"] is True and len(answer["labels"]) == 5
