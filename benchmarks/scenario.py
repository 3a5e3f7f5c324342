"""Benchmark scenarios: per-client task streams, global test sets and the public corpus, as FM features."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from common.algorithms.smcf import TaskData
from common.datasets.records import Example, read_jsonl
from common.datasets.split import split_dataset
from common.datasets.streams import load_task_stream
from common.fm import FoundationModel, cached_features

SCENARIOS = {"clinc150-5x5": (5, 5), "clinc150-10x10": (10, 10)}


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

    @property
    def clients(self) -> list[str]:
        return sorted(self.train)


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
    """A CLINC150 scenario: domains as task groups (domains.json order), Dirichlet(0.5) over clients."""
    num_tasks, num_clients = SCENARIOS[name]
    raw = json.loads((data_dir / "data_full.json").read_text())
    groups = json.loads((data_dir / "domains.json").read_text())
    train = [Example(t, y) for t, y in raw["train"]]
    test = [Example(t, y) for t, y in raw[eval_split]]
    public = [
        line.strip() for line in (data_dir / "all_wiki_sents.txt").read_text().splitlines() if line.strip()
    ]
    result = split_dataset(
        train, test, num_tasks=num_tasks, num_clients=num_clients, alpha=0.5, seed=seed, label_groups=groups
    )
    pool = sorted({ex.text for ex in train + test})
    feats = featurizer.texts(pool)
    index = {text: i for i, text in enumerate(pool)}
    tasks = list(result.task_labels)
    streams = {c: {t.name: t for t in stream} for c, stream in result.streams.items()}
    return Scenario(
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


def custom(data_dir: Path, featurizer: Featurizer) -> Scenario:
    """Any `fcl-data split` output directory."""
    tasks = sorted(p.stem for p in (data_dir / "global_test").glob("*.jsonl"))
    streams = {
        p.name: {t.name: t for t in load_task_stream(p)}
        for p in sorted((data_dir / "clients").iterdir())
        if p.is_dir()
    }
    public = [line.strip() for line in (data_dir / "public.txt").read_text().splitlines() if line.strip()]
    global_test = {t: featurizer.examples(read_jsonl(data_dir / "global_test" / f"{t}.jsonl")) for t in tasks}
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
