"""Built-in, originally written multi-domain intent dataset: train/test splits, task groups, public corpus."""

from __future__ import annotations

import json
from pathlib import Path

from common.datasets.checks import read_labelled
from common.datasets.records import Example

BUILTIN_DIR: Path = Path(__file__).resolve().parent


def train_path() -> Path:
    """Path of the committed labelled training split (JSONL)."""
    return BUILTIN_DIR / "train.jsonl"


def test_path() -> Path:
    """Path of the committed labelled test split (JSONL)."""
    return BUILTIN_DIR / "test.jsonl"


def public_path() -> Path:
    """Path of the committed unlabelled public corpus (one sentence per line)."""
    return BUILTIN_DIR / "public.txt"


def groups_path() -> Path:
    """Path of the committed domain -> intents mapping (JSON)."""
    return BUILTIN_DIR / "groups.json"


def load_groups() -> dict[str, list[str]]:
    """Domain name -> its intent labels, domains in their fixed order."""
    raw = json.loads(groups_path().read_text(encoding="utf-8"))
    return {str(domain): [str(label) for label in labels] for domain, labels in raw.items()}


def load_train() -> list[Example]:
    """The labelled training utterances."""
    return read_labelled(train_path())


def load_test() -> list[Example]:
    """The labelled test utterances."""
    return read_labelled(test_path())


def load_public() -> list[str]:
    """The unlabelled public sentences."""
    lines = public_path().read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip()]
