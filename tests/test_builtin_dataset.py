"""Requirements on the built-in intent dataset: sizes, disjoint splits, groups, public corpus, freshness."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest

from common.datasets import builtin
from common.datasets.builtin import generate as gen
from common.datasets.builtin.templates import DOMAINS, normalise
from common.datasets.records import Example

MIN_TRAIN_PER_INTENT = 40
MIN_TEST_PER_INTENT = 12
MIN_DOMAINS = 9
MIN_INTENTS = 36
MIN_PUBLIC = 1500
SNAKE = re.compile(r"^[a-z][a-z0-9]*(_[a-z0-9]+)*$")


@pytest.fixture(scope="module")
def train() -> list[Example]:
    return builtin.load_train()


@pytest.fixture(scope="module")
def test_split() -> list[Example]:
    return builtin.load_test()


@pytest.fixture(scope="module")
def groups() -> dict[str, list[str]]:
    return builtin.load_groups()


@pytest.fixture(scope="module")
def public() -> list[str]:
    return builtin.load_public()


def test_committed_files_exist() -> None:
    for path in (builtin.train_path(), builtin.test_path(), builtin.public_path(), builtin.groups_path()):
        assert path.is_file(), f"missing {path}; run python -m common.datasets.builtin.generate"
        assert path.parent == builtin.BUILTIN_DIR


def test_domains_and_intents(groups: dict[str, list[str]]) -> None:
    intents = [label for labels in groups.values() for label in labels]
    assert len(groups) >= MIN_DOMAINS
    assert len(intents) >= MIN_INTENTS
    assert len(set(intents)) == len(intents), "intent names must be globally unique"
    assert all(SNAKE.match(name) for name in intents), intents
    assert all(len(labels) >= 2 for labels in groups.values()), "each domain needs several intents"
    assert list(groups) == list(DOMAINS), "domains must keep their fixed order"


def test_groups_match_labels(
    train: list[Example], test_split: list[Example], groups: dict[str, list[str]]
) -> None:
    grouped = {label for labels in groups.values() for label in labels}
    assert {ex.label for ex in train} == grouped
    assert {ex.label for ex in test_split} == grouped


def test_counts_per_intent(
    train: list[Example], test_split: list[Example], groups: dict[str, list[str]]
) -> None:
    train_counts = Counter(ex.label for ex in train)
    test_counts = Counter(ex.label for ex in test_split)
    for labels in groups.values():
        for label in labels:
            assert train_counts[label] >= MIN_TRAIN_PER_INTENT, (label, train_counts[label])
            assert test_counts[label] >= MIN_TEST_PER_INTENT, (label, test_counts[label])


def test_utterances_distinct_and_splits_disjoint(train: list[Example], test_split: list[Example]) -> None:
    train_keys = [normalise(ex.text) for ex in train]
    test_keys = [normalise(ex.text) for ex in test_split]
    assert all(key for key in train_keys + test_keys), "empty utterance"
    assert len(set(train_keys)) == len(train_keys), "duplicate training utterances"
    assert len(set(test_keys)) == len(test_keys), "duplicate test utterances"
    overlap = set(train_keys) & set(test_keys)
    assert not overlap, f"test utterances also in train (ignoring case/punctuation): {sorted(overlap)[:5]}"


def test_public_corpus(public: list[str], train: list[Example], test_split: list[Example]) -> None:
    assert len(public) >= MIN_PUBLIC
    keys = [normalise(sentence) for sentence in public]
    assert len(set(keys)) == len(keys), "duplicate public sentences"
    labelled = {normalise(ex.text) for ex in train + test_split}
    assert not set(keys) & labelled, "public sentences must not repeat labelled utterances"
    assert all(5 <= len(sentence.split()) <= 25 for sentence in public)
    assert sum(sentence.endswith("?") for sentence in public) >= 0.05 * len(public), "needs questions"


def test_groups_json_is_an_object_of_lists() -> None:
    raw = json.loads(builtin.groups_path().read_text(encoding="utf-8"))
    assert isinstance(raw, dict)
    assert all(
        isinstance(labels, list) and all(isinstance(x, str) for x in labels) for labels in raw.values()
    )


def test_generate_is_deterministic() -> None:
    assert gen.generate(0) == gen.generate(0)
    assert gen.generate(1).train != gen.generate(0).train


def test_committed_files_are_fresh(
    train: list[Example], test_split: list[Example], groups: dict[str, list[str]], public: list[str]
) -> None:
    fresh = gen.generate()
    hint = "committed files are stale; run python -m common.datasets.builtin.generate"
    assert fresh.train == train, hint
    assert fresh.test == test_split, hint
    assert fresh.groups == groups, hint
    assert fresh.public == public, hint
    assert gen.stale_files(fresh) == [], hint


def test_check_mode(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert gen.main(["--check"]) == 0
    assert gen.main(["--out", str(tmp_path)]) == 0
    assert gen.main(["--check", "--out", str(tmp_path)]) == 0
    (tmp_path / "public.txt").write_text("stale\n", encoding="utf-8")
    assert gen.main(["--check", "--out", str(tmp_path)]) == 1
    assert "public.txt" in capsys.readouterr().err
