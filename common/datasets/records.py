"""Labelled text records, and writing them as JSONL (common/datasets/readers.py reads every format)."""

from __future__ import annotations

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


def write_jsonl(path: Path, examples: Iterable[Example]) -> None:
    """Write examples as `{"text", "label"}` JSON lines."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as fh:
        for ex in examples:
            fh.write(json.dumps({"text": ex.text, "label": ex.label}, ensure_ascii=False) + "\n")
