"""Labelled text records and their JSONL/CSV file formats."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Example:
    """One labelled utterance."""

    text: str
    label: str


class DataFormatError(ValueError):
    """A data file is malformed; the message names the file, the line and what to fix."""


def read_jsonl(path: Path, text_col: str = "text", label_col: str = "label") -> list[Example]:
    """Read `{"text": ..., "label": ...}` lines; blank lines are skipped."""
    examples: list[Example] = []
    with Path(path).open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataFormatError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from exc
            examples.append(_row_to_example(row, path, lineno, text_col, label_col))
    return examples


def read_csv(path: Path, text_col: str = "text", label_col: str = "label") -> list[Example]:
    """Read a CSV file with a header row naming the text and label columns."""
    with Path(path).open(encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh)
        return [
            _row_to_example(row, path, lineno, text_col, label_col)
            for lineno, row in enumerate(reader, start=2)
        ]


def read_examples(path: Path, text_col: str = "text", label_col: str = "label") -> list[Example]:
    """Read a labelled CSV (`.csv`) or JSONL (anything else) file."""
    path = Path(path)
    if path.suffix.lower() == ".csv":
        return read_csv(path, text_col, label_col)
    return read_jsonl(path, text_col, label_col)


def write_jsonl(path: Path, examples: Iterable[Example]) -> None:
    """Write examples as `{"text", "label"}` JSON lines."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as fh:
        for ex in examples:
            fh.write(json.dumps({"text": ex.text, "label": ex.label}, ensure_ascii=False) + "\n")


def _row_to_example(row: object, path: Path, lineno: int, text_col: str, label_col: str) -> Example:
    if not isinstance(row, dict):
        raise DataFormatError(f"{path}:{lineno}: expected an object with '{text_col}' and '{label_col}'")
    text, label = row.get(text_col), row.get(label_col)
    if not isinstance(text, str) or not text.strip():
        raise DataFormatError(f"{path}:{lineno}: missing or empty text column '{text_col}'")
    if label is None or str(label).strip() == "":
        raise DataFormatError(f"{path}:{lineno}: missing or empty label column '{label_col}'")
    return Example(text=text.strip(), label=str(label).strip())
