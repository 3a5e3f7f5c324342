"""The `fcl-data` command: turn labelled datasets into per-client continual-learning task streams."""

from __future__ import annotations

import argparse
import csv
import importlib
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from common.datasets.records import DataFormatError, Example, read_examples, write_jsonl
from common.datasets.split import SplitError, SplitResult, split_dataset, write_split

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
    p = sub.add_parser("split", help="split a CSV/JSONL dataset", description="Split a CSV or JSONL dataset.")
    p.add_argument("--train", type=Path, required=True, help="labelled train file (.csv or JSONL)")
    p.add_argument("--test", type=Path, help="labelled test file; default: hold out part of --train")
    p.add_argument("--text-col", default="text", help="text column/field name (default: text)")
    p.add_argument("--label-col", default="label", help="label column/field name (default: label)")
    p.add_argument("--label-groups", type=Path, help="JSON object: group -> list of labels")
    p.add_argument("--public", type=Path, required=True, help="unlabelled sentences, one per line")
    p.add_argument("--holdout", type=float, default=0.2, help="test fraction when --test is missing")
    _add_common_options(p, tasks=None, clients=None)
    p.set_defaults(func=_cmd_split)


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
    train = read_labelled(args.train, args.text_col, args.label_col)
    test = None if args.test is None else read_labelled(args.test, args.text_col, args.label_col)
    groups = None if args.label_groups is None else read_label_groups(args.label_groups)
    public = read_public(args.public)
    sources = {
        "train": str(args.train),
        "test": str(args.test or ""),
        "label_groups": str(args.label_groups or ""),
        "public": str(args.public),
    }
    result = _split(args, train, test, groups, holdout=args.holdout)
    write_split(result, public, args.out, sources=_drop_empty(sources))
    _print_summary(result, args.out)
    return 0


def _cmd_clinc150(args: argparse.Namespace) -> int:
    data_file = _require_file(args.data / "data_full.json", "CLINC150 data")
    splits = read_clinc_splits(data_file)
    groups_file = _require_file(args.data / "domains.json", "CLINC150 domains")
    public_file = args.data / "all_wiki_sents.txt"
    groups, public = read_label_groups(groups_file), read_public(public_file)
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
    test = None if test_path is None else read_labelled(Path(test_path))
    groups = {str(g): [str(label) for label in labels] for g, labels in builtin.load_groups().items()}
    result = _split(args, read_labelled(train_path), test, groups)
    sources = {"train": str(train_path), "test": str(test_path or ""), "public": str(public_path)}
    write_split(result, read_public(public_path), args.out, sources=_drop_empty(sources))
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


def read_labelled(path: Path, text_col: str = "text", label_col: str = "label") -> list[Example]:
    """Read a CSV/JSONL labelled file, checking CSV headers first and refusing empty files."""
    _require_file(path, "labelled data")
    if path.suffix.lower() == ".csv":
        _check_csv_columns(path, (text_col, label_col))
    examples = read_examples(path, text_col, label_col)
    if not examples:
        raise DataFormatError(f"{path} has no examples; it needs one labelled example per row/line")
    return examples


def _check_csv_columns(path: Path, columns: Sequence[str]) -> None:
    with path.open(encoding="utf-8", newline="") as fh:
        header = next(csv.reader(fh), [])
    for col in columns:
        if col not in header:
            raise DataFormatError(
                f"{path}: no column {col!r} in the header (columns: {', '.join(header) or 'none'}); "
                "name the right ones with --text-col/--label-col"
            )


def read_label_groups(path: Path) -> dict[str, list[str]]:
    """Read a JSON object mapping group name -> list of labels, keeping the file's group order."""
    _require_file(path, "label groups")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataFormatError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from exc
    if not isinstance(raw, dict) or not raw:
        raise DataFormatError(f"{path}: expected a non-empty JSON object mapping group -> list of labels")
    groups: dict[str, list[str]] = {}
    for group, labels in raw.items():
        if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
            raise DataFormatError(f"{path}: group {group!r} must map to a list of label strings")
        groups[group] = [x.strip() for x in labels]
    return groups


def read_public(path: Path) -> list[str]:
    """Read unlabelled public sentences, one per line; blank lines are dropped."""
    _require_file(path, "public sentences")
    with path.open(encoding="utf-8") as fh:
        sentences = [line.strip() for line in fh if line.strip()]
    if not sentences:
        raise DataFormatError(f"{path} has no sentences; put one unlabelled sentence per line")
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
    examples: list[Example] = []
    for i, row in enumerate(rows):
        ok = isinstance(row, list) and len(row) == 2 and all(isinstance(x, str) and x.strip() for x in row)
        if not ok:
            raise DataFormatError(f"{path}: {name}[{i}] is not a [text, intent] pair of non-empty strings")
        examples.append(Example(text=row[0].strip(), label=row[1].strip()))
    return examples


def _print_summary(result: SplitResult, out: Path) -> None:
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


if __name__ == "__main__":
    sys.exit(main())
