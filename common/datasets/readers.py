"""Labelled data files as users bring them: CSV/TSV, JSONL, Parquet and Hugging Face `save_to_disk` dirs.

Each format is parsed by its own library: the csv module, json, pyarrow, and `datasets` (imported only
for a datasets directory). The bytes of a CSV or JSONL file are decoded as UTF-8 here first (a leading
BOM is dropped), so that a byte that is not UTF-8 is reported with its offset. Readers report what
is wrong with the file's structure (no such file, a missing column, a bad JSON line, a CSV record with
the wrong number of fields) to a ProblemLog and return the rows they could read; what is wrong with
a value (a bad label, a text that is not a string) is common/datasets/checks.py's to say.
"""

from __future__ import annotations

import codecs
import contextvars
import csv
import io
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.datasets.problems import ProblemLog

FORMATS = ("csv", "tsv", "jsonl", "parquet", "hf")
SUFFIX_FORMATS = {
    ".csv": "csv",
    ".tsv": "tsv",
    ".tab": "tsv",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "jsonl",
    ".parquet": "parquet",
    ".pq": "parquet",
}
DEFAULT_DELIMITERS = {"csv": ",", "tsv": "\t"}
SHOWN_BAD_BYTES = 10  # offsets named in a not-UTF-8 problem; the rest are counted
HF_STATE_FILE = "state.json"  # what `Dataset.save_to_disk` writes beside its Arrow files
HF_DICT_FILE = "dataset_dict.json"  # what `DatasetDict.save_to_disk` writes above its split dirs


@dataclass(frozen=True)
class RawRow:
    """One record as the file holds it: the text and label values, not yet checked."""

    text: object
    label: object
    at: int  # the 1-based line (CSV, JSONL) or row (Parquet, datasets) where the record starts


@dataclass
class RawTable:
    source: str
    fmt: str
    unit: str  # what RawRow.at counts: "line" or "row"
    rows: list[RawRow] = field(default_factory=list)


def detect_format(path: Path, fmt: str | None = None) -> str | None:
    """The format named, else the one a directory (datasets) or the suffix implies; None if unknown."""
    if fmt:
        return fmt
    if path.is_dir():
        return "hf"
    return SUFFIX_FORMATS.get(path.suffix.lower())


def read_table(
    path: Path,
    text_col: str,
    label_col: str,
    log: ProblemLog,
    *,
    fmt: str | None = None,
    delimiter: str | None = None,
) -> RawTable:
    """The records of a labelled file in any of FORMATS; problems go to `log` (the table may be partial)."""
    source = str(path)
    found = detect_format(path, fmt) if path.exists() else None
    unit = "row" if found in ("parquet", "hf") else "line"
    table = RawTable(source, found or "", unit)
    if not path.exists():
        log.add(source, "does not exist; check the path")
        return table
    if found is None:
        known = ", ".join(sorted(SUFFIX_FORMATS))
        log.add(
            source,
            f"has an unknown suffix {path.suffix!r}: use one of {known}, or name the format "
            f"with --format ({', '.join(FORMATS)})",
        )
        return table
    if text_col == label_col:
        log.add(source, f"the text and the label column are both {text_col!r}; use --text-col/--label-col")
        return table
    if found == "hf":
        _read_hf(path, text_col, label_col, table, log)
    elif found == "parquet":
        _read_parquet(path, text_col, label_col, table, log)
    elif not path.is_file():
        log.add(source, f"is not a file (a {found.upper()} file was expected)")
    elif found == "jsonl":
        _read_jsonl(path, text_col, label_col, table, log)
    else:
        _read_csv(path, text_col, label_col, delimiter or DEFAULT_DELIMITERS[found], table, log)
    return table


# -- UTF-8 ----------------------------------------------------------------------------------------------
_BAD_BYTES: contextvars.ContextVar[list[int]] = contextvars.ContextVar("fcl_bad_utf8")


def _note_bad_byte(exc: UnicodeError) -> tuple[str, int]:
    assert isinstance(exc, UnicodeDecodeError)
    _BAD_BYTES.get().append(exc.start)
    return "\ufffd", exc.end


codecs.register_error("fcl-note-bad-utf8", _note_bad_byte)


def decode_utf8(data: bytes, source: str, log: ProblemLog) -> str | None:
    """The text of a UTF-8 file (a leading BOM dropped); None, with every bad byte's offset logged, if it
    is not UTF-8."""
    start = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    try:
        return data[start:].decode("utf-8")
    except UnicodeDecodeError:
        pass
    token = _BAD_BYTES.set([])
    try:
        data[start:].decode("utf-8", "fcl-note-bad-utf8")
        bad = [start + offset for offset in _BAD_BYTES.get()]
    finally:
        _BAD_BYTES.reset(token)
    places = []
    for offset in bad[:SHOWN_BAD_BYTES]:
        line = data.count(b"\n", 0, offset) + 1
        column = offset - (data.rfind(b"\n", 0, offset) + 1) + 1
        places.append(f"byte {offset} (line {line}, byte {column} of the line: 0x{data[offset]:02x})")
    more = f" and {len(bad) - SHOWN_BAD_BYTES} more" if len(bad) > SHOWN_BAD_BYTES else ""
    log.add(
        source,
        f"is not UTF-8 at {'; '.join(places)}{more}; save it as UTF-8 "
        "(for example: iconv -f cp1252 -t utf-8 FILE > FILE.utf8)",
    )
    return None


def read_text_file(path: Path, log: ProblemLog) -> str | None:
    """A whole text file, decoded as UTF-8 (problems logged: missing, unreadable, not UTF-8)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        log.add(str(path), "does not exist; check the path")
        return None
    except OSError as exc:
        log.add(str(path), f"cannot be read: {exc.strerror or exc}")
        return None
    return decode_utf8(data, str(path), log)


# -- CSV and TSV ------------------------------------------------------------------------------------------
def _read_csv(
    path: Path, text_col: str, label_col: str, delimiter: str, table: RawTable, log: ProblemLog
) -> None:
    text = read_text_file(path, log)
    if text is None:
        return
    _raise_field_limit()
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
    header: list[str] | None = None
    columns: tuple[int, int] = (0, 0)
    previous = 0
    while True:
        try:
            record = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            log.add(table.source, f"is not valid CSV here ({exc})", at=reader.line_num)
            previous = reader.line_num
            continue
        first, previous = previous + 1, reader.line_num
        if not any(cell.strip() for cell in record):
            continue  # a blank line
        if header is None:
            header = [cell.strip() for cell in record]
            found = _csv_columns(header, (text_col, label_col), delimiter, table.source, log)
            if found is None:
                return
            columns = found
            continue
        if len(record) != len(header):
            log.add(
                table.source,
                f"has {len(record)} fields where the header has {len(header)} (an unquoted delimiter "
                "inside a text, or a missing quote?)",
                at=first,
            )
            continue
        table.rows.append(RawRow(record[columns[0]], record[columns[1]], first))
    if header is None:
        log.add(table.source, "is empty: it needs a header row naming the text and label columns")


def _csv_columns(
    header: list[str], wanted: tuple[str, str], delimiter: str, source: str, log: ProblemLog
) -> tuple[int, int] | None:
    missing = [c for c in wanted if c not in header]
    if not missing:
        return header.index(wanted[0]), header.index(wanted[1])
    hint = "name the right ones with --text-col/--label-col"
    others = [d for d in (",", "\t", ";", "|") if d != delimiter and len(header) == 1 and d in header[0]]
    if others:
        hint = f"is the delimiter {others[0]!r}? pass --delimiter (or {hint})"
    found = ", ".join(repr(h) for h in header) or "none"
    for col in missing:
        log.add(source, f"has no column {col!r} in its header (columns found: {found}); {hint}", at=1)
    return None


def _raise_field_limit() -> None:
    # the csv module refuses fields over 128 KiB by default; a long document is still a text
    csv.field_size_limit(max(csv.field_size_limit(), min(sys.maxsize, 2**31 - 1)))


# -- JSONL ------------------------------------------------------------------------------------------------
def _read_jsonl(path: Path, text_col: str, label_col: str, table: RawTable, log: ProblemLog) -> None:
    text = read_text_file(path, log)
    if text is None:
        return
    # '\n' only: str.splitlines would also split at U+2028 and others, which JSON strings may hold as is
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            log.add(table.source, f"is not valid JSON ({exc.msg} at column {exc.colno})", at=lineno)
            continue
        if not isinstance(row, dict):
            log.add(
                table.source,
                f"holds a JSON {_json_type(row)}, not an object with {text_col!r} and {label_col!r}",
                at=lineno,
            )
            continue
        missing = [c for c in (text_col, label_col) if c not in row]
        if missing:
            found = ", ".join(repr(k) for k in row) or "none"
            for col in missing:
                log.add(
                    table.source,
                    f"has no field {col!r} (fields found: {found}); name the right ones with "
                    "--text-col/--label-col",
                    at=lineno,
                )
            continue
        table.rows.append(RawRow(row[text_col], row[label_col], lineno))


def _json_type(value: object) -> str:
    names = {list: "array", str: "string", int: "number", float: "number", bool: "boolean"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


# -- Parquet ----------------------------------------------------------------------------------------------
def _read_parquet(path: Path, text_col: str, label_col: str, table: RawTable, log: ProblemLog) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        names = list(pq.read_schema(path).names)
    except (pa.ArrowException, OSError) as exc:
        log.add(table.source, f"is not a readable Parquet file ({exc})")
        return
    if not _has_columns(names, (text_col, label_col), table.source, log):
        return
    try:
        data = pq.read_table(path, columns=[text_col, label_col])
        _add_rows(table, data.column(text_col).to_pylist(), data.column(label_col).to_pylist())
    except (pa.ArrowException, OSError, UnicodeDecodeError) as exc:
        log.add(table.source, f"cannot be read ({exc})")


def _has_columns(names: list[str], wanted: tuple[str, str], source: str, log: ProblemLog) -> bool:
    found = ", ".join(repr(n) for n in names) or "none"
    for col in [c for c in wanted if c not in names]:
        log.add(
            source,
            f"has no column {col!r} (columns found: {found}); name the right ones with "
            "--text-col/--label-col",
        )
    return all(c in names for c in wanted)


def _add_rows(table: RawTable, texts: list[Any], labels: list[Any]) -> None:
    table.rows.extend(RawRow(t, y, i) for i, (t, y) in enumerate(zip(texts, labels, strict=True), start=1))


# -- Hugging Face datasets (save_to_disk) ---------------------------------------------------------------
def _read_hf(path: Path, text_col: str, label_col: str, table: RawTable, log: ProblemLog) -> None:
    if (path / HF_DICT_FILE).is_file():
        splits = _dict_splits(path / HF_DICT_FILE)
        example = f"{path / splits[0]}" if splits else f"{path}/train"
        log.add(
            table.source,
            f"holds a DatasetDict (splits: {', '.join(splits) or 'none'}); pass one split's directory, "
            f"e.g. --train {example}",
        )
        return
    if not (path / HF_STATE_FILE).is_file():
        log.add(
            table.source,
            f"is a directory but not a Hugging Face dataset saved with save_to_disk (no {HF_STATE_FILE}); "
            "pass a data file or such a directory",
        )
        return
    datasets = _import_datasets()
    try:
        ds = datasets.load_from_disk(str(path))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.add(table.source, f"cannot be read as a Hugging Face dataset ({exc})")
        return
    if not _has_columns(list(ds.column_names), (text_col, label_col), table.source, log):
        return
    columns = ds.select_columns([text_col, label_col]).to_dict()
    labels = columns[label_col]
    feature = ds.features[label_col]
    if isinstance(feature, datasets.ClassLabel):  # indices into its names; -1 means "no label"
        names = list(feature.names)
        labels = [names[y] if isinstance(y, int) and 0 <= y < len(names) else None for y in labels]
    _add_rows(table, columns[text_col], labels)


def _dict_splits(path: Path) -> list[str]:
    try:
        splits = json.loads(path.read_text(encoding="utf-8")).get("splits", [])
    except (OSError, ValueError, AttributeError):
        return []
    return [str(s) for s in splits] if isinstance(splits, list) else []


def _import_datasets() -> Any:
    # nothing may be downloaded at run time: a saved dataset is read from disk, never from the Hub
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import datasets

    return datasets
