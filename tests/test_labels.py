"""The shared label rule (common/labels.py) and labels everywhere they travel: packages (safetensors
metadata), JSON, logs and HTML, each tested with markup, quotes, right-to-left text, emoji and CJK."""

from __future__ import annotations

import io
import json
import logging
from html import escape
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save as st_save

from common import wire_limits as wire
from common.algorithms.stats import StatsBank
from common.labels import LabelError, check_label, label_problem, normalize_text
from common.logs import JsonFormatter, formatter
from common.package import (
    FORMAT,
    KnowledgePackage,
    PackageError,
    PackageLimits,
    decode_package,
    encode_package,
    metadata_bytes,
    validate_package_file,
)
from common.report.html import report_page, tasks_table
from common.zoo import SmallModel, parse_spec

HOSTILE = [
    "<script>alert(1)</script>",
    "\"double\" and 'single' quotes",
    "a & b &amp; c",
    "שלום עולם",  # Hebrew
    "مرحبا بالعالم",  # Arabic
    "🎉 party 😀",
    "汇率 (exchange rate)",
    "reverted_card_payment?",
]
DIM = 8


# -- the rule -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "label",
    [
        *HOSTILE,
        "what's my balance",
        "top up (card)",
        "#tag +1 / 50%",
        "../x",
        "a",
        "x" * 128,
        "😀" * 128,  # 128 characters, 512 bytes of UTF-8
        "丢" * 128,
        "café",
        "non\u00a0breaking space inside",
        "می\u200cخواهم",  # Persian: a zero-width non-joiner between two letters
        "👨\u200d👩\u200d👧",  # an emoji family: zero-width joiners between the emoji
    ],
)
def test_printable_unicode_labels_are_valid(label: str) -> None:
    assert label_problem(label) is None
    assert check_label(label) == label


@pytest.mark.parametrize(
    ("label", "says"),
    [
        ("", "is empty"),
        (" padded", "has leading or trailing whitespace"),
        ("padded\u3000", "has leading or trailing whitespace"),  # ideographic space
        ("x" * 129, "is 129 characters long, over the limit of 128"),
        ("😀" * 129, "is 129 characters long"),
        ("a\nb", "control character (Cc) U+000A"),
        ("a\tb", "control character (Cc) U+0009"),
        ("a\x00b", "control character (Cc) U+0000"),
        ("\x1b[31mred", "control character (Cc) U+001B"),
        ("abc\u202edef", "format character (Cf) U+202E RIGHT-TO-LEFT OVERRIDE at position 4"),
        ("\u200fabc", "format character (Cf) U+200F RIGHT-TO-LEFT MARK at position 1"),
        ("a\u2066b", "format character (Cf) U+2066 LEFT-TO-RIGHT ISOLATE"),
        ("zero\u200bwidth", "format character (Cf) U+200B ZERO WIDTH SPACE"),
        ("bom\ufeff", "format character (Cf) U+FEFF"),
        ("a\u2028b", "line separator (Zl) U+2028"),
        ("a\u2029b", "paragraph separator (Zp) U+2029"),
        ("a\ud800b", "surrogate (Cs) U+D800"),
        ("a\ue000b", "private-use character (Co) U+E000"),
        ("a\u0378b", "unassigned code point (Cn) U+0378"),
        ("joiner\u200d", "format character (Cf) U+200D ZERO WIDTH JOINER at position 7"),  # at the end
        ("a\u200d\u200db", "format character (Cf) U+200D"),  # two joiners: not between two characters
        ("cafe\u0301", "is not NFC-normalised (its NFC form is 'café')"),
        (7, "is of type int, not a string"),
    ],
)
def test_labels_that_break_the_rule_are_refused(label: object, says: str) -> None:
    problem = label_problem(label)
    assert problem is not None and says in problem, problem
    with pytest.raises(LabelError, match="label "):
        check_label(label)


def test_an_error_never_carries_the_raw_control_or_bidi_character() -> None:
    """A refused label is quoted with its invisible characters escaped: it cannot forge a log line."""
    for label in ("a\u202eb", "x\nFAKE 00:00 INFO forged", "\u2028y"):
        with pytest.raises(LabelError) as exc:
            check_label(label)
        message = str(exc.value)
        assert not any(ch in message for ch in "\u202e\n\u2028"), message
        assert "\\u202e" in message or "\\n" in message or "\\u2028" in message


def test_readers_normalise_to_nfc_and_strip() -> None:
    assert normalize_text("  cafe\u0301 \n") == "café"
    assert label_problem(normalize_text(" cafe\u0301")) is None


# -- packages -------------------------------------------------------------------------------------------
def package(labels: list[str]) -> KnowledgePackage:
    torch.manual_seed(0)
    model = SmallModel(parse_spec("linear"), DIM, len(labels))
    bank = StatsBank(DIM, rank=2)
    bank.add_features(torch.randn(4 * len(labels), DIM), [y for y in labels for _ in range(4)])
    return KnowledgePackage.from_model(model, labels, "f" * 64, "small", [4] * len(labels), bank)


def test_packages_round_trip_hostile_labels(tmp_path: Path) -> None:
    labels = [*HOSTILE, "😀" * 128, "丢" * 128]
    data = encode_package(package(labels))
    # the metadata holds the labels as UTF-8 (at most 4 bytes a character), not as ASCII escapes
    assert "😀".encode() in data and "\\ud83d" not in data.decode("utf-8", "replace")
    decoded = decode_package(data)
    assert decoded.labels == labels and decoded.stats is not None and decoded.stats.labels() == sorted(labels)
    path = tmp_path / "pkg.safetensors"
    path.write_bytes(data)
    assert validate_package_file(path).labels == labels  # the server's path: the file, read in place


def test_packages_written_with_ascii_escapes_decode_the_same() -> None:
    """Packages before 0.2 spelt non-ASCII labels as JSON escapes; they read back unchanged."""
    model = SmallModel(parse_spec("linear"), DIM, 2)
    labels = ["汇率", "🎉 party"]
    metadata = {
        "format": FORMAT,
        "kind": "small",
        "spec": model.spec.to_json(),
        "labels": json.dumps(labels),  # ensure_ascii: "\u6c47\u7387", "\ud83c\udf89 party"
        "fm_digest": "f" * 64,
        "feature_dim": str(DIM),
    }
    tensors = {f"model.{k}": v.contiguous() for k, v in model.state_dict().items()}
    assert decode_package(st_save(tensors, metadata=metadata)).labels == labels


def test_the_server_refuses_a_label_that_is_not_nfc_and_says_so() -> None:
    data = encode_package(package(["cafe\u0301", "tea"]))
    with pytest.raises(PackageError, match=r"is not NFC-normalised \(its NFC form is 'café'\)"):
        decode_package(data)


def test_the_metadata_bound_holds_the_largest_valid_label_set_in_either_spelling() -> None:
    """MAX_LABELS labels of LABEL_MAX_CHARS emoji, listed twice with counts, fit METADATA_MAX_BYTES,
    whether written as UTF-8 (this version) or with ASCII escapes (12 bytes an emoji)."""
    labels = [f"{i:05d}" + "😀" * (wire.LABEL_MAX_CHARS - 5) for i in range(wire.MAX_LABELS)]
    assert all(label_problem(y) is None for y in labels[:3])
    for ascii_only in (False, True):
        listed = json.dumps(labels, ensure_ascii=ascii_only)
        metadata = {
            "format": FORMAT,
            "kind": "small",
            "spec": json.dumps({"kind": "mlp", "hidden": [4096] * 8}),
            "labels": listed,
            "stats_labels": listed,
            "counts": json.dumps([10**9] * wire.MAX_LABELS),
            "fm_digest": "f" * 64,
            "feature_dim": "8192",
        }
        assert metadata_bytes(metadata) <= wire.METADATA_MAX_BYTES, (ascii_only, metadata_bytes(metadata))
    assert PackageLimits().max_metadata_bytes == wire.METADATA_MAX_BYTES


def test_metadata_over_the_bound_is_refused_before_it_is_parsed() -> None:
    data = encode_package(package(["a", "b"]))
    limit = metadata_bytes({"labels": '["a", "b"]'})  # far less than the package's whole metadata
    with pytest.raises(PackageError, match=r"package metadata is \d+ bytes, over the limit of"):
        decode_package(data, PackageLimits(max_metadata_bytes=limit))


@settings(max_examples=200, deadline=None)
@given(st.text(min_size=1, max_size=140))
def test_any_string_is_either_refused_or_round_trips_unchanged(label: str) -> None:
    """The package decoder and the rule agree on every string: valid ones come back exactly as sent."""
    labels = [label, "other"] if label != "other" else [label, "another"]
    model = SmallModel(parse_spec("linear"), DIM, 2)
    data = encode_package(KnowledgePackage.from_model(model, labels, "f" * 64))
    if label_problem(label) is None:
        assert decode_package(data).labels == labels
        assert "<" not in escape(label) and label == normalize_text(label)  # what readers keep, unchanged
    else:
        with pytest.raises(PackageError, match="label "):
            decode_package(data)


# -- logs and JSON --------------------------------------------------------------------------------------
def test_a_label_in_a_log_line_stays_one_line_and_round_trips_in_json() -> None:
    for fmt in ("text", "json"):
        stream = io.StringIO()
        handler = logging.StreamHandler(stream)
        handler.setFormatter(formatter("json" if fmt == "json" else "text"))
        log = logging.getLogger(f"test-labels-{fmt}")
        log.addHandler(handler)
        log.propagate = False
        try:
            for label in HOSTILE:
                log.warning("upload refused: label %s", label)
        finally:
            log.removeHandler(handler)
        lines = stream.getvalue().splitlines()
        assert len(lines) == len(HOSTILE), lines
        if fmt == "json":
            assert [json.loads(line)["msg"] for line in lines] == [
                f"upload refused: label {y}" for y in HOSTILE
            ]
    record = logging.LogRecord("x", logging.INFO, "", 0, "label %s", ("שלום 😀",), None)
    assert "שלום 😀" in JsonFormatter().format(record)  # UTF-8, not \\u escapes: readable in a log


def test_labels_round_trip_through_json_files() -> None:
    for ascii_only in (False, True):
        assert json.loads(json.dumps({"labels": HOSTILE}, ensure_ascii=ascii_only))["labels"] == HOSTILE


# -- HTML -----------------------------------------------------------------------------------------------
def test_the_report_shows_task_labels_escaped() -> None:
    doc = {
        "scenario": "unicode",
        "fm": "tiny",
        "seeds": [0],
        "results": [{"method": "ours", "seed": 0}],
        "tasks": {"task-00": HOSTILE[:4], "task-01": HOSTILE[4:]},
    }
    for html in (tasks_table(doc), report_page(doc, [], "report.json")):
        assert "<script>" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
        for label in HOSTILE:
            assert f'<bdi class="label">{escape(label)}</bdi>' in html, label
        assert "a & b" not in html and "a &amp; b &amp;amp; c" in html
        assert "&quot;double&quot; and &#x27;single&#x27; quotes" in html
