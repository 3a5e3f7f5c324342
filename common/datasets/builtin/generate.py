"""Deterministic generator for the built-in dataset files (`python -m common.datasets.builtin.generate`)."""

from __future__ import annotations

import argparse
import itertools
import json
import math
import random
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from common.datasets.builtin import BUILTIN_DIR
from common.datasets.builtin.templates import (
    DOMAINS,
    INTENT_SLOTS,
    PUBLIC_SLOTS,
    PUBLIC_TEMPLATES,
    normalise,
    placeholders,
    tidy,
)
from common.datasets.records import Example, write_jsonl

N_TRAIN = 60  # training utterances per intent
N_TEST = 16  # test utterances per intent
N_TEST_HELD_OUT = 8  # of which drawn from templates never used for training
N_HELD_TEMPLATES = 3  # templates per intent reserved for the test split
PER_TEMPLATE = 40  # at most this many fillings per intent template
N_PUBLIC = 1800  # public sentences
PER_PUBLIC_TEMPLATE = 40  # at most this many fillings per public template
PUBLIC_WORDS = (5, 25)  # inclusive word-count range of a public sentence

FILES = ("train.jsonl", "test.jsonl", "public.txt", "groups.json")


@dataclass(frozen=True)
class BuiltinData:
    """Everything the generator produces."""

    train: list[Example]
    test: list[Example]
    public: list[str]
    groups: dict[str, list[str]]


def expand(template: str, slots: Mapping[str, Sequence[str]], rng: random.Random, limit: int) -> list[str]:
    """Up to `limit` distinct fillings of `template`, in a seeded random order."""
    pairs = placeholders(template)
    for _, base in pairs:
        if base not in slots:
            raise KeyError(f"template {template!r} uses unknown slot {base!r}")
    names = [name for name, _ in pairs]
    bases = [base for _, base in pairs]
    choices = [slots[base] for base in bases]
    total = math.prod(len(values) for values in choices)

    def valid(combo: Sequence[str]) -> bool:
        # placeholders sharing a base slot (e.g. {city} and {city2}) must take different values
        return all(
            combo[i] != combo[j]
            for i, j in itertools.combinations(range(len(combo)), 2)
            if bases[i] == bases[j]
        )

    if total <= 4 * limit:
        combos = [combo for combo in itertools.product(*choices) if valid(combo)]
        rng.shuffle(combos)
    else:
        picked: dict[tuple[str, ...], None] = {}
        for _ in range(20 * limit):
            combo = tuple(rng.choice(values) for values in choices)
            if valid(combo):
                picked.setdefault(combo, None)
            if len(picked) >= limit:
                break
        combos = list(picked)
    out: dict[str, None] = {}
    for combo in combos:
        out.setdefault(tidy(template.format(**dict(zip(names, combo, strict=True)))), None)
        if len(out) >= limit:
            break
    return list(out)


def interleave(pools: Sequence[Sequence[str]]) -> Iterator[str]:
    """Round-robin over the pools so that every template is represented evenly."""
    for i in range(max((len(pool) for pool in pools), default=0)):
        for pool in pools:
            if i < len(pool):
                yield pool[i]


def take(stream: Iterator[str], count: int, seen: set[str], what: str) -> list[str]:
    """The next `count` strings of `stream` whose normalised form is not in `seen` (which is updated)."""
    out: list[str] = []
    for text in stream:
        key = normalise(text)
        if key in seen:
            continue
        seen.add(key)
        out.append(text)
        if len(out) == count:
            return out
    raise RuntimeError(
        f"{what}: only {len(out)} distinct sentences, need {count}; add templates or slot values"
    )


def generate(seed: int = 0) -> BuiltinData:
    """Expand the templates into train/test utterances, the task groups and the public corpus."""
    rng = random.Random(seed)
    seen: set[str] = set()
    train: list[Example] = []
    test: list[Example] = []
    groups: dict[str, list[str]] = {}
    for domain, intents in DOMAINS.items():
        groups[domain] = list(intents)
        for intent, templates in intents.items():
            order = list(range(len(templates)))
            rng.shuffle(order)
            held = sorted(order[:N_HELD_TEMPLATES])
            kept = sorted(order[N_HELD_TEMPLATES:])
            held_stream = interleave([expand(templates[i], INTENT_SLOTS, rng, PER_TEMPLATE) for i in held])
            kept_stream = interleave([expand(templates[i], INTENT_SLOTS, rng, PER_TEMPLATE) for i in kept])
            train_texts = take(kept_stream, N_TRAIN, seen, f"{intent} train")
            test_texts = take(held_stream, N_TEST_HELD_OUT, seen, f"{intent} held-out test")
            test_texts += take(kept_stream, N_TEST - N_TEST_HELD_OUT, seen, f"{intent} test")
            train += [Example(text=text, label=intent) for text in train_texts]
            test += [Example(text=text, label=intent) for text in test_texts]

    low, high = PUBLIC_WORDS
    pools = [expand(template, PUBLIC_SLOTS, rng, PER_PUBLIC_TEMPLATE) for template in PUBLIC_TEMPLATES]
    candidates = (text for text in interleave(pools) if low <= len(text.split()) <= high)
    public = take(candidates, N_PUBLIC, seen, "public corpus")
    return BuiltinData(train=train, test=test, public=public, groups=groups)


def write(data: BuiltinData, directory: Path) -> None:
    """Write the four dataset files into `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    write_jsonl(directory / "train.jsonl", data.train)
    write_jsonl(directory / "test.jsonl", data.test)
    (directory / "public.txt").write_text("\n".join(data.public) + "\n", encoding="utf-8")
    (directory / "groups.json").write_text(json.dumps(data.groups, indent=2) + "\n", encoding="utf-8")


def stale_files(data: BuiltinData, directory: Path = BUILTIN_DIR) -> list[str]:
    """Names of the committed files in `directory` that differ from (or are missing against) `data`."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp)
        write(data, fresh)
        return [
            name
            for name in FILES
            if not (directory / name).is_file()
            or (directory / name).read_bytes() != (fresh / name).read_bytes()
        ]


def main(argv: Sequence[str] | None = None) -> int:
    """Write the dataset files, or with `--check` report (exit 1) whether the committed ones are stale."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="exit 1 if the committed files are out of date")
    parser.add_argument("--seed", type=int, default=0, help="generator seed (the committed files use 0)")
    parser.add_argument(
        "--out", type=Path, default=BUILTIN_DIR, help="directory to write to or check (default: the package)"
    )
    args = parser.parse_args(argv)
    data = generate(args.seed)
    if args.check:
        stale = stale_files(data, args.out)
        if stale:
            print(
                f"out of date: {', '.join(stale)}; run: python -m common.datasets.builtin.generate",
                file=sys.stderr,
            )
            return 1
        print("built-in dataset files are up to date")
        return 0
    write(data, args.out)
    print(
        f"wrote {len(data.train)} train, {len(data.test)} test, {len(data.public)} public sentences, "
        f"{len(data.groups)} domains to {args.out}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
