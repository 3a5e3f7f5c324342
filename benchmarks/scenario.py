"""Benchmark scenarios: per-client task streams, global test sets and the public corpus, as FM features."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from common.algorithms.smcf import TaskData
from common.datasets.checks import read_labelled
from common.datasets.records import Example
from common.datasets.split import split_dataset
from common.datasets.streams import load_task_stream
from common.fm import FoundationModel, cached_features


@dataclass(frozen=True)
class ScenarioSpec:
    """A named CLINC150 scenario (BENCHMARK.md): tasks, clients, Dirichlet α and a variant."""

    tasks: int
    clients: int
    alpha: float = 0.5
    variant: str = ""  # "", "recur", "order" or "drop"


SCENARIOS = {
    "clinc150-5x5": ScenarioSpec(5, 5),
    "clinc150-10x10": ScenarioSpec(10, 10),
    "clinc150-5x5-a01": ScenarioSpec(5, 5, alpha=0.1),
    "clinc150-5x5-20c": ScenarioSpec(5, 20),
    "clinc150-5x5-recur": ScenarioSpec(5, 5, variant="recur"),
    "clinc150-5x5-order": ScenarioSpec(5, 5, variant="order"),
    "clinc150-5x5-drop": ScenarioSpec(5, 5, variant="drop"),
}
RECURRING_LABELS = 3  # labels of task 0 that come back, at another client, in task RECUR_TASK
RECUR_TASK = 2


@dataclass
class Scenario:
    name: str
    tasks: list[str]
    train: dict[str, dict[str, TaskData]]  # client → task → training features/labels (absent: no data)
    test: dict[str, dict[str, TaskData]]  # client → task → its test data for that task
    global_test: dict[str, TaskData]  # task → test data of all the task's labels
    public: torch.Tensor
    label_embeddings: dict[str, torch.Tensor]  # label → f(label name), for the zero-shot baseline
    feature_dim: int
    arrival: dict[str, list[str]] | None = None  # task → clients in upload order (None: client order)

    @property
    def clients(self) -> list[str]:
        return sorted(self.train)

    def arrival_order(self, task: str) -> list[str]:
        if self.arrival is None or task not in self.arrival:
            return self.clients
        return self.arrival[task]


class Featurizer:
    """Encodes texts with the FM once; every later request is served from the disk cache."""

    def __init__(self, fm: FoundationModel, cache: Path) -> None:
        self.fm, self.cache = fm, cache

    def texts(self, texts: list[str]) -> torch.Tensor:
        return cached_features(self.fm, texts, self.cache)

    def examples(self, examples: list[Example]) -> TaskData:
        return TaskData(self.texts([ex.text for ex in examples]), [ex.label for ex in examples])


def _split_examples(
    featurizer: Featurizer, examples: list[Example], all_feats: torch.Tensor, index: dict[str, int]
) -> TaskData:
    """Rows of a pre-encoded pool (fast: one encoding pass for the whole dataset)."""
    rows = torch.tensor([index[ex.text] for ex in examples], dtype=torch.long)
    return TaskData(
        all_feats[rows] if len(rows) else torch.empty(0, all_feats.shape[1]), [ex.label for ex in examples]
    )


def clinc150(
    data_dir: Path, name: str, seed: int, featurizer: Featurizer, eval_split: str = "test"
) -> Scenario:
    """A CLINC150 scenario: domains as task groups (domains.json order), Dirichlet(α) over clients.

    For the `order` variant the data split is seed 0's and `seed` draws the arrival order within each
    task, so the spread over seeds is the spread over arrival orders alone.
    """
    spec = SCENARIOS[name]
    split_seed = 0 if spec.variant == "order" else seed
    raw = json.loads((data_dir / "data_full.json").read_text())
    groups = json.loads((data_dir / "domains.json").read_text())
    train = [Example(t, y) for t, y in raw["train"]]
    test = [Example(t, y) for t, y in raw[eval_split]]
    public = [
        line.strip() for line in (data_dir / "all_wiki_sents.txt").read_text().splitlines() if line.strip()
    ]
    result = split_dataset(
        train,
        test,
        num_tasks=spec.tasks,
        num_clients=spec.clients,
        alpha=spec.alpha,
        seed=split_seed,
        label_groups=groups,
    )
    pool = sorted({ex.text for ex in train + test})
    feats = featurizer.texts(pool)
    index = {text: i for i, text in enumerate(pool)}
    tasks = list(result.task_labels)
    streams = {c: {t.name: t for t in stream} for c, stream in result.streams.items()}
    sc = Scenario(
        name=name,
        tasks=tasks,
        train={
            c: {n: _split_examples(featurizer, t.train, feats, index) for n, t in s.items()}
            for c, s in streams.items()
        },
        test={
            c: {n: _split_examples(featurizer, t.test, feats, index) for n, t in s.items()}
            for c, s in streams.items()
        },
        global_test={t: _split_examples(featurizer, result.global_test[t], feats, index) for t in tasks},
        public=featurizer.texts(public),
        label_embeddings=_label_embeddings(featurizer, sorted({ex.label for ex in train})),
        feature_dim=feats.shape[1],
    )
    return apply_variant(sc, spec.variant, seed)


def apply_variant(sc: Scenario, variant: str, seed: int) -> Scenario:
    """Turn a plain scenario into its harder variant (in place; returned for chaining)."""
    if variant == "order":
        gen = torch.Generator().manual_seed(seed)
        sc.arrival = {
            t: [sc.clients[i] for i in torch.randperm(len(sc.clients), generator=gen)] for t in sc.tasks
        }
    elif variant == "drop":
        gone = sc.clients[0]  # leaves after its first task: later tasks' data at that site is never seen
        sc.train[gone] = {t: d for t, d in sc.train[gone].items() if t == sc.tasks[0]}
        sc.test[gone] = {t: d for t, d in sc.test[gone].items() if t == sc.tasks[0]}
    elif variant == "recur":
        _recur(sc)
    elif variant:
        raise ValueError(f"unknown scenario variant {variant!r}")
    return sc


def _recur(sc: Scenario) -> None:
    """The first labels of task 0 come back in a later task at a client that has not seen them.

    The newcomer is the client holding the fewest of the label's task-0 examples (rotating with the
    label, so different labels recur at different clients). Its own examples and half of every other
    client's move to its later task, so the label still arrives in task 0 elsewhere; its test
    utterances join the newcomer's test set of that later task.
    """
    first, later = sc.tasks[0], sc.tasks[RECUR_TASK]
    labels = sorted(set(sc.global_test[first].labels))[:RECURRING_LABELS]
    for k, label in enumerate(labels):
        held = {c: _label_rows(sc.train[c].get(first), label) for c in sc.clients}
        rotated = sc.clients[k:] + sc.clients[:k]
        newcomer = min(rotated, key=lambda c: len(held[c]))
        moved: list[TaskData] = []
        for c, rows in held.items():
            if not rows:
                continue
            data = sc.train[c][first]
            gone = set(rows) if c == newcomer else set(rows[len(rows) // 2 :])
            moved.append(_rows(data, sorted(gone)))
            sc.train[c][first] = _rows(data, [i for i in range(len(data.labels)) if i not in gone])
        if first in sc.test[newcomer]:
            own = sc.test[newcomer][first]
            sc.test[newcomer][first] = _rows(own, [i for i, y in enumerate(own.labels) if y != label])
        _append(sc.train[newcomer], later, moved)
        test = sc.global_test[first]
        _append(sc.test[newcomer], later, [_rows(test, _label_rows(test, label))])


def _label_rows(data: TaskData | None, label: str) -> list[int]:
    return [] if data is None else [i for i, y in enumerate(data.labels) if y == label]


def _rows(data: TaskData, rows: list[int]) -> TaskData:
    index = torch.tensor(rows, dtype=torch.long)
    return TaskData(data.features[index] if rows else data.features[:0], [data.labels[i] for i in rows])


def _append(stream: dict[str, TaskData], task: str, parts: list[TaskData]) -> None:
    parts = [p for p in parts if p.labels]
    if task in stream:
        parts = [stream[task], *parts]
    if parts:
        stream[task] = TaskData(torch.cat([p.features for p in parts]), [y for p in parts for y in p.labels])


def custom(data_dir: Path, featurizer: Featurizer) -> Scenario:
    """Any `fcl-data split` output directory."""
    tasks = sorted(p.stem for p in (data_dir / "global_test").glob("*.jsonl"))
    streams = {
        p.name: {t.name: t for t in load_task_stream(p)}
        for p in sorted((data_dir / "clients").iterdir())
        if p.is_dir()
    }
    public = [line.strip() for line in (data_dir / "public.txt").read_text().splitlines() if line.strip()]
    global_test = {
        t: featurizer.examples(read_labelled(data_dir / "global_test" / f"{t}.jsonl")) for t in tasks
    }
    labels = sorted({y for data in global_test.values() for y in data.labels})
    return Scenario(
        name=f"custom:{data_dir.name}",
        tasks=tasks,
        train={c: {n: featurizer.examples(t.train) for n, t in s.items()} for c, s in streams.items()},
        test={c: {n: featurizer.examples(t.test) for n, t in s.items()} for c, s in streams.items()},
        global_test=global_test,
        public=featurizer.texts(public),
        label_embeddings=_label_embeddings(featurizer, labels),
        feature_dim=featurizer.fm.feature_dim,
    )


def _label_embeddings(featurizer: Featurizer, labels: list[str]) -> dict[str, torch.Tensor]:
    from common.zeroshot import label_prompt

    feats = featurizer.texts([label_prompt(y) for y in labels])
    return {y: feats[i] for i, y in enumerate(labels)}
