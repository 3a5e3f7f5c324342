"""Checks of labelled data before anything is written or sent: every label by the shared rule
(common/labels.py), every text, and the warnings a split deserves (empty texts, duplicate rows, test
texts seen in train, labels too rare for the clients, labels without test examples).

Errors go to a ProblemLog, so that one message lists them all; warnings are sentences for the summary.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from common import wire_limits as wire
from common.datasets.problems import ProblemLog
from common.datasets.readers import RawTable, read_table
from common.datasets.records import Example
from common.labels import RULE, label_problem, normalize_text, text_problem

if TYPE_CHECKING:  # split.py imports streams.py, which reads through this module
    from common.datasets.split import SplitResult

SHOWN = 5  # examples named in a warning


@dataclass
class CheckedFile:
    """The valid examples of one file, where each starts, and the rows dropped for an empty text."""

    source: str
    unit: str
    examples: list[Example] = field(default_factory=list)
    places: list[int] = field(default_factory=list)
    empty_texts: list[int] = field(default_factory=list)


class LabelChecker:
    """Normalises and checks label values, each distinct value once (a file repeats its labels)."""

    def __init__(self) -> None:
        self._seen: dict[tuple[type, object], tuple[str | None, str | None]] = {}

    def check(self, value: object) -> tuple[str | None, str | None]:
        """(the label as kept, None) or (None, what is wrong with it)."""
        key = (type(value), value) if isinstance(value, str | int | float | bool) or value is None else None
        if key is not None and key in self._seen:
            return self._seen[key]
        result = _check_label_value(value)
        if key is not None:
            self._seen[key] = result
        return result


def _check_label_value(value: object) -> tuple[str | None, str | None]:
    if value is None:
        return None, "label is missing (null)"
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)  # class indices are labels too: Parquet and JSONL files often hold them
    if not isinstance(value, str):
        return None, f"label {value!r} is a {type(value).__name__}, not a string or an integer"
    label = normalize_text(value)
    if not label:
        return None, "label is empty"
    problem = label_problem(label)
    if problem is not None:
        return None, f"label {wire.quoted(label, wire.LABEL_MAX_CHARS)} {problem}"
    return label, None


def check_table(table: RawTable, text_col: str, label_col: str, log: ProblemLog) -> CheckedFile:
    """The examples of a read table; each bad value logged with its line or row, empty texts set aside."""
    out = CheckedFile(table.source, table.unit)
    labels = LabelChecker()
    for row in table.rows:
        text = _text(row.text, table.source, text_col, table.unit, row.at, log)
        label, problem = labels.check(row.label)
        if problem is not None:
            log.add(table.source, problem, column=label_col, unit=table.unit, at=row.at)
        if text is None or label is None:
            continue
        if not text:
            out.empty_texts.append(row.at)
            continue
        out.examples.append(Example(text, label))
        out.places.append(row.at)
    return out


def _text(value: object, source: str, column: str, unit: str, at: int, log: ProblemLog) -> str | None:
    if value is None:
        log.add(source, "text is missing (null)", column=column, unit=unit, at=at)
        return None
    problem = text_problem(value)
    if problem is not None:
        log.add(source, f"text {problem}", column=column, unit=unit, at=at)
        return None
    assert isinstance(value, str)
    return normalize_text(value)


def check_sequences(
    texts: Sequence[object], labels: Sequence[object], names: tuple[str, str], log: ProblemLog
) -> list[Example]:
    """Examples from parallel sequences (the SDK's arguments); an empty text is an error here."""
    checker, examples = LabelChecker(), []
    for i, (raw_text, raw_label) in enumerate(zip(texts, labels, strict=True)):
        problem = text_problem(raw_text)
        text = normalize_text(raw_text) if problem is None and isinstance(raw_text, str) else None
        if problem is not None:
            log.add(names[0], f"text {problem}", unit="index", at=i)
        elif not text:
            log.add(names[0], "text is empty", unit="index", at=i)
        label, label_error = checker.check(raw_label)
        if label_error is not None:
            log.add(names[1], label_error, unit="index", at=i)
        if text and label is not None:
            examples.append(Example(text, label))
    return examples


# -- warnings ---------------------------------------------------------------------------------------------
def file_warnings(checked: CheckedFile) -> list[str]:
    """Empty texts dropped, rows repeated, and texts given more than one label, in one file."""
    out: list[str] = []
    unit = checked.unit
    if checked.empty_texts:
        n = len(checked.empty_texts)
        out.append(
            f"{checked.source}: dropped {n} {_plural(unit, n)} with an empty text "
            f"({_places(unit, checked.empty_texts)})"
        )
    first: dict[Example, int] = {}
    repeats: list[tuple[int, int]] = []
    for ex, at in zip(checked.examples, checked.places, strict=True):
        if ex in first:
            repeats.append((at, first[ex]))
        else:
            first[ex] = at
    if repeats:
        shown = ", ".join(f"{unit} {a} repeats {b}" for a, b in repeats[:SHOWN])
        out.append(
            f"{checked.source}: {len(repeats)} duplicate {_plural(unit, len(repeats))} (same text and label "
            f"as an earlier one: {shown}{_more(repeats)}); kept, so they weigh more in training"
        )
    by_text: dict[str, set[str]] = {}
    for ex in first:
        by_text.setdefault(ex.text, set()).add(ex.label)
    conflicts = [(t, sorted(ys)) for t, ys in by_text.items() if len(ys) > 1]
    if conflicts:
        shown = "; ".join(f"{wire.quoted(t)} as {', '.join(map(repr, ys))}" for t, ys in conflicts[:SHOWN])
        out.append(
            f"{checked.source}: {_n(len(conflicts), 'text carries', 'texts carry')} more than one label "
            f"({shown}{_more(conflicts)}); kept, but no model can get all of them right"
        )
    return out


def split_warnings(result: SplitResult) -> list[str]:
    """What the split means for the data: leakage, labels too rare for the clients, untested labels."""
    out: list[str] = []
    train = [ex for stream in result.streams.values() for task in stream for ex in task.train]
    test = [ex for examples in result.global_test.values() for ex in examples]
    seen = {_text_key(ex.text) for ex in train}
    leaked = [ex for ex in test if _text_key(ex.text) in seen]
    if leaked:
        shown = ", ".join(wire.quoted(ex.text) for ex in leaked[:SHOWN])
        out.append(
            f"{len(leaked)} of {len(test)} test examples {'has' if len(leaked) == 1 else 'have'} a text that "
            "also occurs in train (compared "
            f"ignoring case and spacing: {shown}{_more(leaked)}); accuracy on them overstates what was "
            "learnt: remove them from the test data"
        )
    out += _rare_label_warnings(result, train)
    untested = sorted({ex.label for ex in train} - {ex.label for ex in test})
    if untested:
        why = " (holding one out needs at least 2 examples of a label)" if result.settings.holdout else ""
        out.append(
            f"{_n(len(untested), 'label has', 'labels have')} no test example{why}: {_names(untested)}; no "
            "accuracy is "
            "measured on them"
        )
    return out


def _rare_label_warnings(result: SplitResult, train: list[Example]) -> list[str]:
    clients = result.settings.num_clients
    counts = Counter(ex.label for ex in train)
    rare = sorted((n, y) for y, n in counts.items() if n < clients)
    if not rare:
        return []
    task_of = {y: t for t, ys in result.task_labels.items() for y in ys}
    holders: Counter[str] = Counter(
        y for stream in result.streams.values() for task in stream for y in task.labels
    )
    shown = "; ".join(
        f"{wire.quoted(y)}: {n} in {task_of.get(y, '?')}, learnt by {holders[y]} of {clients} clients"
        for n, y in rare[:SHOWN]
    )
    return [
        f"{_n(len(rare), 'label has', 'labels have')} fewer train examples than there are clients "
        f"({clients}): {shown}"
        f"{_more(rare)}. Each label belongs to exactly one task and its train examples are dealt out to "
        "clients (Dirichlet), so at most that many clients learn it; the other clients are not tested "
        "on it and know it only through the personalised heads the server sends them"
    ]


def _n(count: int, one: str, many: str) -> str:
    return f"{count} {one if count == 1 else many}"


def _text_key(text: str) -> str:
    return " ".join(text.casefold().split())


def _names(labels: list[str]) -> str:
    return ", ".join(wire.quoted(y) for y in labels[:SHOWN]) + _more(labels)


def _more(items: Sequence[object]) -> str:
    return f", ... ({len(items) - SHOWN} more)" if len(items) > SHOWN else ""


def _plural(unit: str, n: int) -> str:
    return unit if n == 1 else unit + "s"


def _places(unit: str, places: list[int]) -> str:
    shown = ", ".join(str(p) for p in places[:SHOWN])
    return f"{_plural(unit, len(places))} {shown}" + (
        f" and {len(places) - SHOWN} more" if len(places) > SHOWN else ""
    )


# -- reading a file into examples -------------------------------------------------------------------------
def load_labelled(
    path: Path,
    log: ProblemLog,
    text_col: str = "text",
    label_col: str = "label",
    *,
    fmt: str | None = None,
    delimiter: str | None = None,
) -> CheckedFile:
    """The checked examples of a labelled file in any format; every problem goes to `log`."""
    table = read_table(path, text_col, label_col, log, fmt=fmt, delimiter=delimiter)
    return check_table(table, text_col, label_col, log)


def read_labelled(path: Path, text_col: str = "text", label_col: str = "label") -> list[Example]:
    """The examples of one labelled file; DataErrors listing every problem if it has any."""
    log = ProblemLog()
    checked = load_labelled(Path(path), log, text_col, label_col)
    log.raise_if_any(f"{path} cannot be used", footer(log))
    return checked.examples


def footer(log: ProblemLog) -> str:
    """The label rule, when a problem is about a label."""
    return f"({RULE})" if any(p.message.startswith("label ") for p in log.problems) else ""
