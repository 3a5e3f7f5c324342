"""`fcl-data split` on data as users bring it: CSV (BOM or not, any delimiter), TSV, JSONL, Parquet and
Hugging Face `save_to_disk` directories; every problem listed in one message before anything is
written; the warnings a split deserves; task streams and the SDK checked by the same rule."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from common.datasets.checks import read_labelled
from common.datasets.cli import main
from common.datasets.problems import DataErrors, ProblemLog
from common.datasets.readers import read_table
from common.datasets.records import Example, write_jsonl
from common.datasets.streams import load_task_stream

LABELS = [
    "reverted_card_payment?",
    "cancel & refund",
    "what's my balance",
    "top up (card)",
    "汇率",
    "丢失的卡",
]


def rows(per_label: int = 6, tag: str = "train") -> list[tuple[str, str]]:
    return [(f"{tag} text {i} about {y}", y) for i in range(per_label) for y in LABELS]


def write_csv(path: Path, data: list[tuple[str, str]], *, bom: bool = False, delimiter: str = ",") -> Path:
    with path.open("w", encoding="utf-8-sig" if bom else "utf-8", newline="") as fh:
        writer = csv.writer(fh, delimiter=delimiter)
        writer.writerow(["text", "label"])
        writer.writerows(data)
    return path


def public(tmp_path: Path) -> Path:
    path = tmp_path / "public.txt"
    path.write_text("\n".join(f"public sentence {i}" for i in range(20)), encoding="utf-8")
    return path


def run(tmp_path: Path, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    base = ["split", "--tasks", "2", "--clients", "2", "--public", str(public(tmp_path))]
    code = main([*base, "--out", str(tmp_path / "out"), *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def examples(data: list[tuple[str, str]]) -> list[Example]:
    return [Example(t, y) for t, y in data]


# -- formats --------------------------------------------------------------------------------------------
def test_csv_with_or_without_a_bom_reads_the_same(tmp_path: Path) -> None:
    data = rows()
    plain = write_csv(tmp_path / "plain.csv", data)
    bom = write_csv(tmp_path / "bom.csv", data, bom=True)
    assert bom.read_bytes().startswith(b"\xef\xbb\xbf")
    assert read_labelled(plain) == read_labelled(bom) == examples(data)


def test_tsv_by_its_suffix_and_any_delimiter_by_option(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = [("a text, with a comma", "x;y"), *rows()]
    assert read_labelled(write_csv(tmp_path / "d.tsv", data, delimiter="\t")) == examples(data)
    semi = write_csv(tmp_path / "semi.csv", data, delimiter=";")
    log = ProblemLog()
    table = read_table(semi, "text", "label", log, delimiter=";")
    assert not log and [(r.text, r.label) for r in table.rows] == data
    code, _, err = run(tmp_path, capsys, "--train", str(semi))  # read with ',' the header is one column
    assert code == 2 and "is the delimiter ';'? pass --delimiter" in err
    code, out, _ = run(tmp_path, capsys, "--train", str(semi), "--delimiter", ";")
    assert code == 0 and "wrote 2 tasks" in out
    tabbed = write_csv(tmp_path / "tabbed.txt", data, delimiter="\t")
    code, out, _ = run(tmp_path, capsys, "--train", str(tabbed), "--format", "csv", "--delimiter", "tab")
    assert code == 0, out


def test_jsonl_labels_may_be_integers_and_everything_is_nfc(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    lines = [{"text": "cafe\u0301 au lait ", "label": "cafe\u0301"}, {"text": "seven", "label": 7}]
    path.write_text("".join(json.dumps(x) + "\n" for x in lines), encoding="utf-8")
    assert read_labelled(path) == [Example("café au lait", "café"), Example("seven", "7")]


def test_parquet_through_pyarrow(tmp_path: Path) -> None:
    data = rows()
    table = pa.table(
        {"id": list(range(len(data))), "utterance": [t for t, _ in data], "intent": [y for _, y in data]}
    )
    pq.write_table(table, tmp_path / "d.parquet")
    assert read_labelled(tmp_path / "d.parquet", "utterance", "intent") == examples(data)
    log = ProblemLog()
    read_table(tmp_path / "d.parquet", "text", "intent", log)
    assert "has no column 'text' (columns found: 'id', 'utterance', 'intent')" in log.problems[0].message


def test_a_datasets_directory_from_save_to_disk(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    datasets = pytest.importorskip("datasets")
    data = rows()
    features = datasets.Features(
        {"text": datasets.Value("string"), "label": datasets.ClassLabel(names=LABELS)}
    )
    ds = datasets.Dataset.from_dict(
        {"text": [t for t, _ in data], "label": [LABELS.index(y) for _, y in data]}, features=features
    )
    ds.save_to_disk(str(tmp_path / "one"))
    assert read_labelled(tmp_path / "one") == examples(data)  # class indices come back as their names
    datasets.DatasetDict({"train": ds, "test": ds.select(range(6))}).save_to_disk(str(tmp_path / "both"))
    code, _, err = run(tmp_path, capsys, "--train", str(tmp_path / "both"))
    assert code == 2 and "holds a DatasetDict (splits: train, test); pass one split's directory" in err
    code, out, err = run(
        tmp_path,
        capsys,
        "--train",
        str(tmp_path / "both" / "train"),
        "--test",
        str(tmp_path / "both" / "test"),
    )
    assert code == 0 and "wrote 2 tasks" in out, err


# -- errors: every one, in one message, before anything is written --------------------------------------
def test_a_bad_file_is_refused_with_every_problem_and_nothing_is_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    train = tmp_path / "train.csv"
    good = "".join(f"{t},{y}\n" for t, y in rows())
    bad = (
        "hello there,ok label\n"
        "a right-to-left trick,abc\u202edef\n"  # line 3 (after the header and one good row)
        "tab inside,a\tb\n"
        f"far too long,{'x' * 129}\n"
        "no label here,\n"
        "three,fields,here\n"
        "again a trick,abc\u202edef\n"
    )
    train.write_text("text,label\n" + bad + good, encoding="utf-8")
    test = tmp_path / "test.csv"
    test.write_bytes(b"text,label\nfine,ok label\ncaf\xe9 cr\xe8me,ok label\n")
    groups = tmp_path / "groups.json"
    groups.write_text(json.dumps({"g1": ["ok label", "bad\u2028label"], "g2": LABELS}), encoding="utf-8")
    code, out, err = run(
        tmp_path, capsys, "--train", str(train), "--test", str(test), "--label-groups", str(groups)
    )
    assert code == 2 and out == ""
    assert not (tmp_path / "out").exists()  # not even the output directory
    assert err.startswith(
        "fcl-data: error: the data cannot be used, nothing was written: 8 problems (7 distinct)"
    )
    expected = [
        f"{train} lines 3, 8, column 'label': label 'abc\\u202edef' has a format character (Cf) U+202E "
        "RIGHT-TO-LEFT OVERRIDE at position 4",
        f"{train} line 4, column 'label': label 'a\\tb' has a control character (Cc) U+0009",
        f"{train} line 5, column 'label': label 'xxxxxxxx",
        "is 129 characters long, over the limit of 128",
        f"{train} line 6, column 'label': label is empty",
        f"{train} line 7: has 3 fields where the header has 2",
        f"{test}: is not UTF-8 at byte 28 (line 3, byte 4 of the line: 0xe9); byte 32 (line 3, byte 8 of "
        "the line: 0xe8); save it as UTF-8",
        f"{groups}, column 'g1': label 'bad\\u2028label' has a line separator (Zl) U+2028",
        "(a label is 1-128 printable Unicode characters in NFC",
    ]
    for part in expected:
        assert part in err, (part, err)


def test_a_missing_column_names_the_columns_found(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "d.csv"
    path.write_text("sentence,intent\nhello,greet\n", encoding="utf-8")
    code, _, err = run(tmp_path, capsys, "--train", str(path))
    assert code == 2 and "has no column 'text' in its header (columns found: 'sentence', 'intent')" in err
    assert "has no column 'label'" in err
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text(
        '{"text": "hi", "intent": "greet"}\n{"text": "yo", "intent": "greet"}\n', encoding="utf-8"
    )
    code, _, err = run(tmp_path, capsys, "--train", str(jsonl))
    assert code == 2 and f"{jsonl} lines 1, 2: has no field 'label' (fields found: 'text', 'intent')" in err


def test_an_unknown_suffix_or_a_plain_directory_says_what_to_do(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "d.xlsx").write_bytes(b"PK")
    (tmp_path / "dir").mkdir()
    code, _, err = run(tmp_path, capsys, "--train", str(tmp_path / "d.xlsx"), "--test", str(tmp_path / "dir"))
    assert code == 2 and "has an unknown suffix '.xlsx'" in err and "--format" in err
    assert "not a Hugging Face dataset saved with save_to_disk (no state.json)" in err


# -- warnings: the data works, but the user should know -----------------------------------------------
def test_warnings_for_empty_texts_duplicates_leakage_and_rare_labels(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    train_rows = [*rows(per_label=6), ("", "汇率"), ("   ", "汇率"), ("train text 0 about 汇率", "汇率")]
    train_rows += [("train text 1 about 汇率", "丢失的卡"), ("only once", "rare one")]
    test_rows = [*rows(per_label=2, tag="test"), ("TRAIN text 2   about 汇率", "汇率")]
    train = write_csv(tmp_path / "train.csv", train_rows)
    test = write_csv(tmp_path / "test.csv", test_rows)
    code, _, err = run(tmp_path, capsys, "--train", str(train), "--test", str(test), "--clients", "3")
    assert code == 0, err
    warnings = [line for line in err.splitlines() if line.startswith("fcl-data: warning: ")]
    expected = [
        f"{train}: dropped 2 lines with an empty text (lines 38, 39)",
        f"{train}: 1 duplicate line (same text and label as an earlier one: line 40 repeats 6); kept",
        f"{train}: 1 text carries more than one label ('train text 1 about 汇率' as '丢失的卡', '汇率')",
        "1 of 13 test examples has a text that also occurs in train (compared ignoring case and spacing: "
        "'TRAIN text 2   about 汇率')",
        "1 label has fewer train examples than there are clients (3): 'rare one': 1 in task-0",
        "learnt by 1 of 3 clients. Each label belongs to exactly one task",
        "at most that many clients learn it",
        "1 label has no test example: 'rare one'",
    ]
    for part in expected:
        assert any(part in w for w in warnings), (part, warnings)
    manifest = json.loads((tmp_path / "out" / "split.json").read_text(encoding="utf-8"))
    assert manifest["warnings"] == [w.removeprefix("fcl-data: warning: ") for w in warnings]
    assert manifest["num_train"] == len(train_rows) - 2  # the empty texts were dropped, duplicates kept


# -- the client's task streams and the SDK use the same rule ---------------------------------------------
def test_a_task_stream_with_bad_labels_is_refused_whole(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "task-00" / "train.jsonl", [Example("fine", "ok"), Example("bad", "a\nb")])
    write_jsonl(tmp_path / "task-01" / "train.jsonl", [Example("fine", "ok")])
    write_jsonl(tmp_path / "task-01" / "test.jsonl", [Example("bad", "\u202eevil")])
    with pytest.raises(DataErrors) as exc:
        load_task_stream(tmp_path)
    message = str(exc.value)
    assert message.startswith(f"task stream {tmp_path} cannot be used: 2 problems")
    assert f"{tmp_path / 'task-00' / 'train.jsonl'} line 2, column 'label': label 'a\\nb'" in message
    assert f"{tmp_path / 'task-01' / 'test.jsonl'} line 1, column 'label': label '\\u202eevil'" in message
