"""End to end over real processes: a server on port 0 and two heterogeneous clients; knowledge must move."""

from __future__ import annotations

import sqlite3
from contextlib import closing
from pathlib import Path

import torch

from benchmarks.cluster import enroll, start_client, start_server
from common.datasets.streams import load_task_stream
from common.fm import FoundationModel, cached_features
from common.package import decode_package
from common.stubs.fcl.v1 import fcl_pb2 as pb
from common.zeroshot import zeroshot_accuracy
from fcl_client.checkpoint import CheckpointStore
from fcl_client.connection import Connection
from fcl_server.blobs import BlobStore
from tests.servers import predict_offline

CLIENTS = {"client-0": "mlp:128", "client-1": "linear"}


def _federate(
    tmp_path: Path, split: Path, *client_args: str, sequential: bool = False
) -> tuple[Path, pb.ServerStatus, bytes]:
    """A server and the two CLIENTS run to the end; returns the state dir, the admin status and G.

    `sequential`: the second client starts once the first is done, so the jobs run in one order
    (side by side, their order follows the machine's load)."""
    state = tmp_path / "server"
    tokens = {c: enroll(state, c) for c in CLIENTS}
    admin = enroll(state, "ops", admin=True)
    server = start_server(state, tmp_path / "server.log", "--public-corpus", str(split / "public.txt"))
    try:
        procs = {}
        for c, spec in CLIENTS.items():
            procs[c] = start_client(
                server.target,
                c,
                tokens[c],
                split / "clients" / c,
                spec,
                tmp_path / c,
                tmp_path / f"{c}.log",
                "--epochs",
                "10",
                *client_args,
            )
            if sequential:
                assert procs[c].wait(timeout=600) == 0, (tmp_path / f"{c}.log").read_text()
        for c, proc in procs.items():
            assert proc.wait(timeout=600) == 0, (tmp_path / f"{c}.log").read_text()
        with Connection(server.target, admin) as conn:
            status = conn.status()
            _, global_blob = conn.get_knowledge(pb.HEAD_SCOPE_GLOBAL)
    finally:
        assert server.stop() == 0, server.log_tail()
    return state, status, global_blob


def test_two_clients_learn_through_the_server(tmp_path: Path, small_split: Path, fm: FoundationModel) -> None:
    clients = CLIENTS
    _, status, global_blob = _federate(tmp_path, small_split)

    done = [j for j in status.jobs if j.state == pb.JOB_STATE_DONE]
    assert len(done) == 4 and status.global_version == 4, status
    global_head = decode_package(global_blob)
    for c in clients:
        progress, learner = CheckpointStore(tmp_path / c).load()
        assert progress.task_index == 2 and learner is not None and learner.personal is not None
        assert set(learner.labels) <= set(global_head.labels)
        # the personalised FM head must beat FM zero-shot on this client's own test data, same label space
        stream = load_task_stream(small_split / "clients" / c)
        texts = [ex.text for task in stream for ex in task.test]
        labels = [ex.label for task in stream for ex in task.test]
        feats = cached_features(fm, texts, tmp_path / "cache")
        personal = learner.personal_accuracy(feats, labels)
        zeroshot = zeroshot_accuracy(fm, feats, labels, learner.personal.labels)
        assert personal is not None and personal > zeroshot + 0.05, (c, personal, zeroshot)
        assert personal > 0.7, (c, personal)

    # the trained client answers offline: top labels with probabilities, from the checkpoint
    text = load_task_stream(small_split / "clients" / "client-0")[0].test[0]
    ranked = predict_offline(tmp_path / "client-0", text.text)[0]["labels"]
    assert (
        len(ranked) == 5 and ranked[0]["p"] >= ranked[-1]["p"] and 0 < sum(r["p"] for r in ranked) <= 1.0001
    )


def test_client_resumes_after_restart_without_repeating_tasks(tmp_path: Path, small_split: Path) -> None:
    """A finished client run again does nothing twice: no new upload, the same progress."""
    state = tmp_path / "server"
    token = enroll(state, "client-0")
    admin = enroll(state, "ops", admin=True)
    server = start_server(state, tmp_path / "server.log", "--public-corpus", str(small_split / "public.txt"))
    try:
        args = (
            server.target,
            "client-0",
            token,
            small_split / "clients" / "client-0",
            "linear",
            tmp_path / "w",
        )
        assert start_client(*args, tmp_path / "a.log", "--epochs", "3").wait(timeout=600) == 0
        assert start_client(*args, tmp_path / "b.log", "--epochs", "3").wait(timeout=600) == 0
        with Connection(server.target, admin) as conn:
            jobs = conn.status().jobs
    finally:
        assert server.stop() == 0
    assert len(jobs) == 2, [(j.job_id, j.task_key) for j in jobs]
    second_run = (tmp_path / "b.log").read_text()
    assert "trained" not in second_run and "uploaded" not in second_run, second_run


def test_privacy_mode_teaches_the_global_head_from_small_models_alone(
    tmp_path: Path, small_split: Path, fm: FoundationModel
) -> None:
    """`--no-share-stats`: no statistics reach the server, yet G learns every client's labels."""
    # in one job order: side by side, G's accuracy followed the order the load gave the jobs (0.83 and
    # over 0.84 seen); in this order it is 0.82 against 0.74 zero-shot
    state, status, global_blob = _federate(tmp_path, small_split, "--no-share-stats", sequential=True)
    assert len([j for j in status.jobs if j.state == pb.JOB_STATE_DONE]) == 4, status
    with closing(sqlite3.connect(state / "state.sqlite3")) as db:
        uploaded = [row[0] for row in db.execute("SELECT blob FROM jobs")]
    assert len(uploaded) == 4
    for blob in uploaded:  # what each client uploaded: a small model and nothing else
        pkg = decode_package(BlobStore(state / "blobs").read(blob))
        assert pkg.kind == "small" and pkg.stats is None
    head = decode_package(global_blob)
    tests = [
        ex for c in CLIENTS for task in load_task_stream(small_split / "clients" / c) for ex in task.test
    ]
    feats = cached_features(fm, [ex.text for ex in tests], tmp_path / "cache")
    labels = [ex.label for ex in tests]
    model = head.build()
    pos = {y: i for i, y in enumerate(head.labels)}
    with torch.no_grad():
        pred = model(feats).argmax(dim=1)
    accuracy = float((pred == torch.tensor([pos[y] for y in labels])).float().mean())
    zeroshot = zeroshot_accuracy(fm, feats, labels, head.labels)
    assert accuracy > zeroshot + 0.05 and accuracy > 0.75, (accuracy, zeroshot)
