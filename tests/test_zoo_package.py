"""Tests for the model zoo (specs, growing heads) and knowledge-package serde with its validation."""

from __future__ import annotations

import io
import json
import pickle
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import save as st_save

from common.algorithms.stats import StatsBank
from common.package import (
    FORMAT,
    KnowledgePackage,
    PackageError,
    PackageLimits,
    decode_package,
    encode_package,
    validate_package_file,
)
from common.zoo import (
    MAX_DEPTH,
    MAX_HIDDEN_WIDTH,
    ModelSpec,
    SmallModel,
    SpecError,
    build_model,
    expected_shapes,
    parse_spec,
)

DIM = 8
LABELS = ["card_arrival", "balance", "pin.reset"]


# -- helpers ------------------------------------------------------------------------------------
def make_model(
    spec: str = "mlp:12", dim: int = DIM, num_labels: int = len(LABELS), seed: int = 0
) -> SmallModel:
    torch.manual_seed(seed)
    return SmallModel(parse_spec(spec), dim, num_labels)


def make_bank(labels: list[str], dim: int = DIM, seed: int = 0) -> StatsBank:
    gen = torch.Generator().manual_seed(seed)
    feats = torch.randn(10 * len(labels), dim, generator=gen)
    bank = StatsBank(dim)
    bank.add_features(feats, [labels[i % len(labels)] for i in range(len(feats))])
    return bank


def base_tensors(model: SmallModel) -> dict[str, torch.Tensor]:
    return {f"model.{k}": v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def base_metadata(model: SmallModel, labels: list[str] = LABELS) -> dict[str, str]:
    return {
        "format": FORMAT,
        "kind": "small",
        "spec": model.spec.to_json(),
        "labels": json.dumps(labels),
        "counts": json.dumps([]),
        "stats_labels": json.dumps([]),
        "fm_digest": "sha256:abc",
        "feature_dim": str(model.in_dim),
    }


def craft(
    tensors: dict[str, torch.Tensor], metadata: dict[str, str], drop_meta: tuple[str, ...] = ()
) -> bytes:
    """A hand-made safetensors file (bypasses encode_package, so it can be malformed)."""
    meta = {k: v for k, v in metadata.items() if k not in drop_meta}
    return st_save(tensors, metadata=meta)


def valid_package_bytes(seed: int = 0) -> bytes:
    model = make_model(seed=seed)
    bank = make_bank(LABELS[:2])
    pkg = KnowledgePackage.from_model(model, LABELS, "sha256:abc", counts=[5, 6, 7], stats=bank)
    return encode_package(pkg)


# -- model specs --------------------------------------------------------------------------------
def test_parse_short_forms() -> None:
    lin = parse_spec("linear")
    assert lin.kind == "linear" and lin.hidden == ()

    one = parse_spec("mlp:64")
    assert (one.kind, one.hidden, one.activation, one.layer_norm) == ("mlp", (64,), "relu", False)

    deep = parse_spec("  mlp:64,32:gelu:ln ")
    assert (deep.kind, deep.hidden, deep.activation, deep.layer_norm) == ("mlp", (64, 32), "gelu", True)

    # an empty activation field falls back to the default activation
    assert parse_spec("mlp:16::ln") == ModelSpec(kind="mlp", hidden=(16,), activation="relu", layer_norm=True)


def test_parse_json_form() -> None:
    spec = parse_spec('{"kind": "mlp", "hidden": [16, 8], "activation": "silu", "dropout": 0.25}')
    assert spec == ModelSpec(kind="mlp", hidden=(16, 8), activation="silu", dropout=0.25)
    assert parse_spec('{"kind": "linear"}') == ModelSpec(kind="linear")


@pytest.mark.parametrize("text", ["linear", "mlp:64", "mlp:64,32:tanh", "mlp:7,5,3:silu:ln"])
def test_short_name_and_json_round_trip(text: str) -> None:
    spec = parse_spec(text)
    assert parse_spec(spec.short_name()) == spec
    assert parse_spec(spec.to_json()) == spec


@pytest.mark.parametrize(
    ("text", "fragments"),
    [
        ("mlp:64:swish", ["swish", "relu", "gelu"]),  # unknown activation: names the allowed ones
        ('{"kind": "linear", "hidden": [8]}', ["linear", "no hidden layers", "mlp"]),
        ("mlp:0", ["hidden width 0", f"1..{MAX_HIDDEN_WIDTH}"]),
        (f"mlp:{MAX_HIDDEN_WIDTH + 1}", [str(MAX_HIDDEN_WIDTH + 1), f"1..{MAX_HIDDEN_WIDTH}"]),
        ("mlp:100000000", ["100000000"]),
        ("mlp:-4", ["-4"]),
        ("mlp:abc", ["mlp:abc"]),
        ("mlp", ["'linear'", "mlp:WIDTH"]),
        ("linear:5", ["'linear'", "mlp:WIDTH"]),
        ("conv:3", ["'linear'", "mlp:WIDTH"]),
        ("", ["'linear'", "mlp:WIDTH"]),
        ('{"kind": "mlp"}', ["at least one hidden width"]),
        ('{"kind": "mlp", "hidden": [8], "bogus": 1}', ["bogus"]),
        ('{"kind": "mlp", "hidden": [8], "dropout": 1.0}', ["dropout"]),
        ('{"kind": "transformer", "hidden": [8]}', ["kind"]),
        ("{not json", ["{not json"]),
        ("mlp:" + ",".join(["4"] * (MAX_DEPTH + 1)), ["hidden"]),
    ],
)
def test_bad_specs_raise_helpful_spec_error(text: str, fragments: list[str]) -> None:
    with pytest.raises(SpecError) as info:
        parse_spec(text)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} missing from {message!r}"
    assert isinstance(info.value, ValueError)


def test_max_width_and_depth_are_accepted() -> None:
    spec = parse_spec(f"mlp:{MAX_HIDDEN_WIDTH}")
    assert spec.hidden == (MAX_HIDDEN_WIDTH,)
    deep = parse_spec("mlp:" + ",".join(["4"] * MAX_DEPTH))
    assert len(deep.hidden) == MAX_DEPTH


# -- models -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text", ["linear", "mlp:12", "mlp:12,6:gelu:ln", '{"kind":"mlp","hidden":[5],"dropout":0.1}']
)
def test_expected_shapes_match_real_model(text: str) -> None:
    spec = parse_spec(text)
    model = build_model(spec, DIM, 5)
    real = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert expected_shapes(spec, DIM, 5) == real
    assert real["out.weight"][0] == 5
    assert model(torch.zeros(3, DIM)).shape == (3, 5)


@pytest.mark.parametrize("text", ["linear", "mlp:12", "mlp:12,6:tanh:ln"])
def test_grow_keeps_old_rows_outputs(text: str) -> None:
    model = make_model(text, num_labels=3).eval()
    old_weight, old_bias = model.out.weight.detach().clone(), model.out.bias.detach().clone()
    x = torch.randn(20, DIM, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(x)
    model.grow(7)
    assert model.num_labels == 7
    with torch.no_grad():
        after = model(x)
    assert after.shape == (20, 7)
    # the old rows are copied bit for bit; outputs agree up to matmul accumulation order
    assert torch.equal(model.out.weight[:3], old_weight)
    assert torch.equal(model.out.bias[:3], old_bias)
    torch.testing.assert_close(after[:, :3], before, rtol=0, atol=1e-6)
    # growing to the same size is a no-op
    out = model.out
    model.grow(7)
    assert model.out is out


def test_grow_cannot_shrink_and_models_need_a_label() -> None:
    model = make_model(num_labels=3)
    with pytest.raises(SpecError, match="only grow"):
        model.grow(2)
    with pytest.raises(SpecError, match="at least one label"):
        SmallModel(parse_spec("linear"), DIM, 0)


# -- package round trip -------------------------------------------------------------------------
def test_package_round_trip() -> None:
    model = make_model("mlp:12,6:gelu:ln")
    bank = make_bank(LABELS[:2])
    pkg = KnowledgePackage.from_model(model, LABELS, "sha256:fm", counts=[10, 0, 3], stats=bank)
    out = decode_package(encode_package(pkg))

    assert out.spec == model.spec
    assert out.labels == LABELS
    assert out.counts == [10, 0, 3]
    assert out.feature_dim == DIM
    assert out.fm_digest == "sha256:fm"
    assert out.kind == "small"
    assert set(out.weights) == set(model.state_dict())
    for name, tensor in model.state_dict().items():
        assert torch.equal(out.weights[name], tensor), name

    assert out.stats is not None
    assert out.stats.labels() == bank.labels()
    assert out.stats.dim == DIM
    for label in bank.labels():
        assert out.stats.stats[label].count == bank.stats[label].count
        assert torch.equal(out.stats.stats[label].mean, bank.stats[label].mean)
        assert torch.equal(out.stats.stats[label].std, bank.stats[label].std)

    x = torch.randn(4, DIM, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(out.build()(x), model.eval()(x))


def test_head_package_without_stats_round_trip() -> None:
    model = make_model("linear")
    pkg = KnowledgePackage.from_model(model, LABELS, "d", kind="head")
    out = decode_package(encode_package(pkg))
    assert out.kind == "head"
    assert out.stats is None
    assert out.counts == []
    assert torch.equal(out.weights["out.weight"], model.out.weight)


def test_half_precision_weights_are_accepted_as_float32() -> None:
    model = make_model()
    tensors = {k: v.half() for k, v in base_tensors(model).items()}
    out = decode_package(craft(tensors, base_metadata(model)))
    assert all(t.dtype == torch.float32 for t in out.weights.values())
    assert torch.allclose(out.weights["out.weight"], model.out.weight, atol=1e-2)


# -- package rejection --------------------------------------------------------------------------
def test_rejects_torch_save_and_pickle() -> None:
    model = make_model()
    zipped = io.BytesIO()
    torch.save(model.state_dict(), zipped)
    legacy = io.BytesIO()
    torch.save(model.state_dict(), legacy, _use_new_zipfile_serialization=False)
    for payload in (zipped.getvalue(), legacy.getvalue(), pickle.dumps({"a": 1}, protocol=2)):
        with pytest.raises(PackageError, match="pickle"):
            decode_package(payload)


def test_rejects_truncated_bytes() -> None:
    data = valid_package_bytes()
    for cut in (0, 4, 8, 40, len(data) // 2, len(data) - 1):
        with pytest.raises(PackageError, match="not a valid safetensors"):
            decode_package(data[:cut])


@pytest.mark.parametrize("seed", range(5))
def test_rejects_random_bytes(seed: int) -> None:
    rng = random.Random(seed)
    data = rng.randbytes(rng.randrange(1, 4096))
    with pytest.raises(PackageError):
        decode_package(data)


def test_rejects_random_bytes_after_plausible_header_length() -> None:
    body = b"x" * 64
    with pytest.raises(PackageError, match="not a valid safetensors"):
        decode_package(len(body).to_bytes(8, "little") + body)


@pytest.mark.parametrize(("value", "drop"), [("fcl-knowledge/2", False), ("", False), (None, True)])
def test_rejects_wrong_or_missing_format_tag(value: str | None, drop: bool) -> None:
    model = make_model()
    meta = base_metadata(model)
    if value is not None:
        meta["format"] = value
    data = craft(base_tensors(model), meta, drop_meta=("format",) if drop else ())
    with pytest.raises(PackageError, match="format"):
        decode_package(data)


def test_rejects_unknown_kind() -> None:
    model = make_model()
    meta = dict(base_metadata(model), kind="code")
    with pytest.raises(PackageError, match="kind"):
        decode_package(craft(base_tensors(model), meta))


def test_rejects_invalid_spec_in_metadata() -> None:
    model = make_model()
    for spec in ('{"kind": "linear", "hidden": [12]}', "mlp:12", '{"kind": "rnn"}', ""):
        meta = dict(base_metadata(model), spec=spec)
        with pytest.raises(PackageError, match="spec"):
            decode_package(craft(base_tensors(model), meta))


def test_rejects_weights_whose_shapes_do_not_match_spec() -> None:
    model = make_model("mlp:12")
    # spec says a wider hidden layer than the weights have
    meta = dict(base_metadata(model), spec=parse_spec("mlp:16").to_json())
    with pytest.raises(PackageError, match="shape"):
        decode_package(craft(base_tensors(model), meta))
    # more labels than output rows
    meta = base_metadata(model, [*LABELS, "extra"])
    with pytest.raises(PackageError, match="shape"):
        decode_package(craft(base_tensors(model), meta))
    # feature dimension differs from the first layer
    meta = dict(base_metadata(model), feature_dim=str(DIM + 1))
    with pytest.raises(PackageError, match="shape"):
        decode_package(craft(base_tensors(model), meta))
    # a transposed weight of the right size
    tensors = base_tensors(model)
    tensors["model.body.0.weight"] = tensors["model.body.0.weight"].t().contiguous()
    with pytest.raises(PackageError, match=r"body\.0\.weight"):
        decode_package(craft(tensors, base_metadata(model)))


def test_rejects_weights_of_another_architecture() -> None:
    lin = make_model("linear")
    meta = dict(base_metadata(lin), spec=parse_spec("mlp:12").to_json())
    with pytest.raises(PackageError, match="missing"):
        decode_package(craft(base_tensors(lin), meta))


def test_rejects_missing_tensor() -> None:
    model = make_model()
    tensors = base_tensors(model)
    del tensors["model.out.bias"]
    with pytest.raises(PackageError, match=r"missing \['out\.bias'\]"):
        decode_package(craft(tensors, base_metadata(model)))


def test_rejects_extra_tensor() -> None:
    model = make_model()
    tensors = base_tensors(model)
    tensors["model.backdoor.weight"] = torch.zeros(2, 2)
    with pytest.raises(PackageError, match=r"unexpected \['backdoor\.weight'\]"):
        decode_package(craft(tensors, base_metadata(model)))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_rejects_non_finite_weights(bad: float) -> None:
    model = make_model()
    tensors = base_tensors(model)
    tensors["model.body.0.weight"][1, 2] = bad
    with pytest.raises(PackageError, match="NaN or Inf"):
        decode_package(craft(tensors, base_metadata(model)))


def test_rejects_integer_weights() -> None:
    model = make_model()
    tensors = base_tensors(model)
    tensors["model.out.bias"] = torch.zeros(len(LABELS), dtype=torch.int32)
    with pytest.raises(PackageError, match="dtype"):
        decode_package(craft(tensors, base_metadata(model)))


def test_rejects_duplicate_labels() -> None:
    model = make_model()
    meta = base_metadata(model, ["a", "b", "a"])
    with pytest.raises(PackageError, match="duplicate"):
        decode_package(craft(base_tensors(model), meta))


@pytest.mark.parametrize(
    ("label", "says"),
    [
        ("new\nline", "control character"),
        ("tab\there", "control character"),
        ("nul\x00", "control character"),
        ("", "is empty"),
        ("x" * 129, "over the limit of 128"),
        ("rtl\u202eoverride", "format character"),
        (5, "is of type int, not a string"),
        (None, "is of type NoneType, not a string"),
        (["a"], "is of type list, not a string"),
    ],
)
def test_rejects_invalid_labels(label: object, says: str) -> None:
    model = make_model()
    meta = dict(base_metadata(model), labels=json.dumps(["ok", "fine", label]))
    with pytest.raises(PackageError, match=says):
        decode_package(craft(base_tensors(model), meta))


def test_rejects_label_with_trailing_newline() -> None:
    model = make_model()
    meta = dict(base_metadata(model), labels=json.dumps(["ok", "fine", "trailing\n"]))
    with pytest.raises(PackageError, match="control character"):
        decode_package(craft(base_tensors(model), meta))


def test_accepts_allowed_label_characters() -> None:
    """Any printable Unicode (common/labels.py), markup and quotes too: what shows a label escapes it."""
    labels = ["x" * 128, "intent/sub-intent:v1.2", "café ü_ß", "a<b", "drop;table", "quote'", "why?"]
    model = make_model(num_labels=len(labels))
    out = decode_package(craft(base_tensors(model), base_metadata(model, labels)))
    assert out.labels == labels


@pytest.mark.parametrize("text", ["not json", "{}", '"abc"', "[]"])
def test_rejects_labels_that_are_not_a_non_empty_list(text: str) -> None:
    model = make_model()
    meta = dict(base_metadata(model), labels=text)
    with pytest.raises(PackageError, match="labels"):
        decode_package(craft(base_tensors(model), meta))


def test_label_limit() -> None:
    model = make_model()
    data = craft(base_tensors(model), base_metadata(model))
    with pytest.raises(PackageError, match="over the limit of 2"):
        decode_package(data, PackageLimits(max_labels=2))
    assert decode_package(data, PackageLimits(max_labels=len(LABELS))).labels == LABELS


def test_size_limit() -> None:
    data = valid_package_bytes()
    with pytest.raises(PackageError, match="over the limit"):
        decode_package(data, PackageLimits(max_bytes=len(data) - 1))
    assert decode_package(data, PackageLimits(max_bytes=len(data))).labels == LABELS


@pytest.mark.parametrize("value", ["0", "-1", "eight", "8.0", "100000"])
def test_rejects_bad_feature_dim(value: str) -> None:
    model = make_model()
    meta = dict(base_metadata(model), feature_dim=value)
    with pytest.raises(PackageError, match="feature_dim"):
        decode_package(craft(base_tensors(model), meta), PackageLimits(max_feature_dim=4096))


@pytest.mark.parametrize("counts", ["[1, 2]", "[1, -2, 3]", "[1, 2.5, 3]", '{"a": 1}', "nope"])
def test_rejects_bad_counts(counts: str) -> None:
    model = make_model()
    meta = dict(base_metadata(model), counts=counts)
    with pytest.raises(PackageError, match="counts"):
        decode_package(craft(base_tensors(model), meta))


def stats_tensors(n: int, dim: int = DIM) -> dict[str, torch.Tensor]:
    return {
        "stats.count": torch.full((n,), 4.0),
        "stats.mean": torch.zeros(n, dim),
        "stats.std": torch.ones(n, dim),
    }


def test_hand_crafted_stats_are_accepted(tmp_path: Path) -> None:
    model = make_model()
    meta = dict(base_metadata(model), stats_labels=json.dumps(LABELS[:2]))
    out = decode_package(craft({**base_tensors(model), **stats_tensors(2)}, meta))
    assert out.stats is not None
    assert out.stats.labels() == sorted(LABELS[:2])
    assert out.stats.stats[LABELS[0]].count == 4
    path = tmp_path / "pkg.safetensors"
    path.write_bytes(craft({**base_tensors(model), **stats_tensors(2)}, meta))
    checked = validate_package_file(path)  # checks the statistics without building a bank of them
    assert (checked.labels, checked.weights, checked.stats) == (LABELS, {}, None)


@pytest.mark.parametrize(
    ("replace", "stats_labels"),
    [
        ({"stats.mean": torch.zeros(2, DIM + 1)}, LABELS[:2]),  # wrong feature dimension
        ({"stats.std": torch.ones(2, DIM - 1)}, LABELS[:2]),
        ({"stats.count": torch.ones(3)}, LABELS[:2]),  # one count too many
        ({"stats.mean": torch.zeros(DIM)}, LABELS[:2]),  # not a matrix
        ({}, LABELS),  # three labels named, two rows given
    ],
)
def test_rejects_stats_with_wrong_shape(replace: dict[str, torch.Tensor], stats_labels: list[str]) -> None:
    model = make_model()
    tensors = {**base_tensors(model), **stats_tensors(2), **replace}
    meta = dict(base_metadata(model), stats_labels=json.dumps(stats_labels))
    with pytest.raises(PackageError, match="statistics shapes"):
        decode_package(craft(tensors, meta))


@pytest.mark.parametrize(
    ("replace", "stats_labels", "fragment"),
    [
        ({}, ["card_arrival", "unknown"], "does not have"),
        ({"stats.count": torch.tensor([4.0, 0.0])}, LABELS[:2], "non-positive"),
        ({"stats.count": torch.tensor([4.0, -1.0])}, LABELS[:2], "non-positive"),
        ({"stats.std": torch.full((2, DIM), float("nan"))}, LABELS[:2], "NaN"),
        ({"stats.mean": torch.full((2, DIM), float("inf"))}, LABELS[:2], "NaN"),
        ({"stats.mean": torch.full((2, DIM), float("nan"), dtype=torch.bfloat16)}, LABELS[:2], "NaN"),
        ({"stats.std": torch.full((2, DIM), float("inf"), dtype=torch.float16)}, LABELS[:2], "NaN"),
    ],
)
def test_rejects_bad_stats_values(
    replace: dict[str, torch.Tensor], stats_labels: list[str], fragment: str, tmp_path: Path
) -> None:
    model = make_model()
    tensors = {**base_tensors(model), **stats_tensors(2), **replace}
    meta = dict(base_metadata(model), stats_labels=json.dumps(stats_labels))
    with pytest.raises(PackageError, match=fragment) as from_bytes:
        decode_package(craft(tensors, meta))
    path = tmp_path / "pkg.safetensors"
    path.write_bytes(craft(tensors, meta))
    with pytest.raises(PackageError) as from_file:  # the server's check reads the statistics itself
        validate_package_file(path)
    assert str(from_file.value) == str(from_bytes.value)


def test_rejects_incomplete_stats() -> None:
    model = make_model()
    tensors = {**base_tensors(model), **stats_tensors(2)}
    del tensors["stats.std"]
    meta = dict(base_metadata(model), stats_labels=json.dumps(LABELS[:2]))
    with pytest.raises(PackageError, match=r"stats\.std"):
        decode_package(craft(tensors, meta))


@pytest.mark.parametrize("stats_labels", ["not json", "[[1], [2]]"])
def test_rejects_malformed_stats_labels(stats_labels: str) -> None:
    model = make_model()
    meta = dict(base_metadata(model), stats_labels=stats_labels)
    with pytest.raises(PackageError):
        decode_package(craft({**base_tensors(model), **stats_tensors(2)}, meta))


def test_header_length_starting_with_pickle_or_zip_magic_is_still_accepted() -> None:
    """Regression: a valid file whose 8-byte header length begins 0x80 or 'PK' is not a pickle/zip."""
    model = make_model()
    base = encode_package(KnowledgePackage.from_model(model, ["a", "b", "c"], "d" * 64))
    for magic in (0x80, 0x4B50):
        header_len = int.from_bytes(base[:8], "little")
        # pad the JSON header with spaces (allowed) until its length has the wanted low byte(s)
        mask = 0xFF if magic < 0x100 else 0xFFFF
        pad = (magic - header_len) % (mask + 1)
        header = base[8 : 8 + header_len] + b" " * pad
        data = (len(header)).to_bytes(8, "little") + header + base[8 + header_len :]
        assert data[:1] == b"\x80" or data[:2] == b"PK"
        assert decode_package(data).labels == ["a", "b", "c"]


@pytest.mark.parametrize("row", [0, 40, 95])
def test_the_file_validator_reads_a_big_tensor_in_blocks_and_misses_no_nan(
    row: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import common.package as package

    monkeypatch.setattr(package, "FINITE_BLOCK", 7 * DIM * 4)  # 7 rows a block: body.0.weight is 14 blocks
    model = make_model("mlp:96")
    tensors = base_tensors(model)
    path = tmp_path / "pkg.safetensors"
    path.write_bytes(craft(tensors, base_metadata(model)))
    assert validate_package_file(path).labels == LABELS
    tensors["model.body.0.weight"][row, 5] = float("nan")
    path.write_bytes(craft(tensors, base_metadata(model)))
    with pytest.raises(PackageError, match=r"weight body\.0\.weight contains NaN or Inf"):
        validate_package_file(path)
    with pytest.raises(PackageError, match=r"weight body\.0\.weight contains NaN or Inf"):
        decode_package(path.read_bytes())


def test_the_file_validator_names_a_wrong_dtype_like_the_bytes_decoder(tmp_path: Path) -> None:
    model = make_model()
    tensors = {k: v.double() for k, v in base_tensors(model).items()}
    path = tmp_path / "pkg.safetensors"
    path.write_bytes(craft(tensors, base_metadata(model)))
    with pytest.raises(PackageError) as from_file:
        validate_package_file(path)
    with pytest.raises(PackageError) as from_bytes:
        decode_package(path.read_bytes())
    assert str(from_file.value) == str(from_bytes.value) and "torch.float64" in str(from_file.value)
