"""Tests for the task-stream reader, the dataset splitter and the `fcl-data` command."""

from __future__ import annotations

import csv
import json
import sys
import types
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from common.datasets.cli import main
from common.datasets.records import DataFormatError, Example, write_jsonl
from common.datasets.split import (
    SplitError,
    SplitResult,
    round_exact,
    split_dataset,
    write_split,
)
from common.datasets.streams import Task, load_task_stream, write_task

CLINC_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "clinc150"


def make_examples(labels: list[str], per_label: int, tag: str = "train") -> list[Example]:
    """Synthetic utterances with unique texts, interleaved across labels."""
    return [Example(f"{tag} utterance {i} for {label}", label) for i in range(per_label) for label in labels]


def letters(n: int) -> list[str]:
    return [f"label_{i:02d}" for i in range(n)]


def do_split(
    train: list[Example],
    test: list[Example] | None = None,
    groups: dict[str, list[str]] | None = None,
    **kwargs: int | float,
) -> SplitResult:
    settings: dict[str, int | float] = {"num_tasks": 3, "num_clients": 4, "alpha": 0.5, "seed": 0}
    settings.update(kwargs)
    return split_dataset(
        train,
        test,
        num_tasks=int(settings["num_tasks"]),
        num_clients=int(settings["num_clients"]),
        alpha=float(settings["alpha"]),
        seed=int(settings["seed"]),
        label_groups=groups,
    )


def all_client_train(result: SplitResult) -> list[Example]:
    return [ex for stream in result.streams.values() for task in stream for ex in task.train]


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def write_dataset(tmp_path: Path, labels: list[str], per_label: int = 10) -> dict[str, Path]:
    """Train/test JSONL, a groups file (pairs of labels) and a public file with blank lines."""
    paths = {name: tmp_path / f"{name}.jsonl" for name in ("train", "test")}
    write_jsonl(paths["train"], make_examples(labels, per_label))
    write_jsonl(paths["test"], make_examples(labels, 3, tag="test"))
    paths["groups"] = tmp_path / "groups.json"
    groups = {f"group_{i // 2}": labels[i : i + 2] for i in range(0, len(labels), 2)}
    paths["groups"].write_text(json.dumps(groups), encoding="utf-8")
    paths["public"] = tmp_path / "public.txt"
    paths["public"].write_text("first public sentence\n\n  second one  \n\n", encoding="utf-8")
    return paths


# --- splitting -----------------------------------------------------------------------------------------


def test_split_is_deterministic_per_seed() -> None:
    train, test = make_examples(letters(9), 20), make_examples(letters(9), 4, tag="test")
    first, again = do_split(train, test, seed=7), do_split(train, test, seed=7)
    other = do_split(train, test, seed=8)
    assert first == again
    assert first.streams != other.streams


def test_every_train_example_lands_in_exactly_one_client() -> None:
    train = make_examples(letters(12), 15)
    result = do_split(train, make_examples(letters(12), 2, tag="test"), num_clients=5, alpha=0.3)
    assert Counter(all_client_train(result)) == Counter(train)
    assert result.num_train == len(train)


def test_task_examples_stay_within_task_labels() -> None:
    result = do_split(make_examples(letters(9), 10), make_examples(letters(9), 2, tag="test"))
    for stream in result.streams.values():
        for task in stream:
            assert set(task.labels) <= set(result.task_labels[task.name])


def test_tasks_without_groups_partition_labels_near_equally() -> None:
    labels = letters(10)
    result = do_split(make_examples(labels, 5), None, num_tasks=3)
    parts = list(result.task_labels.values())
    assert list(result.task_labels) == ["task-00", "task-01", "task-02"]
    assert sorted(len(p) for p in parts) == [3, 3, 4]
    assert sorted(label for p in parts for label in p) == labels
    assert result.task_groups == {}


def test_label_groups_are_dealt_to_tasks_in_order() -> None:
    labels = letters(20)
    groups = {f"g{i}": labels[2 * i : 2 * i + 2] for i in range(10)}
    groups = dict(reversed(groups.items()))  # mapping order, not name order, decides
    result = do_split(make_examples(labels, 4), None, groups, num_tasks=5)
    names = list(groups)
    assert result.task_groups == {f"task-{t:02d}": names[2 * t : 2 * t + 2] for t in range(5)}
    assert result.task_labels["task-00"] == groups["g9"] + groups["g8"]


def test_uneven_groups_give_earlier_tasks_the_extra() -> None:
    labels = letters(7)
    groups = {f"g{i}": [label] for i, label in enumerate(labels)}
    result = do_split(make_examples(labels, 4), None, groups, num_tasks=3)
    assert [len(g) for g in result.task_groups.values()] == [3, 2, 2]


def test_holdout_when_test_is_missing() -> None:
    train = [*make_examples(letters(4), 10), Example("a lone example", "rare")]
    result = do_split(train, None, num_tasks=2, num_clients=2)
    held = [ex for exs in result.global_test.values() for ex in exs]
    assert Counter(ex.label for ex in held) == {label: 2 for label in letters(4)}
    assert Counter(all_client_train(result) + held) == Counter(train)
    assert result.settings.holdout == pytest.approx(0.2)


def test_holdout_keeps_at_least_one_per_label() -> None:
    train = make_examples(letters(3), 2)
    result = do_split(train, None, num_tasks=1, num_clients=1)
    held = [ex for exs in result.global_test.values() for ex in exs]
    assert Counter(ex.label for ex in held) == {label: 1 for label in letters(3)}


def test_client_test_is_the_test_of_its_labels() -> None:
    test = make_examples(letters(9), 3, tag="test")
    result = do_split(make_examples(letters(9), 6), test, num_clients=6, alpha=0.1)
    for stream in result.streams.values():
        for task in stream:
            assert task.test == [ex for ex in test if ex.label in task.labels]
    for name, labels in result.task_labels.items():
        assert result.global_test[name] == [ex for ex in test if ex.label in labels]


def test_clients_without_data_for_a_task_skip_it() -> None:
    train = [Example("only one", "a"), Example("just one", "b")]
    result = do_split(train, None, num_tasks=2, num_clients=3)
    assert result.skipped  # two examples cannot reach three clients in both tasks
    for cid, stream in result.streams.items():
        names = [task.name for task in stream] + result.skipped.get(cid, [])
        assert sorted(names) == ["task-00", "task-01"]


def test_round_exact_sums_to_n() -> None:
    rng = np.random.default_rng(3)
    for n in (0, 1, 7, 101):
        proportions = rng.dirichlet(np.full(6, 0.2))
        counts = round_exact(proportions, n)
        assert sum(counts) == n and min(counts) >= 0


@pytest.mark.parametrize(
    ("kwargs", "groups", "message"),
    [
        ({"alpha": 0}, None, "alpha must be a positive number"),
        ({"num_tasks": 10}, None, "cannot make 10 tasks from 6 labels"),
        ({"num_clients": 0}, None, "number of clients"),
        ({"num_tasks": 4}, {"g0": letters(3), "g1": letters(6)[3:]}, "cannot deal 2 label groups to 4 tasks"),
        ({"num_tasks": 1}, {"g0": [*letters(6), "ghost"]}, "absent from the train data: 'ghost'"),
        ({"num_tasks": 1}, {"g0": letters(5)}, "in no label group: 'label_05'"),
        ({"num_tasks": 1}, {"g0": letters(6), "g1": ["label_00"]}, "in both group"),
    ],
)
def test_bad_settings_raise_clear_errors(
    kwargs: dict[str, float], groups: dict[str, list[str]] | None, message: str
) -> None:
    with pytest.raises(SplitError, match=message):
        do_split(make_examples(letters(6), 3), None, groups, **kwargs)


def test_test_labels_unknown_to_train_are_rejected() -> None:
    with pytest.raises(SplitError, match="never occur in the train set"):
        do_split(make_examples(letters(3), 3), [Example("x", "other")], num_tasks=1)


# --- task streams on disk ------------------------------------------------------------------------------


def test_task_stream_round_trip(tmp_path: Path) -> None:
    tasks = [Task("task-01", make_examples(["b", "a"], 2), []), Task("task-00", make_examples(["c"], 1), [])]
    for task in tasks:
        write_task(tmp_path, task)
    loaded = load_task_stream(tmp_path)
    assert [t.name for t in loaded] == ["task-00", "task-01"]
    assert loaded[1] == tasks[0] and loaded[1].labels == ["a", "b"]


def test_missing_test_file_gives_empty_test(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "task-00" / "train.jsonl", [Example("hi", "greet")])
    assert load_task_stream(tmp_path)[0].test == []


@pytest.mark.parametrize(
    ("layout", "message"),
    [
        ("missing", "does not exist"),
        ("empty", "no task subdirectories"),
        ("no-train", "has no train.jsonl"),
        ("empty-train", "has no examples"),
    ],
)
def test_bad_task_streams_raise_clear_errors(tmp_path: Path, layout: str, message: str) -> None:
    stream = tmp_path / "stream"
    if layout != "missing":
        stream.mkdir()
    if layout == "no-train":
        write_jsonl(stream / "task-00" / "test.jsonl", [Example("hi", "greet")])
    if layout == "empty-train":
        write_jsonl(stream / "task-00" / "train.jsonl", [])
    with pytest.raises(DataFormatError, match=message):
        load_task_stream(stream)


def test_write_split_refuses_unrelated_nonempty_dir(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("keep me", encoding="utf-8")
    result = do_split(make_examples(letters(3), 4), None, num_tasks=1, num_clients=1)
    with pytest.raises(SplitError, match="not empty"):
        write_split(result, ["p"], tmp_path)


# --- the fcl-data command ------------------------------------------------------------------------------


def test_cli_split_round_trip(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    paths = write_dataset(tmp_path, letters(8))
    out = tmp_path / "out"
    args = ["split", "--train", str(paths["train"]), "--test", str(paths["test"]), "--tasks", "2"]
    args += ["--clients", "3", "--alpha", "1.0", "--seed", "5", "--label-groups", str(paths["groups"])]
    code, stdout, _ = run_cli([*args, "--public", str(paths["public"]), "--out", str(out)], capsys)
    assert code == 0 and "client-2" in stdout
    manifest = json.loads((out / "split.json").read_text(encoding="utf-8"))
    assert (manifest["num_tasks"], manifest["num_clients"], manifest["seed"]) == (2, 3, 5)
    assert manifest["tasks"]["task-00"] == letters(4)
    assert manifest["task_groups"]["task-01"] == ["group_2", "group_3"]
    assert manifest["sources"]["train"] == str(paths["train"])
    assert (out / "public.txt").read_text(encoding="utf-8") == "first public sentence\nsecond one\n"
    assert sorted(p.name for p in (out / "global_test").iterdir()) == ["task-00.jsonl", "task-01.jsonl"]
    loaded_train: list[Example] = []
    for client_dir in sorted((out / "clients").iterdir()):
        stream = load_task_stream(client_dir)
        client_manifest = manifest["clients"][client_dir.name]
        assert [t.name for t in stream] == list(client_manifest)
        for task in stream:
            assert client_manifest[task.name]["labels"] == dict(Counter(ex.label for ex in task.train))
            loaded_train += task.train
    assert Counter(loaded_train) == Counter(make_examples(letters(8), 10))


def test_cli_is_deterministic(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    paths = write_dataset(tmp_path, letters(6))
    outputs = []
    for name in ("a", "b"):
        args = ["split", "--train", str(paths["train"]), "--tasks", "3", "--clients", "4", "--seed", "1"]
        assert (
            run_cli([*args, "--public", str(paths["public"]), "--out", str(tmp_path / name)], capsys)[0] == 0
        )
        files = sorted(p for p in (tmp_path / name / "clients").rglob("*.jsonl"))
        outputs.append({str(p.relative_to(tmp_path / name)): p.read_bytes() for p in files})
    assert outputs[0] == outputs[1]


def test_cli_rerun_replaces_earlier_split(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    paths = write_dataset(tmp_path, letters(6))
    base = ["split", "--train", str(paths["train"]), "--tasks", "2", "--public", str(paths["public"])]
    assert run_cli([*base, "--clients", "4", "--out", str(tmp_path / "out")], capsys)[0] == 0
    assert run_cli([*base, "--clients", "2", "--out", str(tmp_path / "out")], capsys)[0] == 0
    assert sorted(p.name for p in (tmp_path / "out" / "clients").iterdir()) == ["client-0", "client-1"]


def test_cli_csv_with_custom_columns_and_holdout(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    train_csv = tmp_path / "train.csv"
    with train_csv.open("w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["id", "utterance", "intent"])
        for i, ex in enumerate(make_examples(letters(4), 10)):
            writer.writerow([i, ex.text, ex.label])
    public = write_dataset(tmp_path, letters(2))["public"]
    args = ["split", "--train", str(train_csv), "--text-col", "utterance", "--label-col", "intent"]
    args += ["--tasks", "2", "--clients", "2", "--public", str(public), "--out", str(tmp_path / "out")]
    code, stdout, _ = run_cli(args, capsys)
    assert code == 0 and "held out 20%" in stdout
    manifest = json.loads((tmp_path / "out" / "split.json").read_text(encoding="utf-8"))
    assert (manifest["num_train"], manifest["num_test"], manifest["holdout"]) == (32, 8, 0.2)
    assert sum(manifest["global_test"].values()) == 8


def _bad_input_args(tmp_path: Path, case: str) -> list[str]:
    paths = write_dataset(tmp_path, letters(4))
    train = paths["train"]
    extra: list[str] = []
    if case == "csv-column":
        train = tmp_path / "train.csv"
        train.write_text("sentence,label\nhello,greet\n", encoding="utf-8")
    elif case == "jsonl-column":
        extra = ["--label-col", "intent"]
    elif case == "unknown-group-label":
        paths["groups"].write_text(json.dumps({"g": [*letters(4), "ghost"]}), encoding="utf-8")
        extra = ["--label-groups", str(paths["groups"])]
    elif case == "tasks-over-groups":
        extra = ["--label-groups", str(paths["groups"])]
    elif case == "missing-train":
        train = tmp_path / "nope.jsonl"
    tasks = "3" if case == "tasks-over-groups" else "1"
    alpha = "0" if case == "alpha" else "0.5"
    args = ["split", "--train", str(train), "--tasks", tasks, "--clients", "2", "--alpha", alpha]
    return [*args, *extra, "--public", str(paths["public"]), "--out", str(tmp_path / "out")]


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("csv-column", "has no column 'text' in its header (columns found: 'sentence', 'label')"),
        ("jsonl-column", "has no field 'intent' (fields found: 'text', 'label')"),
        ("unknown-group-label", "absent from the train data: 'ghost'"),
        ("tasks-over-groups", "cannot deal 2 label groups to 3 tasks"),
        ("alpha", "alpha must be a positive number"),
        ("missing-train", "nope.jsonl: does not exist; check the path"),
    ],
)
def test_cli_bad_input_reports_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str, message: str
) -> None:
    code, _, stderr = run_cli(_bad_input_args(tmp_path, case), capsys)
    assert code == 2
    assert stderr.startswith("fcl-data: error: ") and message in stderr
    assert not (tmp_path / "out").exists()


def test_cli_usage_error_returns_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["split", "--tasks", "x"]) == 2
    assert "error" in capsys.readouterr().err


def test_cli_clinc150_format(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A tiny synthetic directory in the CLINC150 layout (no real CLINC text)."""
    labels = letters(8)
    rows = {
        name: [[ex.text, ex.label] for ex in make_examples(labels, n, tag=name)]
        for name, n in (("train", 6), ("val", 2), ("test", 3))
    }
    rows["oos_train"] = [["out of scope", "oos"]]
    data = tmp_path / "clinc"
    data.mkdir()
    (data / "data_full.json").write_text(json.dumps(rows), encoding="utf-8")
    (data / "domains.json").write_text(json.dumps({"d1": labels[:4], "d0": labels[4:]}), encoding="utf-8")
    (data / "all_wiki_sents.txt").write_text("a wiki sentence\n", encoding="utf-8")
    out = tmp_path / "out"
    code, _, _ = run_cli(
        ["clinc150", "--data", str(data), "--tasks", "2", "--clients", "2", "--out", str(out)], capsys
    )
    assert code == 0
    manifest = json.loads((out / "split.json").read_text(encoding="utf-8"))
    assert manifest["task_groups"] == {"task-00": ["d1"], "task-01": ["d0"]}
    assert (manifest["num_train"], manifest["num_test"]) == (48, 24)
    assert len((out / "val.jsonl").read_text(encoding="utf-8").splitlines()) == 16


def test_cli_builtin_uses_the_builtin_package(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    paths = write_dataset(tmp_path, letters(6))
    fake = types.ModuleType("common.datasets.builtin")
    fake.train_path = lambda: paths["train"]  # type: ignore[attr-defined]
    fake.test_path = lambda: paths["test"]  # type: ignore[attr-defined]
    fake.public_path = lambda: paths["public"]  # type: ignore[attr-defined]
    fake.load_groups = lambda: json.loads(paths["groups"].read_text(encoding="utf-8"))  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "common.datasets.builtin", fake)
    code, _, _ = run_cli(["builtin", "--out", str(tmp_path / "out")], capsys)
    assert code == 0
    manifest = json.loads((tmp_path / "out" / "split.json").read_text(encoding="utf-8"))
    assert (manifest["num_tasks"], manifest["num_clients"], manifest["alpha"]) == (3, 3, 0.5)
    assert manifest["tasks"]["task-02"] == letters(6)[4:]


def test_cli_builtin_incomplete_package_is_an_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "common.datasets.builtin", types.ModuleType("common.datasets.builtin"))
    code, _, stderr = run_cli(["builtin", "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and "built-in dataset package lacks train_path" in stderr


@pytest.mark.skipif(not (CLINC_DIR / "data_full.json").exists(), reason="CLINC150 data not available")
def test_cli_clinc150_real_data(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, _ = run_cli(["clinc150", "--data", str(CLINC_DIR), "--out", str(tmp_path)], capsys)
    assert code == 0
    manifest = json.loads((tmp_path / "split.json").read_text(encoding="utf-8"))
    assert len(manifest["tasks"]) == 5 and all(len(labels) == 30 for labels in manifest["tasks"].values())
    assert sorted(manifest["clients"]) == [f"client-{c}" for c in range(5)]
    assert sorted(p.name for p in (tmp_path / "clients").iterdir()) == [f"client-{c}" for c in range(5)]
    total = sum(
        len(t.train) for c in range(5) for t in load_task_stream(tmp_path / "clients" / f"client-{c}")
    )
    assert total == manifest["num_train"] == 15000
    assert (tmp_path / "val.jsonl").is_file()
