"""Load a result document and check it against the BENCHMARK.md "Output" schema, with readable errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

MAX_ERRORS = 8


class ResultFormatError(ValueError):
    """A file that is not a result document (bad JSON, or JSON outside the schema)."""


class _Part(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    acc_final: float | None = None
    acc_avg: float | None = None
    forgetting: float | None = None
    bwt: float | None = None
    matrix: list[list[float | None]] | None = None


class _Row(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    method: str = Field(min_length=1)
    seed: int
    fm_global: _Part | None = None
    fm_personal: _Part | None = None
    small: _Part | None = None
    bytes_up_per_client_round: float | None = None
    bytes_down_per_client_round: float | None = None
    wall_s: float | None = None
    peak_rss_mb: float | None = None


class _Document(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    scenario: str
    fm: str
    seeds: list[int]
    results: list[_Row] = Field(min_length=1)
    tasks: dict[str, list[str]] | None = None  # task -> its labels (the demo writes them from split.json)


def _where(loc: tuple[int | str, ...]) -> str:
    """('results', 0, 'fm_global', 'matrix', 1, 0) -> 'results[0].fm_global.matrix[1][0]'."""
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "(top level)"


def describe(exc: ValidationError) -> list[str]:
    """One line per schema violation (at most MAX_ERRORS, then a count of the rest)."""
    errors = exc.errors(include_url=False)
    lines = [f"{_where(tuple(e['loc']))}: {e['msg']}" for e in errors[:MAX_ERRORS]]
    if len(errors) > MAX_ERRORS:
        lines.append(f"... and {len(errors) - MAX_ERRORS} more")
    return lines


def validate_doc(doc: Any, source: str = "document") -> dict[str, Any]:
    """Return `doc` unchanged when it is a result document; raise ResultFormatError saying where it is not."""
    if not isinstance(doc, dict):
        raise ResultFormatError(
            f"{source}: not a result document: the top level is a JSON {type(doc).__name__}, expected an "
            "object with 'scenario', 'fm', 'seeds' and 'results' (see BENCHMARK.md, Output)"
        )
    try:
        _Document.model_validate(doc)
    except ValidationError as exc:
        details = "\n  ".join(describe(exc))
        raise ResultFormatError(
            f"{source}: not a result document in the BENCHMARK.md 'Output' schema:\n  {details}"
        ) from None
    return doc


def load_result_doc(path: str | Path) -> dict[str, Any]:
    """Read and validate one result JSON file (benchmarks.run --out, or the demo's report.json)."""
    try:
        doc = json.loads(Path(path).read_text())
    except json.JSONDecodeError as exc:
        raise ResultFormatError(f"{path}: not JSON ({exc})") from None
    return validate_doc(doc, str(path))
