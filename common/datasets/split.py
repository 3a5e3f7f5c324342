"""Split a labelled dataset into per-client continual-learning task streams (label groups + Dirichlet)."""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from common.datasets.records import Example, write_jsonl
from common.datasets.streams import Task, write_task

SPLIT_FILE = "split.json"
PUBLIC_FILE = "public.txt"
CLIENTS_DIR = "clients"
GLOBAL_TEST_DIR = "global_test"


class SplitError(ValueError):
    """The split settings do not fit the data; the message says what to change."""


@dataclass(frozen=True)
class SplitSettings:
    """The knobs a split was made with (recorded in split.json)."""

    num_tasks: int
    num_clients: int
    alpha: float
    seed: int
    holdout: float | None
    label_groups: dict[str, list[str]] | None = None


@dataclass(frozen=True)
class SplitResult:
    """Per-client task streams plus the global test sets and task definitions."""

    settings: SplitSettings
    task_labels: dict[str, list[str]]
    task_groups: dict[str, list[str]]
    streams: dict[str, list[Task]]
    global_test: dict[str, list[Example]]
    skipped: dict[str, list[str]] = field(default_factory=dict)
    num_train: int = 0
    num_test: int = 0


def client_id(index: int) -> str:
    """Name of the `index`-th client."""
    return f"client-{index}"


def task_name(index: int) -> str:
    """Name of the `index`-th task."""
    return f"task-{index:02d}"


def split_dataset(
    train: list[Example],
    test: list[Example] | None,
    *,
    num_tasks: int,
    num_clients: int,
    alpha: float,
    seed: int,
    label_groups: Mapping[str, Sequence[str]] | None,
    holdout: float = 0.2,
) -> SplitResult:
    """Deal labels to tasks and each label's train examples to clients by a Dirichlet(alpha) draw."""
    used_holdout = holdout if test is None else None
    _check_settings(train, num_tasks, num_clients, alpha, used_holdout)
    seeds = np.random.SeedSequence(seed).spawn(3)
    holdout_rng, task_rng, client_rng = (np.random.default_rng(s) for s in seeds)
    if test is None:
        train, test = holdout_split(train, holdout, holdout_rng)
    else:
        _check_test_labels(train, test)
    groups = None if label_groups is None else {g: list(labels) for g, labels in label_groups.items()}
    task_labels, task_groups = assign_tasks(sorted({ex.label for ex in train}), num_tasks, groups, task_rng)
    owner = assign_clients(train, num_clients, alpha, client_rng)
    streams, skipped = _build_streams(train, test, owner, num_clients, task_labels)
    settings = SplitSettings(num_tasks, num_clients, alpha, seed, used_holdout, groups)
    return SplitResult(
        settings=settings,
        task_labels=task_labels,
        task_groups=task_groups,
        streams=streams,
        global_test={t: _examples_with_labels(test, set(ls)) for t, ls in task_labels.items()},
        skipped=skipped,
        num_train=len(train),
        num_test=len(test),
    )


def _check_settings(
    train: list[Example], num_tasks: int, num_clients: int, alpha: float, holdout: float | None
) -> None:
    if not train:
        raise SplitError("the train set is empty; pass a file with at least one labelled example")
    if num_tasks < 1:
        raise SplitError(f"number of tasks must be >= 1, got {num_tasks}")
    if num_clients < 1:
        raise SplitError(f"number of clients must be >= 1, got {num_clients}")
    if not (math.isfinite(alpha) and alpha > 0):
        raise SplitError(
            f"Dirichlet alpha must be a positive number, got {alpha} (e.g. 0.5; larger = more even)"
        )
    if holdout is not None and not 0 < holdout < 1:
        raise SplitError(f"holdout fraction must be between 0 and 1, got {holdout}")
    num_labels = len({ex.label for ex in train})
    if num_tasks > num_labels:
        raise SplitError(
            f"cannot make {num_tasks} tasks from {num_labels} labels; use --tasks {num_labels} or fewer"
        )


def _check_test_labels(train: list[Example], test: list[Example]) -> None:
    unknown = sorted({ex.label for ex in test} - {ex.label for ex in train})
    if unknown:
        raise SplitError(
            f"the test set has {len(unknown)} label(s) that never occur in the train set: "
            f"{_preview(unknown)}; remove them from the test file or add train examples"
        )


def holdout_split(
    examples: list[Example], fraction: float, rng: np.random.Generator
) -> tuple[list[Example], list[Example]]:
    """Hold out a seeded `fraction` of each label's examples (>= 1 when the label has >= 2) as test."""
    test_idx: set[int] = set()
    for _label, indices in sorted(_indices_by_label(examples).items()):
        n_test = _holdout_count(len(indices), fraction)
        chosen = rng.permutation(len(indices))[:n_test]
        test_idx.update(indices[int(i)] for i in chosen)
    train = [ex for i, ex in enumerate(examples) if i not in test_idx]
    test = [ex for i, ex in enumerate(examples) if i in test_idx]
    return train, test


def _holdout_count(n: int, fraction: float) -> int:
    if n < 2:
        return 0
    return min(n - 1, max(1, round(fraction * n)))


def assign_tasks(
    labels: list[str],
    num_tasks: int,
    label_groups: dict[str, list[str]] | None,
    rng: np.random.Generator,
) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """Return task -> labels and task -> groups (empty without label groups)."""
    if label_groups is None:
        shuffled = [labels[int(i)] for i in rng.permutation(len(labels))]
        parts = _contiguous_blocks(shuffled, num_tasks)
        return {task_name(t): sorted(part) for t, part in enumerate(parts)}, {}
    _check_groups(labels, num_tasks, label_groups)
    group_blocks = _contiguous_blocks(list(label_groups), num_tasks)
    task_labels = {
        task_name(t): [label for group in block for label in label_groups[group]]
        for t, block in enumerate(group_blocks)
    }
    return task_labels, {task_name(t): block for t, block in enumerate(group_blocks)}


def _contiguous_blocks(items: list[str], num_blocks: int) -> list[list[str]]:
    """Cut `items` into `num_blocks` contiguous near-equal blocks; earlier blocks get the extra items."""
    base, extra = divmod(len(items), num_blocks)
    blocks: list[list[str]] = []
    start = 0
    for b in range(num_blocks):
        size = base + (1 if b < extra else 0)
        blocks.append(items[start : start + size])
        start += size
    return blocks


def _check_groups(labels: list[str], num_tasks: int, label_groups: dict[str, list[str]]) -> None:
    if len(label_groups) < num_tasks:
        raise SplitError(
            f"cannot deal {len(label_groups)} label groups to {num_tasks} tasks; "
            f"use at most {len(label_groups)} tasks or define more groups"
        )
    seen: dict[str, str] = {}
    for group, members in label_groups.items():
        if not members:
            raise SplitError(f"label group {group!r} is empty; give it at least one label or remove it")
        for label in members:
            if label in seen:
                raise SplitError(f"label {label!r} is in both group {seen[label]!r} and group {group!r}")
            seen[label] = group
    absent = sorted(set(seen) - set(labels))
    if absent:
        raise SplitError(
            f"label groups name {len(absent)} label(s) absent from the train data: {_preview(absent)}; "
            "fix the spelling or remove them from the groups file"
        )
    ungrouped = sorted(set(labels) - set(seen))
    if ungrouped:
        raise SplitError(
            f"{len(ungrouped)} train label(s) are in no label group: {_preview(ungrouped)}; "
            "add them to a group in the groups file"
        )


def assign_clients(
    examples: list[Example], num_clients: int, alpha: float, rng: np.random.Generator
) -> list[int]:
    """Client index of every example: per label, shares come from one Dirichlet(alpha) draw."""
    owner = [0] * len(examples)
    for _label, indices in sorted(_indices_by_label(examples).items()):
        order = rng.permutation(len(indices))
        counts = dirichlet_counts(len(indices), num_clients, alpha, rng)
        start = 0
        for client, count in enumerate(counts):
            for pos in order[start : start + count]:
                owner[indices[int(pos)]] = client
            start += count
    return owner


def dirichlet_counts(n: int, num_clients: int, alpha: float, rng: np.random.Generator) -> list[int]:
    """Split `n` items over clients: proportions ~ Dirichlet(alpha), largest-remainder rounding (exact)."""
    proportions = rng.dirichlet(np.full(num_clients, alpha))
    if not np.all(np.isfinite(proportions)) or proportions.sum() <= 0:
        proportions = np.full(num_clients, 1.0 / num_clients)
    return round_exact(proportions / proportions.sum(), n)


def round_exact(proportions: np.ndarray, n: int) -> list[int]:
    """Round `proportions * n` to integers summing to exactly `n` (largest remainder, ties by index)."""
    raw = proportions * n
    counts = np.floor(raw).astype(int)
    remainder = n - int(counts.sum())
    for i in np.argsort(-(raw - counts), kind="stable")[:remainder]:
        counts[i] += 1
    return [int(c) for c in counts]


def _build_streams(
    train: list[Example],
    test: list[Example],
    owner: list[int],
    num_clients: int,
    task_labels: dict[str, list[str]],
) -> tuple[dict[str, list[Task]], dict[str, list[str]]]:
    streams: dict[str, list[Task]] = {}
    skipped: dict[str, list[str]] = {}
    for c in range(num_clients):
        own = [ex for ex, o in zip(train, owner, strict=True) if o == c]
        cid = client_id(c)
        streams[cid], skipped[cid] = [], []
        for name, labels in task_labels.items():
            task_train = _examples_with_labels(own, set(labels))
            if not task_train:
                skipped[cid].append(name)
                continue
            held = {ex.label for ex in task_train}
            streams[cid].append(Task(name, task_train, _examples_with_labels(test, held)))
    return streams, {cid: tasks for cid, tasks in skipped.items() if tasks}


def _examples_with_labels(examples: list[Example], labels: set[str]) -> list[Example]:
    return [ex for ex in examples if ex.label in labels]


def _indices_by_label(examples: list[Example]) -> dict[str, list[int]]:
    by_label: dict[str, list[int]] = {}
    for i, ex in enumerate(examples):
        by_label.setdefault(ex.label, []).append(i)
    return by_label


def _preview(items: list[str], limit: int = 8) -> str:
    shown = ", ".join(repr(x) for x in items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


def write_split(
    result: SplitResult,
    public_sentences: list[str],
    out: Path,
    *,
    sources: Mapping[str, str] | None = None,
    warnings: Sequence[str] = (),
) -> None:
    """Write client streams, global test sets, public.txt and split.json (with `warnings`) under `out`."""
    out = Path(out)
    prepare_output_dir(out)
    for cid, stream in result.streams.items():
        client_dir = out / CLIENTS_DIR / cid
        client_dir.mkdir(parents=True, exist_ok=True)
        for task in stream:
            write_task(client_dir, task)
    for name, examples in result.global_test.items():
        write_jsonl(out / GLOBAL_TEST_DIR / f"{name}.jsonl", examples)
    lines = [" ".join(s.split()) for s in public_sentences]
    (out / PUBLIC_FILE).write_text("".join(f"{s}\n" for s in lines if s), encoding="utf-8")
    manifest = split_manifest(result, sources or {}, len([s for s in lines if s]))
    manifest["warnings"] = list(warnings)
    (out / SPLIT_FILE).write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def prepare_output_dir(out: Path) -> None:
    """Make `out` ready: new/empty, or an earlier split whose client and test folders are replaced."""
    if out.exists() and not out.is_dir():
        raise SplitError(f"output path {out} is a file; pass a directory")
    if out.is_dir() and any(out.iterdir()):
        if not (out / SPLIT_FILE).is_file():
            raise SplitError(
                f"output directory {out} is not empty and holds no earlier split ({SPLIT_FILE}); "
                "choose a new or empty directory"
            )
        for sub in (CLIENTS_DIR, GLOBAL_TEST_DIR):
            if (out / sub).is_dir():
                shutil.rmtree(out / sub)
    out.mkdir(parents=True, exist_ok=True)


def split_manifest(result: SplitResult, sources: Mapping[str, str], num_public: int) -> dict[str, Any]:
    """The JSON-ready description of a split written to split.json."""
    s = result.settings
    return {
        "num_tasks": s.num_tasks,
        "num_clients": s.num_clients,
        "alpha": s.alpha,
        "seed": s.seed,
        "holdout": s.holdout,
        "sources": dict(sources),
        "num_train": result.num_train,
        "num_test": result.num_test,
        "num_public": num_public,
        "tasks": result.task_labels,
        "task_groups": result.task_groups,
        "global_test": {name: len(exs) for name, exs in result.global_test.items()},
        "clients": {cid: _client_manifest(stream) for cid, stream in result.streams.items()},
        "skipped_tasks": result.skipped,
    }


def _client_manifest(stream: list[Task]) -> dict[str, Any]:
    return {
        task.name: {
            "labels": {label: sum(ex.label == label for ex in task.train) for label in task.labels},
            "train": len(task.train),
            "test": len(task.test),
        }
        for task in stream
    }
