"""Whole federated runs on tiny random-weight encoders: per architecture a server process and two client
processes, one with the FM locally and one downloading it; a multilingual run (CJK and Arabic texts and
labels) on the XLM-R-shaped encoder; options that would change the features are refused by name."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.cluster import enroll, start_client, start_server
from common.datasets.records import Example
from common.datasets.streams import Task, write_task
from common.fm import FoundationModel
from common.package import decode_package
from common.stubs.fcl.v1 import fcl_pb2 as pb
from fcl_client.connection import Connection
from tests.servers import predict_offline
from tests.tiny_fm import ENGLISH, MULTILINGUAL, build_tiny_encoder

CLIENTS = ("client-0", "client-1")
# label -> phrases; two tasks of two labels each
ENGLISH_DATA = {
    "weather": [
        "will it rain",
        "is it sunny",
        "how cold is it",
        "weather forecast",
        "is it windy",
        "snow today",
    ],
    "music": [
        "play jazz",
        "play some music",
        "next song",
        "turn up the music",
        "play rock",
        "pause the song",
    ],
    "banking": [
        "my balance",
        "transfer money",
        "pay my bill",
        "bank account",
        "send fifty dollars",
        "card limit",
    ],
    "alarm": [
        "set an alarm",
        "wake me at seven",
        "cancel my alarm",
        "alarm tomorrow",
        "snooze",
        "alarm at six",
    ],
}
MULTILINGUAL_DATA = {
    "天气": ["明天的天气怎么样", "今天会下雨吗", "北京冷不冷", "天气预报", "明日の天気は", "外は晴れですか"],
    "音乐": ["播放音乐", "来一首歌", "下一首歌", "音乐大声一点", "音楽をかけて", "次の曲"],
    "طقس": ["كيف الطقس غدا", "هل ستمطر اليوم", "الجو بارد", "نشرة الطقس", "هل الجو مشمس", "درجة الحرارة"],
    "موسيقى": [
        "شغل الموسيقى",
        "أغنية أخرى",
        "ارفع صوت الموسيقى",
        "شغل أغنية",
        "أوقف الأغنية",
        "موسيقى هادئة",
    ],
}


def write_streams(root: Path, data: dict[str, list[str]]) -> Path:
    """Two clients, two tasks of two labels each; every client sees every label (4 train, 2 test each)."""
    labels = list(data)
    for c, client in enumerate(CLIENTS):
        for t in range(2):
            train, test = [], []
            for label in labels[2 * t : 2 * t + 2]:
                phrases = data[label]
                mine = phrases[c::2] + phrases[(c + 1) % 2 :: 2]  # each client in its own order
                train += [Example(f"{p}{w}", label) for p in mine[:3] for w in ("", " please")]
                test += [Example(p, label) for p in mine[3:5]]
            write_task(root / client, Task(f"task-{t}", train, test))
    return root


def fm_info(*args: str) -> dict[str, object]:
    out = subprocess.run(
        [sys.executable, "-m", "fcl_server.cli", "fm", "info", "--json", *args],
        capture_output=True,
        text=True,
        check=True,
    )
    result: dict[str, object] = json.loads(out.stdout)
    return result


def federate(
    tmp_path: Path, fm_dir: Path, data: dict[str, list[str]], corpus: list[str], *server_args: str
) -> tuple[pb.ServerStatus, bytes, dict[str, str], Path]:
    """A server on the tiny FM; client-0 holds the FM, client-1 has none and downloads it."""
    streams = write_streams(tmp_path / "streams", data)
    (tmp_path / "public.txt").write_text("\n".join(corpus * 4) + "\n", encoding="utf-8")
    state = tmp_path / "server"
    tokens = {c: enroll(state, c) for c in CLIENTS}
    admin = enroll(state, "ops", admin=True)
    server = start_server(
        state,
        tmp_path / "server.log",
        "--fm",
        str(fm_dir),
        "--public-corpus",
        str(tmp_path / "public.txt"),
        "--uploads-per-minute",
        "0",
        *server_args,
    )
    try:
        fm_of = {"client-0": str(fm_dir), "client-1": str(tmp_path / "no-such-fm")}
        procs = {
            c: start_client(
                server.target,
                c,
                tokens[c],
                streams / c,
                "linear",
                tmp_path / c,
                tmp_path / f"{c}.log",
                "--epochs",
                "3",
                "--fm",
                fm_of[c],
            )
            for c in CLIENTS
        }
        for c, proc in procs.items():
            assert proc.wait(timeout=600) == 0, (tmp_path / f"{c}.log").read_text()
        with Connection(server.target, admin) as conn:
            status = conn.status()
            _, global_blob = conn.get_knowledge(pb.HEAD_SCOPE_GLOBAL)
    finally:
        assert server.stop() == 0, server.log_tail()
    logs = {c: (tmp_path / f"{c}.log").read_text() for c in CLIENTS}
    return status, global_blob, logs, state


def check_run(status: pb.ServerStatus, global_blob: bytes, tmp_path: Path, labels: list[str]) -> None:
    done = [j for j in status.jobs if j.state == pb.JOB_STATE_DONE]
    assert len(done) == 4 and status.global_version == 4, status
    assert sorted(decode_package(global_blob).labels) == sorted(labels)
    for c in CLIENTS:
        records = json.loads((tmp_path / c / "metrics.json").read_text())
        assert [r["task_index"] for r in records] == [0, 1]


# bert in the default run; the other two layouts are loaded and encoded there too (test_fm_encoders.py),
# and their whole federated runs (35-40 s each) are in `make test-slow`
@pytest.mark.parametrize(
    "arch",
    [
        "bert",
        pytest.param("roberta", marks=pytest.mark.slow),
        pytest.param("distilbert", marks=pytest.mark.slow),
    ],
)
def test_a_federated_run_on_a_tiny_encoder(tmp_path: Path, arch: str) -> None:
    fm_dir = build_tiny_encoder(
        tmp_path / "fm", arch, ENGLISH + [p for ps in ENGLISH_DATA.values() for p in ps]
    )
    status, global_blob, logs, _ = federate(tmp_path, fm_dir, ENGLISH_DATA, ENGLISH)
    check_run(status, global_blob, tmp_path, list(ENGLISH_DATA))
    served = FoundationModel(str(fm_dir))
    assert status.foundation_model.digest == served.digest
    assert json.loads(status.foundation_model.encoding_json) == served.encoding.as_dict()
    assert "downloading the server's FM" in logs["client-1"] and "downloading" not in logs["client-0"]


def test_server_options_travel_to_clients(tmp_path: Path) -> None:
    """A server told --fm-pooling cls --fm-max-length 24: the client holding the files takes those settings
    without a download, the other unpacks them from the archive; `fm info` shows what is served."""
    fm_dir = build_tiny_encoder(
        tmp_path / "fm", "bert", ENGLISH + [p for ps in ENGLISH_DATA.values() for p in ps]
    )
    options = ("--fm-pooling", "cls", "--fm-max-length", "24")
    status, global_blob, logs, _ = federate(tmp_path, fm_dir, ENGLISH_DATA, ENGLISH, *options)
    check_run(status, global_blob, tmp_path, list(ENGLISH_DATA))
    info = fm_info("--fm", str(fm_dir), *options)
    assert info["digest"] == status.foundation_model.digest
    assert (info["pooling"], info["max_length"], info["dim"]) == ("cls", 24, 32)
    assert (
        "using the local FM with the server's encoding (pooling 'mean' vs 'cls'; max_length 64 vs 24)"
        in logs["client-0"]
    )
    assert "downloading the server's FM" in logs["client-1"]
    for c in CLIENTS:
        encoding = json.loads((tmp_path / c / "fm_encoding.json").read_text())
        assert (encoding["pooling"], encoding["max_length"]) == ("cls", 24)


def test_multilingual_run_on_the_xlmr_encoder(tmp_path: Path) -> None:
    corpus = MULTILINGUAL + [p for ps in MULTILINGUAL_DATA.values() for p in ps]
    fm_dir = build_tiny_encoder(tmp_path / "fm", "xlm-roberta", corpus)
    status, global_blob, _, _ = federate(tmp_path, fm_dir, MULTILINGUAL_DATA, MULTILINGUAL)
    check_run(status, global_blob, tmp_path, list(MULTILINGUAL_DATA))
    # the trained client answers offline with the labels as written
    answers = predict_offline(tmp_path / "client-0", "明天的天气怎么样", "هل ستمطر اليوم")
    assert [a["text"] for a in answers] == ["明天的天气怎么样", "هل ستمطر اليوم"]
    assert {r["label"] for a in answers for r in a["labels"]} <= set(MULTILINGUAL_DATA)


def test_a_client_told_another_pooling_is_refused(tmp_path: Path) -> None:
    """Server: mean (the files). Client: --fm-pooling cls. Refused before any download, naming the option."""
    fm_dir = build_tiny_encoder(tmp_path / "fm", "bert", ENGLISH)
    streams = write_streams(tmp_path / "streams", ENGLISH_DATA)
    state = tmp_path / "server"
    token = enroll(state, "client-0")
    (tmp_path / "public.txt").write_text("\n".join(ENGLISH) + "\n")
    server = start_server(
        state, tmp_path / "server.log", "--fm", str(fm_dir), "--public-corpus", str(tmp_path / "public.txt")
    )
    try:
        # with the same files, and without any FM
        for i, fm_arg in enumerate((str(fm_dir), str(tmp_path / "no-such-fm"))):
            log = tmp_path / f"client-{i}.log"
            proc = start_client(
                server.target,
                "client-0",
                token,
                streams / "client-0",
                "linear",
                tmp_path / "w",
                log,
                "--fm",
                fm_arg,
                "--fm-pooling",
                "cls",
            )
            assert proc.wait(timeout=300) == 1
            text = log.read_text()
            assert "--fm-pooling 'cls' (the server: 'mean')" in text, text
            assert "downloading" not in text and not (tmp_path / "w" / "fm").exists()
    finally:
        assert server.stop() == 0, server.log_tail()
