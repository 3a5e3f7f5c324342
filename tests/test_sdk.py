"""The Python SDK (`FclClient`) against a real in-process server: the CLI's task loop and checkpoints."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pytest

from common.config import SMCFConfig
from common.datasets.problems import DataErrors, ProblemLog
from common.datasets.records import Example
from common.datasets.streams import Task, load_task_stream
from common.fm import DEFAULT_FM, FoundationModel, FoundationModelError
from common.stubs.fcl.v1 import fcl_pb2 as pb
from fcl_client import FclClient, Registration, ScopedPrediction, TaskResult
from fcl_client import cli as client_cli
from fcl_client.checkpoint import CheckpointStore
from fcl_client.connection import Connection
from fcl_client.sdk import _examples
from fcl_server.app import RunningServer
from tests.servers import inprocess_server

ROOT = Path(__file__).resolve().parents[1]
# fewer optimizer steps than the defaults: the tests check the plumbing, not the last point of accuracy
FAST = SMCFConfig(epochs=3, min_steps=150, consolidate_steps=100)
OFF_TOPIC = "qwxz zzkv plorb"  # no intent of the built-in data


def texts_labels(task: Task, test: bool = False) -> tuple[list[str], list[str]]:
    examples = task.test if test else task.train
    return [ex.text for ex in examples], [ex.label for ex in examples]


def samples(stream: list[Task]) -> list[Example]:
    """Six test utterances of the second task, of different labels."""
    return stream[1].test[::20][:6]


def learn(client: FclClient, task: Task) -> TaskResult:
    texts, labels = texts_labels(task)
    test_texts, test_labels = texts_labels(task, test=True)
    return client.run_task(task.name, texts, labels, test_texts, test_labels)


def start(tmp_path: Path, fm: FoundationModel, small_split: Path, **config: object) -> RunningServer:
    server = inprocess_server(tmp_path, fm, public_corpus=small_split / "public.txt", **config)
    server.state.add_token("tok-0", "client-0", False)
    server.state.add_token("tok-admin", "ops", True)
    return server


@dataclass
class Trained:
    work: Path
    stream: list[Task]
    before: Registration
    after: Registration
    results: list[TaskResult]
    repeated: TaskResult
    status: pb.ServerStatus
    predictions: list[list[tuple[str, float]]]
    scoped: list[ScopedPrediction]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, fm: FoundationModel, small_split: Path) -> Trained:
    """One client learns client-0's two tasks through the SDK, then asks for the first task again."""
    tmp = tmp_path_factory.mktemp("sdk")
    stream = load_task_stream(small_split / "clients" / "client-0")
    server = start(tmp, fm, small_split)
    target = f"127.0.0.1:{server.port}"
    try:
        with FclClient(target, "client-0", "tok-0", tmp / "work", "mlp:64", fm=fm, smcf=FAST) as client:
            before = client.register()
            results = [learn(client, task) for task in stream]
            repeated = learn(client, stream[0])
            after = client.register()
            predictions = client.predict([ex.text for ex in samples(stream)], top=3)
            scoped = client.predict_scoped([ex.text for ex in samples(stream)] + [OFF_TOPIC], top=3)
        with Connection(target, "tok-admin") as admin:
            status = admin.status()
    finally:
        server.stop(grace=1)
    return Trained(tmp / "work", stream, before, after, results, repeated, status, predictions, scoped)


def test_register_says_what_the_server_said(trained: Trained, fm: FoundationModel) -> None:
    before, after = trained.before, trained.after
    assert (before.client_id, before.fm_digest, before.fm_matches) == ("client-0", fm.digest, True)
    assert before.personal_head_version == 0 and before.tasks_done == 0 and before.server_version
    assert after.personal_head_version == 2 and after.tasks_done == 2  # asked again, not remembered


def test_each_task_goes_through_the_server_and_reports_versions_bytes_and_accuracy(trained: Trained) -> None:
    first, second = trained.results
    assert [(r.name, r.index) for r in trained.results] == [(t.name, i) for i, t in enumerate(trained.stream)]
    for number, result in enumerate(trained.results, start=1):
        assert result.job_state == "JOB_STATE_DONE" and not result.already_done
        assert (result.global_version, result.personal_version) == (number, number)
        assert result.bytes_up > 10_000 and result.bytes_down > 1_000
        assert result.small_acc is not None and result.small_acc > 0.7, result
        assert result.personal_acc is not None and result.personal_acc > 0.7, result
    assert len(first.small_row) == 1 and len(second.small_row) == 2 and None not in second.personal_row
    jobs = sorted(trained.status.jobs, key=lambda j: j.job_id)
    assert [(j.task_key, j.job_id) for j in jobs] == [
        (first.name, first.job_id),
        (second.name, second.job_id),
    ]
    (client,) = trained.status.clients
    assert client.uploads == 2 and client.last_metrics["small_acc"] == pytest.approx(second.small_acc)


def test_a_task_learned_before_is_not_learned_again(trained: Trained) -> None:
    repeated, first = trained.repeated, trained.results[0]
    assert repeated.already_done and (repeated.name, repeated.job_id) == (first.name, first.job_id)
    assert repeated.small_acc == first.small_acc and len(trained.status.jobs) == 2  # no third upload


def test_predictions_are_ranked_and_a_new_client_answers_offline(
    trained: Trained, fm: FoundationModel
) -> None:
    texts = [ex.text for ex in samples(trained.stream)]
    truth = [ex.label for ex in samples(trained.stream)]
    assert all(len(r) == 3 and r[0][1] >= r[1][1] >= r[2][1] for r in trained.predictions)
    assert sum(r[0][0] == y for r, y in zip(trained.predictions, truth, strict=True)) >= 4
    # nothing listens on port 1: predictions come from the checkpoint alone
    with FclClient("127.0.0.1:1", "client-0", "tok-0", trained.work, "mlp:64", fm=fm) as offline:
        again = offline.predict(texts, top=3)
        personal = offline.predict(texts, top=2, head="personal")
        assert [r.index for r in offline.results()] == [0, 1]
    assert [[p.label for p in r] for r in again] == [[y for y, _ in r] for r in trained.predictions]
    assert [r[0].p for r in again] == pytest.approx([r[0][1] for r in trained.predictions], abs=1e-5)
    assert all(
        len(r) == 2 and r[0].label in {y for ys in trained.predictions for y, _ in ys} for r in personal
    )


def test_predict_scoped_ranks_as_predict_and_marks_what_the_head_abstains_on(trained: Trained) -> None:
    in_scope, off_topic = trained.scoped[:-1], trained.scoped[-1]
    assert [[p.label for p in r.labels] for r in in_scope] == [[y for y, _ in r] for r in trained.predictions]
    assert all(r.confidence is not None for r in trained.scoped)  # the small model was calibrated
    assert sum(r.out_of_scope for r in in_scope) <= 1  # ~95% of in-scope texts are kept
    assert off_topic.confidence is not None
    assert off_topic.confidence < max(r.confidence or 0 for r in in_scope)


def test_the_cli_reads_the_work_dir_the_sdk_wrote(
    trained: Trained, capsys: pytest.CaptureFixture[str]
) -> None:
    progress, learner = CheckpointStore(trained.work).load()
    assert progress.task_index == 2 and learner is not None and learner.personal_version == 2
    text = trained.stream[1].test[0].text
    assert client_cli.main(["predict", "--work-dir", str(trained.work), "--top", "3", "--json", text]) == 0
    ranked = json.loads(capsys.readouterr().out)[0]["labels"]
    assert [r["label"] for r in ranked] == [y for y, _ in trained.predictions[0]]


def test_an_interrupted_task_continues_from_its_checkpoint(
    tmp_path: Path, fm: FoundationModel, small_split: Path
) -> None:
    """The link fails during the upload; the next call uploads the package trained before, unchanged."""
    task = load_task_stream(small_split / "clients" / "client-1")[0]
    server = start(tmp_path, fm, small_split)
    lines: list[str] = []
    try:
        target = f"127.0.0.1:{server.port}"
        with FclClient(
            target, "client-0", "tok-0", tmp_path / "w", "linear", fm=fm, smcf=FAST, on_message=lines.append
        ) as client:
            real_upload = client._conn.upload
            calls: list[str] = []

            def cut_once(data: bytes, upload_id: str, *args: object, **kwargs: object) -> pb.UploadReceipt:
                calls.append(upload_id)
                if len(calls) == 1:
                    raise ConnectionError("link down")
                return real_upload(data, upload_id, *args, **kwargs)

            client._conn.upload = cut_once
            with pytest.raises(ConnectionError):
                learn(client, task)
            result = learn(client, task)
        jobs = len(server.state.jobs())
    finally:
        server.stop(grace=1)
    assert calls[0] == calls[1] and len(calls) == 2  # the same upload id: the same package
    assert sum("trained small model" in line for line in lines) == 1, lines
    assert result.job_state == "JOB_STATE_DONE" and result.index == 0 and jobs == 1


def test_bad_input_is_refused_before_anything_is_sent(tmp_path: Path, fm: FoundationModel) -> None:
    with FclClient("127.0.0.1:1", "c", "t", tmp_path, fm=fm) as client:
        with pytest.raises(ValueError, match="2 texts but 1 labels"):
            client.run_task("t", ["a", "b"], ["x"])
        with pytest.raises(ValueError, match="test_texts/test_labels: 1 texts but 0 labels"):
            client.run_task("t", ["a"], ["x"], test_texts=["b"])
        with pytest.raises(TypeError, match="not one string"):
            client.run_task("t", "ab", "xy")
        with pytest.raises(ValueError, match="no training examples"):
            client.run_task("t", [], [])
        with pytest.raises(RuntimeError, match="holds no trained client"):
            client.predict(["hello"])
        # every bad text and label, of train and test data, in one error; nothing trained or sent
        with pytest.raises(DataErrors) as exc:
            client.run_task(
                "t",
                ["fine", "", "also fine", "x\ud800y"],
                ["ok", "ok", "a\u202eb", "ok"],
                test_texts=["t"],
                test_labels=["bad\nlabel"],
            )
    message = str(exc.value)
    assert message.startswith("task 't' cannot be learnt, nothing was sent: 4 problems"), message
    for part in (
        "texts at index 1: text is empty",
        "labels at index 2: label 'a\\u202eb' has a format character (Cf) U+202E",
        "texts at index 3: text has a lone surrogate U+D800 at position 2",
        "test_labels at index 0: label 'bad\\nlabel' has a control character (Cc) U+000A",
    ):
        assert part in message, (part, message)
    assert not (tmp_path / "sdk-tasks.json").exists() and not (tmp_path / "metrics.json").exists()


def test_fm_encoding_options_are_checked_against_the_server_like_the_cli_flags(
    tmp_path: Path, fm: FoundationModel, small_split: Path
) -> None:
    """fm_pooling/fm_max_length as the server encodes: accepted; otherwise refused before any upload."""
    server = start(tmp_path, fm, small_split)
    target = f"127.0.0.1:{server.port}"
    try:
        same = FclClient(target, "client-0", "tok-0", tmp_path / "same", fm=DEFAULT_FM, fm_max_length=256)
        with same as client:
            assert client.register().fm_digest == fm.digest  # the server's encoding: nothing downloaded
        assert not (tmp_path / "same" / "fm").exists()
        other = FclClient(target, "client-0", "tok-0", tmp_path / "other", fm=DEFAULT_FM, fm_pooling="cls")
        refused = r"--fm-pooling 'cls' \(the server: 'mean'\)"
        with other as client, pytest.raises(FoundationModelError, match=refused):
            client.register()
        assert server.state.jobs() == []
    finally:
        server.stop(grace=1)
    with pytest.raises(ValueError, match="give them on the FoundationModel itself"):
        FclClient(target, "client-0", "tok-0", tmp_path / "x", fm=fm, fm_prompt="query: ")


def test_the_sdk_normalises_texts_and_labels_as_fcl_data_does() -> None:
    log = ProblemLog()
    kept = _examples(["  cafe\u0301 au lait "], ["cafe\u0301 "], ("texts", "labels"), log)
    assert not log and [(ex.text, ex.label) for ex in kept] == [("café au lait", "café")]


def test_the_sdk_over_mutual_tls(tmp_path: Path, fm: FoundationModel, small_split: Path) -> None:
    certs = tmp_path / "certs"
    make_certs = [str(ROOT / "deploy" / "make-certs.sh"), str(certs), "localhost", "client-0"]
    subprocess.run(make_certs, check=True, capture_output=True)
    pem = {
        "tls_cert": certs / "server.pem",
        "tls_key": certs / "server.key",
        "tls_client_ca": certs / "ca.pem",
    }
    server = start(tmp_path, fm, small_split, **pem)
    tls = {"tls_ca": certs / "ca.pem", "tls_cert": certs / "client-0.pem", "tls_key": certs / "client-0.key"}
    try:
        with FclClient(f"localhost:{server.port}", "client-0", "tok-0", tmp_path / "w", fm=fm, **tls) as c:
            assert c.register().fm_matches
    finally:
        server.stop(grace=1)


def test_the_package_exports_the_sdk_without_loading_torch_for_the_rest() -> None:
    code = (
        "import sys, fcl_client.connection; assert 'torch' not in sys.modules, 'torch'; "
        "from fcl_client import FclClient; import fcl_client.sdk as s; assert FclClient is s.FclClient"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


# -- the quickstart example -----------------------------------------------------------------------------
def load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("sdk_quickstart", ROOT / "examples" / "sdk_quickstart.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def example_server(tmp_path: Path, fm: FoundationModel, small_split: Path) -> Iterator[str]:
    server = start(tmp_path, fm, small_split)
    yield f"127.0.0.1:{server.port}"
    server.stop(grace=1)


def test_the_quickstart_example_learns_two_tasks_and_predicts(
    example_server: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "client-0.token").write_text("tok-0\n")
    argv = ["--server", example_server, "--client-id", "client-0", "--work-dir", str(tmp_path / "work")]
    argv += ["--token-file", str(tmp_path / "client-0.token"), "--epochs", "2"]
    example = load_example()
    assert example.main(argv) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("registered client-0 with fcl-server") and "tasks done" in out[0]
    tasks = [line for line in out if line.startswith("task ")]
    assert [line.split(":")[0] for line in tasks] == ["task 1/2 task-1", "task 2/2 task-2"]
    assert "job 1 JOB_STATE_DONE, global head v1, personal head v1" in tasks[0]
    assert "job 2 JOB_STATE_DONE, global head v2, personal head v2" in tasks[1]
    predicted = [line for line in out if line.startswith("predict[")]
    assert len(predicted) == 8  # 2 heads x 2 tasks x 2 utterances
    right = [
        line for line in predicted if line.split(" -> ")[1].split()[0] == line.rsplit("true: ", 1)[1][:-1]
    ]
    assert len(right) >= 6, predicted
    # run again: nothing is learned twice
    assert example.main(argv) == 0
    again = [line for line in capsys.readouterr().out.splitlines() if line.startswith("task ")]
    assert all(line.endswith("already learned (from the checkpoint)") for line in again) and len(again) == 2
