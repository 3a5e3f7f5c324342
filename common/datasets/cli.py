"""The `fcl-data` command: turn labelled datasets into per-client continual-learning task streams."""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from common.datasets.checks import (
    CheckedFile,
    LabelChecker,
    check_table,
    file_warnings,
    footer,
    load_labelled,
    split_warnings,
)
from common.datasets.problems import ProblemLog
from common.datasets.readers import FORMATS, RawRow, RawTable, read_text_file
from common.datasets.records import DataFormatError, Example, write_jsonl
from common.datasets.split import SplitError, SplitResult, split_dataset, write_split
from common.labels import normalize_text

PROG = "fcl-data"


def main(argv: list[str] | None = None) -> int:
    """Run `fcl-data`; returns the process exit status (0 ok, 2 bad input or arguments)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse already printed usage and the reason
        return exc.code if isinstance(exc.code, int) else 2
    command: Callable[[argparse.Namespace], int] = args.func
    try:
        return command(args)
    except (DataFormatError, SplitError, OSError) as exc:
        print(f"{PROG}: error: {_error_text(exc)}", file=sys.stderr)
        return 2


def _error_text(exc: Exception) -> str:
    if isinstance(exc, OSError) and exc.filename is not None:
        return f"cannot read or write {exc.filename}: {exc.strerror}"
    return str(exc)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with the `split`, `clinc150` and `builtin` subcommands."""
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_split_parser(sub)
    _add_clinc_parser(sub)
    _add_builtin_parser(sub)
    return parser


def _add_common_options(p: argparse.ArgumentParser, tasks: int | None, clients: int | None) -> None:
    p.add_argument("--tasks", type=int, default=tasks, required=tasks is None, help="number of tasks")
    p.add_argument("--clients", type=int, default=clients, required=clients is None, help="number of clients")
    p.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration (larger = more IID)")
    p.add_argument("--seed", type=int, default=0, help="random seed (same seed = same split)")
    p.add_argument("--out", type=Path, required=True, help="output directory")


def _add_split_parser(sub: Any) -> None:
    p = sub.add_parser(
        "split",
        help="split a labelled CSV/TSV/JSONL/Parquet file or a Hugging Face dataset directory",
        description="Split a labelled dataset into per-client task streams. Every label and text is "
        "checked before anything is written; all problems are listed together (exit status 2).",
    )
    p.add_argument(
        "--train",
        type=Path,
        required=True,
        help="labelled train data: .csv, .tsv, .jsonl, .parquet, or a datasets save_to_disk directory",
    )
    p.add_argument("--test", type=Path, help="labelled test data; default: hold out part of --train")
    p.add_argument("--text-col", default="text", help="text column/field name (default: text)")
    p.add_argument("--label-col", default="label", help="label column/field name (default: label)")
    p.add_argument(
        "--format",
        choices=FORMATS,
        help="format of --train and --test (default: from the suffix; a directory is a datasets one)",
    )
    p.add_argument(
        "--delimiter",
        type=_delimiter,
        help="CSV field delimiter, one character; 'tab' or '\\t' for a tab (default: ',' and tab for .tsv)",
    )
    p.add_argument("--label-groups", type=Path, help="JSON object: group -> list of labels")
    p.add_argument("--public", type=Path, required=True, help="unlabelled sentences, one per line")
    p.add_argument("--holdout", type=float, default=0.2, help="test fraction when --test is missing")
    _add_common_options(p, tasks=None, clients=None)
    p.set_defaults(func=_cmd_split)


def _delimiter(value: str) -> str:
    if value.lower() == "tab" or value == "\\t":  # a shell passes '\t' as backslash and t
        value = "\t"
    if len(value) != 1 or value in '\r\n"':
        raise argparse.ArgumentTypeError(
            f"{value!r} is not a delimiter: give one character other than a quote or a newline, "
            "e.g. ';' or 'tab'"
        )
    return value


def _add_clinc_parser(sub: Any) -> None:
    p = sub.add_parser("clinc150", help="split the CLINC150 files", description="Split CLINC150 by domain.")
    p.add_argument("--data", type=Path, required=True, help="directory with data_full.json and domains.json")
    _add_common_options(p, tasks=5, clients=5)
    p.set_defaults(func=_cmd_clinc150)


def _add_builtin_parser(sub: Any) -> None:
    p = sub.add_parser("builtin", help="split the built-in dataset", description="Split the bundled dataset.")
    _add_common_options(p, tasks=3, clients=3)
    p.set_defaults(func=_cmd_builtin)


def _cmd_split(args: argparse.Namespace) -> int:
    log = ProblemLog()
    read = {"fmt": args.format, "delimiter": args.delimiter}
    train = load_labelled(args.train, log, args.text_col, args.label_col, **read)
    test = None if args.test is None else load_labelled(args.test, log, args.text_col, args.label_col, **read)
    groups = None if args.label_groups is None else read_label_groups(args.label_groups, log)
    public = read_public(args.public, log)
    for checked in (train, test):
        if checked is not None and not checked.examples and not log:
            log.add(checked.source, "has no examples; it needs one labelled example per row or line")
    # nothing is written, not even the output directory, unless every file passed
    log.raise_if_any("the data cannot be used, nothing was written", footer(log))
    result = _split(args, train.examples, None if test is None else test.examples, groups, args.holdout)
    warnings = [*_file_warnings(train, test), *split_warnings(result)]
    sources = {
        "train": str(args.train),
        "test": str(args.test or ""),
        "label_groups": str(args.label_groups or ""),
        "public": str(args.public),
    }
    write_split(result, public, args.out, sources=_drop_empty(sources), warnings=warnings)
    _print_summary(result, args.out, warnings)
    return 0


def _file_warnings(*files: CheckedFile | None) -> list[str]:
    return [w for checked in files if checked is not None for w in file_warnings(checked)]


def _cmd_clinc150(args: argparse.Namespace) -> int:
    data_file = _require_file(args.data / "data_full.json", "CLINC150 data")
    splits = read_clinc_splits(data_file)
    groups_file = _require_file(args.data / "domains.json", "CLINC150 domains")
    public_file = args.data / "all_wiki_sents.txt"
    log = ProblemLog()
    groups, public = read_label_groups(groups_file, log), read_public(public_file, log)
    log.raise_if_any("the CLINC150 files cannot be used, nothing was written", footer(log))
    result = _split(args, splits["train"], splits["test"], groups)
    sources = {
        "train": f"{data_file}#train",
        "test": f"{data_file}#test",
        "val": f"{data_file}#val",
        "label_groups": str(groups_file),
        "public": str(public_file),
    }
    write_split(result, public, args.out, sources=sources)
    write_jsonl(args.out / "val.jsonl", splits["val"])
    _print_summary(result, args.out)
    print(f"validation: {len(splits['val'])} examples in {args.out / 'val.jsonl'}")
    return 0


def _cmd_builtin(args: argparse.Namespace) -> int:
    builtin = _load_builtin()
    train_path, test_path = Path(builtin.train_path()), builtin.test_path()
    public_path = Path(builtin.public_path())
    log = ProblemLog()
    train = load_labelled(train_path, log)
    test = None if test_path is None else load_labelled(Path(test_path), log)
    public = read_public(public_path, log)
    log.raise_if_any("the built-in dataset cannot be used, nothing was written", footer(log))
    groups = {str(g): [str(label) for label in labels] for g, labels in builtin.load_groups().items()}
    result = _split(args, train.examples, None if test is None else test.examples, groups)
    sources = {"train": str(train_path), "test": str(test_path or ""), "public": str(public_path)}
    write_split(result, public, args.out, sources=_drop_empty(sources))
    _print_summary(result, args.out)
    return 0


def _load_builtin() -> Any:
    try:
        module = importlib.import_module("common.datasets.builtin")
    except ImportError as exc:
        raise DataFormatError(f"the built-in dataset is not available ({exc}); use `fcl-data split`") from exc
    needed = ("train_path", "test_path", "public_path", "load_groups")
    missing = [name for name in needed if not callable(getattr(module, name, None))]
    if missing:
        raise DataFormatError(
            f"the built-in dataset package lacks {', '.join(missing)}; it is incomplete in this install, "
            "use `fcl-data split` with your own files"
        )
    return module


def _split(
    args: argparse.Namespace,
    train: list[Example],
    test: list[Example] | None,
    groups: dict[str, list[str]] | None,
    holdout: float = 0.2,
) -> SplitResult:
    return split_dataset(
        train,
        test,
        num_tasks=args.tasks,
        num_clients=args.clients,
        alpha=args.alpha,
        seed=args.seed,
        label_groups=groups,
        holdout=holdout,
    )


def _drop_empty(mapping: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in mapping.items() if v}


def _require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise DataFormatError(f"{what} file {path} does not exist; check the path")
    return path


def read_label_groups(path: Path, log: ProblemLog) -> dict[str, list[str]]:
    """A JSON object mapping group name -> list of labels, in the file's group order; labels are
    normalised as the data readers normalise them, and checked by the same rule."""
    text = read_text_file(path, log)
    if text is None:
        return {}
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        log.add(str(path), f"is not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})")
        return {}
    if not isinstance(raw, dict) or not raw:
        log.add(str(path), "must be a non-empty JSON object mapping group -> list of labels")
        return {}
    groups: dict[str, list[str]] = {}
    checker = LabelChecker()
    for group, labels in raw.items():
        if not isinstance(labels, list):
            log.add(str(path), "must map to a list of label strings", column=group)
            continue
        groups[group] = []
        for label in labels:
            kept, problem = checker.check(label)
            if problem is not None:
                log.add(str(path), problem, column=group)
            elif kept is not None:
                groups[group].append(kept)
    return groups


def read_public(path: Path, log: ProblemLog) -> list[str]:
    """Unlabelled public sentences, one per line, NFC-normalised; blank lines are dropped."""
    text = read_text_file(path, log)
    if text is None:
        return []
    sentences = [s for s in (normalize_text(line) for line in text.split("\n")) if s]
    if not sentences:
        log.add(str(path), "has no sentences; put one unlabelled sentence per line")
    return sentences


def read_clinc_splits(path: Path) -> dict[str, list[Example]]:
    """Read the train/val/test splits of CLINC150's data_full.json (the oos_* splits are ignored)."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataFormatError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from exc
    if not isinstance(raw, dict):
        raise DataFormatError(f"{path}: expected an object with 'train', 'val' and 'test' lists")
    return {name: _clinc_examples(raw, name, path) for name in ("train", "val", "test")}


def _clinc_examples(raw: dict[str, Any], name: str, path: Path) -> list[Example]:
    rows = raw.get(name)
    if not isinstance(rows, list) or not rows:
        raise DataFormatError(f"{path}: missing or empty {name!r} list of [text, intent] pairs")
    table = RawTable(f"{path}#{name}", "json", "row")
    for i, row in enumerate(rows):
        if not (isinstance(row, list) and len(row) == 2):
            raise DataFormatError(f"{path}: {name}[{i}] is not a [text, intent] pair of non-empty strings")
        table.rows.append(RawRow(row[0], row[1], i + 1))
    log = ProblemLog()
    checked = check_table(table, "text", "intent", log)
    if checked.empty_texts:
        log.add(table.source, "text is empty", unit="row", at=checked.empty_texts[0])
    log.raise_if_any(f"{path} cannot be used, nothing was written", footer(log))
    return checked.examples


def _print_summary(result: SplitResult, out: Path, warnings: list[str] | None = None) -> None:
    s = result.settings
    print(f"wrote {s.num_tasks} tasks x {s.num_clients} clients to {out} (alpha={s.alpha}, seed={s.seed})")
    if s.holdout is not None:
        print(f"no test file: held out {s.holdout:.0%} of each label's train examples as test")
    for name, labels in result.task_labels.items():
        print(f"  {name}: {len(labels)} labels, {len(result.global_test[name])} global test examples")
    for cid, stream in result.streams.items():
        n_train, n_test = sum(len(t.train) for t in stream), sum(len(t.test) for t in stream)
        skipped = result.skipped.get(cid, [])
        note = f" (no data for {', '.join(skipped)})" if skipped else ""
        print(f"  {cid}: {len(stream)} tasks, {n_train} train / {n_test} test examples{note}")
        if not stream:
            print(f"{PROG}: warning: {cid} received no train examples at all", file=sys.stderr)
    for warning in warnings or []:
        print(f"{PROG}: warning: {warning}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
