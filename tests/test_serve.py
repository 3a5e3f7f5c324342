"""`fcl-client serve`: the HTTP predict endpoint on the edge, its schema, bounds, overload and hot reload.

A trained work dir is made once per module (a linear small model learned on the first task of the
built-in data, a personalised head from a second learner), as `fcl-client run` leaves one; the
real server process and the in-thread uvicorn servers read it as they would any work dir.
"""

from __future__ import annotations

import copy
import json
import logging
import shutil
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hypothesis
import hypothesis.errors
import pytest
import requests
import schemathesis
import torch
import uvicorn
from schemathesis.checks import not_a_server_error
from schemathesis.generation import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    ignored_auth,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from common import wire_limits as wire
from common.algorithms.abstention import Threshold
from common.config import SMCFConfig
from common.datasets.streams import Task, load_task_stream
from common.fm import FoundationModel
from common.package import KnowledgePackage, encode_package
from common.zoo import SmallModel, parse_spec
from fcl_client import cli as client_cli
from fcl_client import http_api
from fcl_client import serving as edge_serving
from fcl_client.checkpoint import CheckpointStore, Progress, Step
from fcl_client.http_api import create_app, prediction_response
from fcl_client.learner import Learner
from fcl_client.runner import FM_ENCODING_FILE, FM_PATH_FILE
from fcl_client.serving import EdgePredictor, LoadedModel, predict
from tests.servers import self_signed_cert, wait_until

# fewer optimizer steps than the defaults: these tests check serving, not the last point of accuracy
FAST = SMCFConfig(epochs=2, min_steps=60, consolidate_steps=0)
PERSONAL_VERSION = 3
# checks that hold for any request: no 5xx, and every status, header and body as the schema says
CONFORMANCE = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    negative_data_rejection,
]


@dataclass
class Trained:
    work: Path  # small model (task 0) and a personalised head
    no_personal: Path  # the same small model, no personalised head yet
    stream: list[Task]
    next_features: torch.Tensor  # FM features of task 1's training texts (for a newer checkpoint)


def texts_of(task: Task, n: int = 6) -> list[str]:
    return [ex.text for ex in task.test[:: max(1, len(task.test) // n)][:n]]


def write_work_dir(work: Path, fm: FoundationModel, learner: Learner, progress: Progress) -> None:
    """What `fcl-client run` leaves: the FM it used, with its encoding, and a checkpoint."""
    work.mkdir(parents=True, exist_ok=True)
    (work / FM_PATH_FILE).write_text(str(fm.path))
    (work / FM_ENCODING_FILE).write_text(fm.encoding.canonical_json())
    CheckpointStore(work).save(progress, learner)


@pytest.fixture(scope="module")
def trained(
    tmp_path_factory: pytest.TempPathFactory, fm: FoundationModel, small_split: Path, one_torch_thread: None
) -> Trained:
    stream = load_task_stream(small_split / "clients" / "client-0")
    task = stream[0]
    feats = fm.encode([ex.text for ex in task.train])
    labels = [ex.label for ex in task.train]
    learner = Learner(parse_spec("linear"), fm.feature_dim, fm.digest)
    learner.train(feats, labels, FAST, seed=0)
    other = Learner(parse_spec("mlp:32"), fm.feature_dim, fm.digest)  # stands in for the server's P_c
    other.train(feats, labels, FAST, seed=1)
    assert other.model is not None
    head = KnowledgePackage.from_model(other.model, other.labels, fm.digest, "head")
    without = copy.deepcopy(learner)
    learner.set_personal(encode_package(head), PERSONAL_VERSION)
    root = tmp_path_factory.mktemp("serve")
    done = Progress(task_index=1, job_state="JOB_STATE_DONE")
    write_work_dir(root / "work", fm, learner, copy.deepcopy(done))
    write_work_dir(root / "no-personal", fm, without, copy.deepcopy(done))
    return Trained(
        root / "work", root / "no-personal", stream, fm.encode([ex.text for ex in stream[1].train])
    )


def train_next_task(work: Path, trained: Trained) -> int:
    """Learn task 1 on the work dir's learner and checkpoint it, as a client's next round does."""
    store = CheckpointStore(work)
    progress, learner = store.load()
    assert learner is not None
    learner.train(trained.next_features, [ex.label for ex in trained.stream[1].train], FAST, seed=2)
    progress = Progress(
        task_index=1, task_name=trained.stream[1].name, step=Step.TRAINED, snapshot=progress.snapshot
    )
    store.save(progress, learner)
    return progress.snapshot


@contextmanager
def serving(predictor: EdgePredictor, **options: Any) -> Iterator[str]:
    """The app under a real uvicorn on 127.0.0.1:0, in a thread of this process; yields its base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(predictor, **options), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        wait_until(lambda: server.started, "uvicorn started", timeout=30)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


@dataclass
class ServeProcess:
    url: str


@contextmanager
def serve_process(work: Path, log: Path, *options: str, ca: Path | None = None) -> Iterator[tuple[str, str]]:
    """A real `fcl-client serve` process on 127.0.0.1:0 (HTTPS ones trusted by `ca`); yields its first line
    and base URL."""
    cmd = [
        sys.executable,
        "-m",
        "fcl_client.cli",
        "serve",
        "--work-dir",
        str(work),
        "--listen",
        "127.0.0.1:0",
    ]
    cmd += ["--threads", "1", "--log-level", "warning", *options]
    with log.open("w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # "fcl-client serve: listening on http://127.0.0.1:PORT (...)"
        assert "listening on http" in line, (line, log.read_text())
        url = line.split("listening on ")[1].split()[0]
        wait_until(
            lambda: _up(url, proc, str(ca) if ca else True), "fcl-client serve answered /healthz", timeout=60
        )
        yield line, url
    finally:
        proc.terminate()  # uvicorn shuts down gracefully, then exits by the signal it was sent
        assert proc.wait(timeout=60) in (0, -signal.SIGTERM), log.read_text()
        assert "Traceback" not in log.read_text(), log.read_text()


@pytest.fixture(scope="module")
def served(trained: Trained, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    """A real `fcl-client serve` process on port 0 over the trained work dir."""
    log = tmp_path_factory.mktemp("serve-log") / "serve.log"
    with serve_process(trained.work, log) as (_, url):
        yield ServeProcess(url)


def _up(url: str, proc: subprocess.Popen[str], verify: str | bool) -> bool:
    assert proc.poll() is None, f"fcl-client serve exited with {proc.returncode}"
    try:
        return requests.get(f"{url}/healthz", timeout=5, verify=verify).status_code == 200
    except requests.ConnectionError:
        return False


@pytest.fixture
def no_personal_predictor(trained: Trained, fm: FoundationModel) -> Iterator[EdgePredictor]:
    predictor = EdgePredictor(trained.no_personal, fm)
    yield predictor
    predictor.close()


# -- schema-driven: every generated request gets a response as the schema says, never a 5xx --------------
# (schemathesis' pytest integration, `schemathesis.pytest.from_fixture`, fails under pytest 9: it reads
# `request.node._nodeid`; so each operation's case strategy is driven by Hypothesis here directly)
EXAMPLES = 25  # per operation and mode: enough to hit every bound's edge, few enough to stay fast


def check_every_operation(
    schema: Any, checks: list[Any] | None = None, headers: dict[str, str] | None = None
) -> list[str]:
    """Run generated positive and negative cases of every operation; returns the operations checked."""
    checked = []
    for result in schema.get_all_operations():
        operation = result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @hypothesis.settings(
                max_examples=EXAMPLES,
                deadline=None,
                derandomize=True,  # the same cases every run: a failure here is reproducible
                suppress_health_check=list(hypothesis.HealthCheck),
                database=None,
            )
            @hypothesis.given(case=operation.as_strategy(generation_mode=mode))
            def call(case: Any) -> None:
                case.call_and_validate(checks=checks, headers=headers)

            try:
                call()
            except hypothesis.errors.Unsatisfiable:
                if mode is GenerationMode.POSITIVE or operation.method.upper() != "GET":
                    raise  # (a GET without parameters has nothing to make invalid: no negative cases)
        checked.append(operation.label)
    return checked


def test_real_process_conforms_to_its_schema(served: ServeProcess) -> None:
    """Against `fcl-client serve` itself (both heads exist): the default checks, valid data accepted."""
    schema = schemathesis.openapi.from_url(f"{served.url}/openapi.json")
    assert sorted(check_every_operation(schema)) == ["GET /healthz", "GET /v1/model", "POST /v1/predict"]


def test_app_conforms_to_its_schema_before_the_first_round(no_personal_predictor: EdgePredictor) -> None:
    """No personalised head yet: a personal request is refused with a documented 409, nothing else breaks."""
    schema = schemathesis.openapi.from_asgi("/openapi.json", create_app(no_personal_predictor, watch=False))
    assert "POST /v1/predict" in check_every_operation(schema, CONFORMANCE)


# -- correctness --------------------------------------------------------------------------------------
def ranked(results: list[dict[str, Any]]) -> list[list[tuple[str, float]]]:
    return [[(s["label"], s["probability"]) for s in r["labels"]] for r in results]


def assert_same_answers(got: list[list[tuple[str, float]]], want: list[list[tuple[str, float]]]) -> None:
    assert [[y for y, _ in r] for r in got] == [[y for y, _ in r] for r in want]
    for g, w in zip(got, want, strict=True):
        assert [p for _, p in g] == pytest.approx([p for _, p in w], abs=1e-5)


def test_answers_equal_fcl_client_predict(
    served: ServeProcess, trained: Trained, fm: FoundationModel, capsys: pytest.CaptureFixture[str]
) -> None:
    texts = texts_of(trained.stream[0])
    _, learner = CheckpointStore(trained.work).load()
    assert learner is not None and learner.personal is not None
    bodies = {}
    for head in ("small", "personal"):
        answer = requests.post(
            f"{served.url}/v1/predict", json={"texts": texts, "top_k": 3, "head": head}, timeout=60
        )
        assert answer.status_code == 200, answer.text
        bodies[head] = body = answer.json()
        assert all(r["out_of_scope"] is False for r in body["results"])
        version, names = (
            (1, learner.labels) if head == "small" else (PERSONAL_VERSION, learner.personal.labels)
        )
        assert (body["head"], body["head_version"], body["num_labels"]) == (head, version, len(names))
    # the small head as `fcl-client predict` answers it, the personal one as Learner.predict does
    capsys.readouterr()
    assert client_cli.main(["predict", "--work-dir", str(trained.work), "--top", "3", "--json", *texts]) == 0
    offline = json.loads(capsys.readouterr().out)
    assert_same_answers(
        ranked(bodies["small"]["results"]), [[(s["label"], s["p"]) for s in r["labels"]] for r in offline]
    )
    want = learner.predict(fm.encode(texts), top=3, head="personal")
    assert_same_answers(ranked(bodies["personal"]["results"]), want)
    # the two heads are different models: their answers differ
    assert ranked(bodies["small"]["results"]) != ranked(bodies["personal"]["results"])


def test_model_and_health_describe_what_is_served(
    served: ServeProcess, trained: Trained, fm: FoundationModel
) -> None:
    progress, learner = CheckpointStore(trained.work).load()
    assert learner is not None and learner.personal is not None
    info = requests.get(f"{served.url}/v1/model", timeout=30).json()
    assert info["fm"] == {"name": fm.name, "digest": fm.digest, "feature_dim": fm.feature_dim}
    assert info["snapshot"] == progress.snapshot and info["tasks_learned"] == 1
    assert info["small"] == {"available": True, "version": 1, "labels": learner.labels}
    assert info["personal"] == {
        "available": True,
        "version": PERSONAL_VERSION,
        "labels": learner.personal.labels,
    }
    assert requests.get(f"{served.url}/healthz", timeout=30).json() == {
        "status": "ok",
        "snapshot": progress.snapshot,
    }


def test_domain_predict_is_the_learners(
    trained: Trained, fm: FoundationModel, no_personal_predictor: EdgePredictor
) -> None:
    texts = texts_of(trained.stream[0], 4)
    model = no_personal_predictor.current
    got = predict(fm, model, ["  " + texts[0] + "\n", *texts[1:]], 4, "small")  # stripped as training texts
    want = model.learner.predict(fm.encode(texts), top=4, head="small")
    assert [
        [(s.label, pytest.approx(s.probability, abs=1e-6)) for s in r.labels] for r in got.results
    ] == want
    assert (got.head, got.head_version, got.snapshot) == ("small", 1, model.snapshot)
    assert model.learner.bank is None  # only the heads are kept for serving


def test_a_text_below_the_heads_threshold_is_out_of_scope_unless_abstain_is_off(fm: FoundationModel) -> None:
    """Abstention comes from the head's calibrated threshold; the ranking is still given."""
    learner = Learner(parse_spec("linear"), fm.feature_dim, fm.digest, labels=["greet", "leave"])
    learner.model = SmallModel(parse_spec("linear"), fm.feature_dim, 2)
    with torch.no_grad():
        learner.model.out.weight.zero_()
        learner.model.out.bias.copy_(torch.tensor([0.1, 0.0]))  # about 0.52 for "greet", any text
    model = LoadedModel(learner, 1, 1, "", 0.0)
    never = predict(fm, model, ["hello there"], 2, "small")  # no threshold yet: never abstains
    assert not never.results[0].out_of_scope and never.results[0].confidence is None
    assert never.threshold is None
    learner.small_threshold = Threshold(0.9, source="holdout", samples=20)
    got = predict(fm, model, ["hello there"], 2, "small")
    assert got.results[0].out_of_scope is True and got.threshold == learner.small_threshold
    assert got.results[0].confidence == pytest.approx(got.results[0].labels[0].probability)
    assert [s.label for s in got.results[0].labels] == ["greet", "leave"]
    raw = predict(fm, model, ["hello there"], 2, "small", abstain=False)
    assert not raw.results[0].out_of_scope and raw.threshold is None
    body = prediction_response(got).model_dump()
    assert body["results"][0]["out_of_scope"] is True and body["threshold"] == 0.9


def test_personal_head_before_the_first_round_is_409(no_personal_predictor: EdgePredictor) -> None:
    with serving(no_personal_predictor, watch=False) as url:
        answer = requests.post(f"{url}/v1/predict", json={"texts": ["hi"], "head": "personal"}, timeout=30)
        small = requests.post(f"{url}/v1/predict", json={"texts": ["hi"]}, timeout=30)
    assert answer.status_code == 409
    assert (
        "no personalised head yet" in answer.json()["detail"]
        and "run a round first" in answer.json()["detail"]
    )
    assert small.status_code == 200 and small.json()["head"] == "small"


# -- bounds ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("body", "field", "words"),
    [
        ({"texts": ["hi"] * (wire.MAX_CLASSIFY_TEXTS + 1)}, "texts", "at most 256"),
        ({"texts": []}, "texts", "at least 1"),
        ({"texts": ["x" * (wire.CLASSIFY_TEXT_MAX_CHARS + 1)]}, "texts", "at most 2048"),
        ({"texts": ["   "]}, "texts", "only whitespace"),
        ({"texts": ["hi"], "top_k": 0}, "top_k", "greater than or equal to 1"),
        ({"texts": ["hi"], "top_k": wire.CLASSIFY_TOP_K_MAX + 1}, "top_k", "less than or equal to 20"),
        ({"texts": ["hi"], "head": "global"}, "head", "'small' or 'personal'"),
        ({"texts": ["hi"], "extra": 1}, "extra", "not permitted"),
    ],
)
def test_bounds_are_refused_with_422_naming_the_field(
    body: dict[str, Any], field: str, words: str, no_personal_predictor: EdgePredictor
) -> None:
    from starlette.testclient import TestClient

    with TestClient(create_app(no_personal_predictor, watch=False)) as client:
        answer = client.post("/v1/predict", json=body)
    assert answer.status_code == 422, answer.text
    errors = answer.json()["detail"]
    assert any(field in e["loc"] and words in e["msg"] for e in errors), errors
    assert len(answer.content) < 1000  # the offending input is not sent back


def test_texts_at_their_bounds_are_answered(no_personal_predictor: EdgePredictor) -> None:
    from starlette.testclient import TestClient

    body = {
        "texts": ["é" * wire.CLASSIFY_TEXT_MAX_CHARS] + ["hi"] * (wire.MAX_CLASSIFY_TEXTS - 1),
        "top_k": 20,
    }
    with TestClient(create_app(no_personal_predictor, watch=False)) as client:
        answer = client.post("/v1/predict", json=body)
    assert answer.status_code == 200, answer.text
    results = answer.json()["results"]
    labels = len(no_personal_predictor.current.labels("small"))
    assert len(results) == wire.MAX_CLASSIFY_TEXTS and all(
        len(r["labels"]) == min(20, labels) for r in results
    )


def test_a_body_over_the_bound_is_refused_unread(no_personal_predictor: EdgePredictor) -> None:
    with serving(no_personal_predictor, watch=False, max_body_bytes=1000) as url:
        declared = requests.post(f"{url}/v1/predict", data=b"x" * 2000, timeout=30)
        chunked = requests.post(f"{url}/v1/predict", data=iter([b"x" * 600, b"x" * 600]), timeout=30)
        fine = requests.post(f"{url}/v1/predict", json={"texts": ["hi"]}, timeout=30)
    assert declared.status_code == 413 and "over the limit of 1000" in declared.json()["detail"]
    assert chunked.status_code == 413
    assert fine.status_code == 200


# -- overload: bounded in flight, 503 with Retry-After ------------------------------------------------------
def test_over_max_in_flight_is_503_with_retry_after(no_personal_predictor: EdgePredictor) -> None:
    release = threading.Event()
    statuses: list[requests.Response] = []
    with serving(no_personal_predictor, watch=False, max_in_flight=1) as url:
        no_personal_predictor.executor.submit(release.wait, 60)  # the encoder is busy: admitted calls wait

        def call() -> None:
            statuses.append(requests.post(f"{url}/v1/predict", json={"texts": ["hi"]}, timeout=60))

        callers = [threading.Thread(target=call) for _ in range(2)]
        for t in callers:
            t.start()
        wait_until(lambda: len(statuses) == 1, "one call refused while the other waits", timeout=30)
        refused = statuses[0]
        release.set()
        for t in callers:
            t.join(timeout=60)
        after = requests.post(f"{url}/v1/predict", json={"texts": ["hi"]}, timeout=30)
    assert refused.status_code == 503 and refused.headers["retry-after"] == "1", refused.text
    assert "retry" in refused.json()["detail"]
    assert sorted(r.status_code for r in statuses) == [200, 503]
    assert after.status_code == 200


# -- hot reload -----------------------------------------------------------------------------------------
def test_newer_checkpoint_is_swapped_in_while_requests_flow(
    trained: Trained, fm: FoundationModel, tmp_path: Path
) -> None:
    work = tmp_path / "work"
    shutil.copytree(trained.no_personal, work)
    texts = texts_of(trained.stream[1], 8)
    predictor = EdgePredictor(work, fm, reload_interval=0.05)
    before = predictor.current.snapshot
    answers: list[dict[str, Any]] = []
    failures: list[str] = []
    stop = threading.Event()

    def client(url: str) -> None:
        with requests.Session() as session:
            while not stop.is_set():
                try:
                    r = session.post(f"{url}/v1/predict", json={"texts": texts, "top_k": 3}, timeout=60)
                except requests.RequestException as exc:
                    failures.append(repr(exc))
                    continue
                if r.status_code != 200:
                    failures.append(f"{r.status_code} {r.text}")
                else:
                    answers.append(r.json())

    with serving(predictor) as url:
        caller = threading.Thread(target=client, args=(url,))
        caller.start()
        try:
            wait_until(lambda: len(answers) >= 3, "answers from the first snapshot", timeout=60)
            newer = train_next_task(work, trained)
            wait_until(lambda: predictor.current.snapshot == newer, "the newer snapshot loaded", timeout=60)
            seen = len(answers)
            wait_until(lambda: len(answers) >= seen + 3, "answers from the newer snapshot", timeout=60)
            info = requests.get(f"{url}/v1/model", timeout=30).json()
        finally:
            stop.set()
            caller.join(timeout=60)
    assert failures == []
    snapshots = [a["snapshot"] for a in answers]
    assert snapshots[0] == before and snapshots[-1] == newer and snapshots == sorted(snapshots)
    assert (answers[0]["head_version"], answers[-1]["head_version"]) == (1, 2)  # tasks learned
    assert info["snapshot"] == newer and info["tasks_learned"] == 2
    assert info["task_name"] == trained.stream[1].name
    assert set(trained.stream[1].labels) <= set(info["small"]["labels"])
    # the newer model's answer is the newer learner's
    _, learner = CheckpointStore(work).load()
    assert learner is not None
    want = learner.predict(fm.encode(texts), top=3)
    assert [[s["label"] for s in r["labels"]] for r in answers[-1]["results"]] == [
        [y for y, _ in r] for r in want
    ]


def test_checkpoint_of_another_fm_is_refused(
    trained: Trained, fm: FoundationModel, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    work = tmp_path / "work"
    shutil.copytree(trained.no_personal, work)
    predictor = EdgePredictor(work, fm)
    try:
        before = predictor.current
        store = CheckpointStore(work)
        progress, learner = store.load()
        assert learner is not None
        learner.fm_digest = "f" * 64
        store.save(progress, learner)
        with caplog.at_level(logging.WARNING, "fcl_client.serving"):
            assert predictor.check_for_newer() is False
            assert predictor.check_for_newer() is False  # said once, not at every check
        assert predictor.current is before
        refusals = [r.getMessage() for r in caplog.records if "not serving snapshot" in r.getMessage()]
        assert len(refusals) == 1 and "another FM" in refusals[0], caplog.text
    finally:
        predictor.close()


def test_serve_on_an_untrained_work_dir_says_run_first(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert client_cli.main(["serve", "--work-dir", str(tmp_path), "--listen", "127.0.0.1:0"]) == 1
    assert "run `fcl-client run` first" in capsys.readouterr().err


@pytest.mark.parametrize("listen", ["8080", "localhost", "127.0.0.1:http", ":8080", "127.0.0.1:70000"])
def test_bad_listen_address_is_refused(listen: str) -> None:
    with pytest.raises(ValueError, match="HOST:PORT"):
        client_cli.parse_listen(listen)


def test_a_load_raced_by_a_newer_save_is_dropped_then_the_newer_one_loaded(
    trained: Trained, fm: FoundationModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    work = tmp_path / "work"
    shutil.copytree(trained.no_personal, work)
    predictor = EdgePredictor(work, fm)
    try:
        store = CheckpointStore(work)
        progress, learner = store.load()
        assert learner is not None
        store.save(progress, learner)  # a newer snapshot to load...
        load, raced = Learner.load, []

        def load_while_a_client_saves(directory: Path) -> Learner:
            loaded = load(directory)
            if not raced:  # ...and, while it is read, one newer still
                raced.append(progress.snapshot)
                store.save(progress, learner)
            return loaded

        monkeypatch.setattr(edge_serving.Learner, "load", staticmethod(load_while_a_client_saves))
        assert predictor.check_for_newer() is False  # the raced load is dropped, not refused for good
        assert raced and predictor.current.snapshot < raced[0]
        assert predictor.check_for_newer() is True
        assert predictor.current.snapshot == raced[0] + 1 == progress.snapshot
    finally:
        predictor.close()


def test_a_body_that_stalls_is_answered_408(
    no_personal_predictor: EdgePredictor, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(http_api, "BODY_TIMEOUT_S", 0.5)
    with serving(no_personal_predictor, watch=False) as url:
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=30) as conn:
            conn.sendall(
                b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b'Content-Length: 100\r\n\r\n{"texts": '
            )
            received = b""
            while b"within" not in received:  # the head and the body may come in separate reads
                chunk = conn.recv(4096)
                if not chunk:
                    break
                received += chunk
            answer = received.decode()
        fine = requests.post(f"{url}/v1/predict", json={"texts": ["hi"]}, timeout=30)
    assert answer.startswith("HTTP/1.1 408"), answer
    assert "did not arrive within 0.5 s" in answer
    assert fine.status_code == 200


# -- API token and TLS -------------------------------------------------------------------------------------
API_TOKEN = "edge-node-token-0123456789abcdef"


def test_with_an_api_token_v1_needs_it_and_the_schema_says_so(no_personal_predictor: EdgePredictor) -> None:
    """401 without the token or with another one, before the body is read; /healthz and the schema stay
    open; schemathesis' ignored_auth check probes every /v1/ operation without and with a wrong token."""
    with serving(no_personal_predictor, api_token=API_TOKEN, max_in_flight=1) as url:
        body = {"texts": ["what is my balance"]}
        missing = requests.post(f"{url}/v1/predict", json=body, timeout=30)
        wrong = requests.get(f"{url}/v1/model", headers={"Authorization": "Bearer not-it"}, timeout=30)
        right = {"Authorization": f"Bearer {API_TOKEN}"}
        assert missing.status_code == 401 and "--api-token-file" in missing.json()["detail"]
        assert missing.headers["www-authenticate"] == 'Bearer realm="fcl-client serve"'
        assert wrong.status_code == 401 and 'error="invalid_token"' in wrong.headers["www-authenticate"]
        assert requests.post(f"{url}/v1/predict", json=body, headers=right, timeout=30).status_code == 200
        assert requests.get(f"{url}/v1/model", headers=right, timeout=30).status_code == 200
        assert requests.get(f"{url}/healthz", timeout=30).status_code == 200
        # refused unread: a body that is never sent does not hold the only predict slot
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=30) as conn:
            conn.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n")
            assert conn.recv(4096).startswith(b"HTTP/1.1 401")
        spec = requests.get(f"{url}/openapi.json", timeout=30).json()
        assert spec["components"]["securitySchemes"]["bearer"] == {"type": "http", "scheme": "bearer"}
        secured = {p for p, ops in spec["paths"].items() if all("security" in op for op in ops.values())}
        assert secured == {"/v1/predict", "/v1/model"}
        schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
        checks = [*CONFORMANCE, ignored_auth]
        assert sorted(check_every_operation(schema, checks, headers=right)) == [
            "GET /healthz",
            "GET /v1/model",
            "POST /v1/predict",
        ]


def test_real_process_over_https_with_an_api_token(trained: Trained, tmp_path: Path) -> None:
    cert, key = self_signed_cert(tmp_path)
    token_file = tmp_path / "api-token"
    token_file.write_text(API_TOKEN + "\n")
    argv = ["--tls-cert", str(cert), "--tls-key", str(key), "--api-token-file", str(token_file)]
    with serve_process(trained.work, tmp_path / "serve.log", *argv, ca=cert) as (line, url):
        assert url.startswith("https://127.0.0.1:") and "API token required" in line
        answered = requests.post(
            f"{url}/v1/predict",
            json={"texts": texts_of(trained.stream[0], 2)},
            headers={"Authorization": f"Bearer {API_TOKEN}"},
            verify=str(cert),
            timeout=60,
        )
        assert answered.status_code == 200 and len(answered.json()["results"]) == 2
        assert (
            requests.post(
                f"{url}/v1/predict", json={"texts": ["x"]}, verify=str(cert), timeout=60
            ).status_code
            == 401
        )
        with pytest.raises(requests.RequestException):  # plain HTTP to the HTTPS port gets no answer
            requests.get(url.replace("https://", "http://") + "/healthz", timeout=3)


@pytest.mark.parametrize(
    ("options", "says"),
    [
        (["--listen", "0.0.0.0:0"], "without TLS (--tls-cert/--tls-key) and an API token (--api-token-file)"),
        (["--listen", "0.0.0.0:0", "--api-token-file", "TOKEN"], "without TLS (--tls-cert/--tls-key):"),
        (["--api-token-file", "SHORT"], "at least 16 printable ASCII characters"),
        (["--api-token-file", "MISSING"], "cannot read --api-token-file"),
        (["--tls-cert", "CERT"], "HTTPS needs both --tls-cert and --tls-key"),
        (["--tls-cert", "CERT", "--tls-key", "TOKEN"], "cannot use TLS certificate"),
    ],
)
def test_unprotected_public_listen_and_bad_token_or_tls_files_are_refused_at_start(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], options: list[str], says: str
) -> None:
    cert, _ = self_signed_cert(tmp_path)
    (tmp_path / "TOKEN").write_text(API_TOKEN)
    (tmp_path / "SHORT").write_text("abc")
    files = {
        "TOKEN": tmp_path / "TOKEN",
        "SHORT": tmp_path / "SHORT",
        "MISSING": tmp_path / "no",
        "CERT": cert,
    }
    argv = ["serve", "--work-dir", str(tmp_path), *[str(files.get(o, o)) for o in options]]
    assert client_cli.main(argv) == 2
    assert says in capsys.readouterr().err
