"""The FM honours what a model directory says: tiny random-weight BERT, RoBERTa, DistilBERT and XLM-R
encoders pool as configured (checked by hand from their hidden states), deterministically; a
sentence-transformers layout is read as sentence-transformers itself reads it; the digest covers the
encoding; the archive carries it."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import tarfile
from pathlib import Path
from typing import Any

import pytest
import torch

from common.fm import (
    DIGEST_VERSION,
    FoundationModel,
    FoundationModelError,
    extract_fm_archive,
    files_digest,
    write_fm_archive,
)
from common.fm_encoding import ENCODING_FILE, POOLING_MODES, EncodingOverrides, FMEncoding
from tests.tiny_fm import (
    ARCHS,
    ENGLISH,
    HIDDEN,
    MULTILINGUAL,
    POSITIONS,
    build_tiny_encoder,
    hidden_states,
    write_st_files,
)

TEXTS = [
    "Book a table for two",
    "what is the weather like tomorrow in the city",
    "jazz",
    "Turn OFF the lights",
]


@pytest.fixture(scope="module", params=ARCHS)
def tiny(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    arch = str(request.param)
    corpus = MULTILINGUAL if arch == "xlm-roberta" else ENGLISH
    return arch, build_tiny_encoder(tmp_path_factory.mktemp(arch) / "fm", arch, corpus)


@pytest.fixture(scope="module")
def tiny_roberta(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_encoder(tmp_path_factory.mktemp("roberta") / "fm", "roberta", ENGLISH)


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_encoder(tmp_path_factory.mktemp("bert") / "fm", "bert", ENGLISH)


def texts_for(arch: str) -> list[str]:
    return MULTILINGUAL[:3] + TEXTS[:1] if arch == "xlm-roberta" else TEXTS


def by_hand(hidden: torch.Tensor, mask: torch.Tensor, mode: str, skip: int = 0) -> torch.Tensor:
    """Pooling written out row by row from its definition (right padding: real tokens come first)."""
    rows = []
    for h, m in zip(hidden, mask, strict=True):
        n = int(m.sum())
        real = h[skip:n]
        if mode == "mean":
            rows.append(real.mean(0))
        elif mode == "cls":
            rows.append(real[0])
        elif mode == "max":
            rows.append(real.max(0).values)
        elif mode == "lasttoken":
            rows.append(real[-1])
        elif mode == "mean_sqrt_len_tokens":
            rows.append(real.sum(0) / len(real) ** 0.5)
        elif mode == "weightedmean":
            w = torch.arange(1 + skip, n + 1, dtype=h.dtype).unsqueeze(1)
            rows.append((real * w).sum(0) / w.sum())
    return torch.stack(rows)


def unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


# -- plain transformers directories of four architectures ---------------------------------------------
def test_plain_directory_is_mean_pooled_and_normalised(tiny: tuple[str, Path]) -> None:
    arch, path = tiny
    fm = FoundationModel(str(path))
    assert fm.layout.kind == "transformers"
    # mean, L2, 128 tokens capped at what the model has positions for (64 here)
    assert fm.encoding == FMEncoding(("mean",), True, True, min(128, POSITIONS), "")
    texts = texts_for(arch)
    feats = fm.encode(texts)
    assert feats.shape == (len(texts), HIDDEN) and fm.feature_dim == HIDDEN
    hidden, mask = hidden_states(path, texts, fm.encoding.max_length)
    torch.testing.assert_close(feats, unit(by_hand(hidden, mask, "mean")), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("mode", POOLING_MODES)
def test_each_pooling_gives_what_its_definition_does(tiny: tuple[str, Path], mode: str) -> None:
    arch, path = tiny
    fm = FoundationModel(str(path), overrides=EncodingOverrides.of(pooling=mode, max_length=16))
    texts = texts_for(arch)
    hidden, mask = hidden_states(path, texts, 16)
    torch.testing.assert_close(fm.encode(texts), unit(by_hand(hidden, mask, mode)), atol=1e-5, rtol=1e-4)


def test_features_are_deterministic(tiny: tuple[str, Path]) -> None:
    arch, path = tiny
    texts = texts_for(arch) * 3
    first = FoundationModel(str(path)).encode(texts)
    again = FoundationModel(str(path))  # a fresh load: nothing random left in the model
    assert torch.equal(again.encode(texts), first)
    # batching changes only the padding, which the mask removes
    torch.testing.assert_close(again.encode(texts, batch_size=1), first, atol=1e-5, rtol=1e-4)


def test_distinct_pooling_distinct_features_and_digest(tiny_bert: Path) -> None:
    mean = FoundationModel(str(tiny_bert))
    cls = mean.reconfigured(EncodingOverrides.of(pooling="cls"))
    assert mean.files_digest == cls.files_digest and mean.digest != cls.digest
    assert not torch.allclose(mean.encode(TEXTS), cls.encode(TEXTS), atol=1e-3)


# -- sentence-transformers layouts -------------------------------------------------------------------
def st_copy(model: Path, tmp_path: Path, **files: Any) -> Path:
    path = tmp_path / "st"
    shutil.copytree(model, path)
    return write_st_files(path, **files)


def sentence_transformers_model(path: Path) -> Any:
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(path), device="cpu", local_files_only=True)


def test_st_layout_is_honoured_as_its_files_say(tiny_bert: Path, tmp_path: Path) -> None:
    path = st_copy(
        tiny_bert,
        tmp_path,
        pooling={"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False},
        normalize=True,
        max_seq_length=12,
        prompts={"query": "query: ", "passage": "passage: "},
    )
    fm = FoundationModel(str(path))
    assert fm.layout.kind == "sentence-transformers"
    assert fm.encoding == FMEncoding(("cls",), True, True, 12, "query: ")
    hidden, mask = hidden_states(path, ["query: " + t for t in TEXTS], 12)
    expected = unit(by_hand(hidden, mask, "cls"))
    torch.testing.assert_close(fm.encode(TEXTS), expected, atol=1e-5, rtol=1e-4)
    st = sentence_transformers_model(path)
    theirs = st.encode_query(TEXTS, convert_to_tensor=True)
    torch.testing.assert_close(fm.encode(TEXTS), theirs.float(), atol=1e-5, rtol=1e-4)


def test_st_layout_without_normalize_and_default_prompt(tiny_bert: Path, tmp_path: Path) -> None:
    path = st_copy(
        tiny_bert,
        tmp_path,
        pooling={"pooling_mode": "max"},
        normalize=False,
        prompts={"classification": "classify: "},
        default_prompt_name="classification",
    )
    fm = FoundationModel(str(path))
    assert fm.encoding == FMEncoding(("max",), True, False, POSITIONS, "classify: ")
    feats = fm.encode(TEXTS)
    assert not torch.allclose(feats.norm(dim=-1), torch.ones(len(TEXTS)), atol=1e-3)  # not normalised
    st = sentence_transformers_model(path)
    torch.testing.assert_close(feats, st.encode(TEXTS, convert_to_tensor=True).float(), atol=1e-5, rtol=1e-4)


def test_st_layout_excluding_the_prompt(tiny_bert: Path, tmp_path: Path) -> None:
    path = st_copy(
        tiny_bert,
        tmp_path,
        pooling={"pooling_mode_mean_tokens": True, "include_prompt": False},
        prompts={"query": "query: "},
    )
    fm = FoundationModel(str(path))
    assert fm.encoding.include_prompt is False and fm.encoding.prompt == "query: "
    st = sentence_transformers_model(path)
    torch.testing.assert_close(
        fm.encode(TEXTS), st.encode_query(TEXTS, convert_to_tensor=True).float(), atol=1e-5, rtol=1e-4
    )
    # by hand: [CLS] and the prompt's tokens are left out of the mean, the final [SEP] is kept
    prompt_tokens = len(fm.tokenizer("query: ")["input_ids"]) - 1
    hidden, mask = hidden_states(path, ["query: " + t for t in TEXTS], fm.encoding.max_length)
    expected = unit(by_hand(hidden, mask, "mean", skip=prompt_tokens))
    torch.testing.assert_close(fm.encode(TEXTS), expected, atol=1e-5, rtol=1e-4)


def test_st_layout_lowercasing(tiny_roberta: Path, tmp_path: Path) -> None:
    """do_lower_case on a case-sensitive (byte-level BPE) tokenizer."""
    path = st_copy(tiny_roberta, tmp_path, pooling={"pooling_mode": "mean"}, do_lower_case=True)
    fm = FoundationModel(str(path))
    torch.testing.assert_close(fm.encode(TEXTS), fm.encode([t.lower() for t in TEXTS]))
    cased = FoundationModel(str(tiny_roberta))
    assert not torch.allclose(cased.encode(TEXTS[-1:]), cased.encode([TEXTS[-1].lower()]), atol=1e-4)
    st = sentence_transformers_model(path)
    torch.testing.assert_close(
        fm.encode(TEXTS), st.encode(TEXTS, convert_to_tensor=True).float(), atol=1e-5, rtol=1e-4
    )


def test_st_layout_with_the_transformer_in_a_subfolder(tiny_bert: Path, tmp_path: Path) -> None:
    """Old sentence-transformers models keep the transformer in 0_Transformer/."""
    path = tmp_path / "old"
    shutil.copytree(tiny_bert, path / "0_Transformer")
    write_st_files(path / "0_Transformer", pooling={"pooling_mode_max_tokens": True}, max_seq_length=20)
    for name in ("modules.json", "1_Pooling", "config_sentence_transformers.json"):
        shutil.move(path / "0_Transformer" / name, path / name)
    modules = json.loads((path / "modules.json").read_text())
    modules[0]["path"] = "0_Transformer"
    (path / "modules.json").write_text(json.dumps(modules))
    fm = FoundationModel(str(path))
    assert fm.encoding == FMEncoding(("max",), True, True, 20, "")
    theirs = sentence_transformers_model(path).encode(TEXTS, convert_to_tensor=True).float()
    torch.testing.assert_close(fm.encode(TEXTS), theirs, atol=1e-5, rtol=1e-4)


def test_a_model_saved_by_sentence_transformers_with_dense(tiny_bert: Path, tmp_path: Path) -> None:
    """What sentence-transformers writes today (its module paths, `pooling_mode`, a Dense module)."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.base.modules import Dense, Normalize, Transformer
    from sentence_transformers.sentence_transformer.modules import Pooling

    torch.manual_seed(1)
    modules = [Transformer(str(tiny_bert)), Pooling(HIDDEN, "weightedmean"), Dense(HIDDEN, 16), Normalize()]
    SentenceTransformer(modules=modules, device="cpu").save(str(tmp_path / "saved"))
    fm = FoundationModel(str(tmp_path / "saved"))
    assert fm.feature_dim == 16 and fm.encoding.pooling == ("weightedmean",) and len(fm.dense) == 1
    theirs = sentence_transformers_model(tmp_path / "saved").encode(TEXTS, convert_to_tensor=True)
    torch.testing.assert_close(fm.encode(TEXTS), theirs.float(), atol=1e-5, rtol=1e-4)


def test_the_default_fm_encodes_as_its_files_say(fm: FoundationModel) -> None:
    """all-MiniLM-L6-v2: mean pooling, Normalize, max_seq_length 256: what sentence-transformers computes."""
    assert fm.layout.kind == "sentence-transformers"
    assert fm.encoding == FMEncoding(("mean",), True, True, 256, "")
    long_text = " ".join(ENGLISH * 3)  # about 180 tokens: beyond the 128 this project used before
    texts = [*TEXTS, long_text]
    ours = fm.encode(texts)
    theirs = sentence_transformers_model(fm.path).encode(texts, convert_to_tensor=True).float()
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)
    assert len(fm.tokenizer(long_text)["input_ids"]) > 128
    at_128 = fm.reconfigured(EncodingOverrides.of(max_length=128)).encode([long_text])
    assert not torch.allclose(at_128, ours[-1:], atol=1e-4)


# -- the digest and the archive ----------------------------------------------------------------------
def test_digest_is_the_files_and_the_canonical_encoding(tiny_bert: Path) -> None:
    fm = FoundationModel(str(tiny_bert))
    canonical = '{"include_prompt":true,"max_length":64,"normalize":true,"pooling":"mean","prompt":""}'
    assert fm.encoding.canonical_json() == canonical
    text = f"{DIGEST_VERSION}\n{files_digest(tiny_bert)}\n{canonical}\n"
    assert fm.digest == hashlib.sha256(text.encode()).hexdigest()
    for overrides in (
        EncodingOverrides.of(pooling="cls"),
        EncodingOverrides.of(max_length=32),
        EncodingOverrides.of(prompt="query: "),
    ):
        assert fm.reconfigured(overrides).digest != fm.digest, overrides
    bf16 = FoundationModel(str(tiny_bert), dtype="bf16")
    assert bf16.digest == fm.digest and bf16.cache_key != fm.cache_key  # dtype: same FM, other cache


def test_archive_carries_the_servers_encoding(tiny_bert: Path, tmp_path: Path) -> None:
    served = FoundationModel(str(tiny_bert), overrides=EncodingOverrides.of(pooling="cls", max_length=24))
    archive, again = tmp_path / "fm.tar", tmp_path / "again.tar"
    write_fm_archive(served.path, archive, served.encoding)
    write_fm_archive(served.path, again, served.encoding)
    assert archive.read_bytes() == again.read_bytes()  # deterministic: a cache key and a resume point
    with tarfile.open(archive) as tar:
        member = tar.extractfile(ENCODING_FILE)
        assert member is not None and json.load(io.TextIOWrapper(member)) == served.encoding.as_dict()
    extract_fm_archive(archive, tmp_path / "client")
    unpacked = FoundationModel(str(tmp_path / "client"))  # no options: the archive says cls at 24
    assert unpacked.encoding == served.encoding and unpacked.digest == served.digest
    assert unpacked.files_digest == served.files_digest
    torch.testing.assert_close(unpacked.encode(TEXTS), served.encode(TEXTS))


# -- refusals ----------------------------------------------------------------------------------------
def test_max_length_beyond_the_models_positions_is_refused(tiny_bert: Path) -> None:
    with pytest.raises(FoundationModelError, match=r"--fm-max-length 100 .*positions for \(64\)"):
        FoundationModel(str(tiny_bert), overrides=EncodingOverrides.of(max_length=100))


def test_custom_module_code_is_refused(tiny_bert: Path, tmp_path: Path) -> None:
    path = st_copy(tiny_bert, tmp_path, pooling={"pooling_mode": "mean"})
    modules = json.loads((path / "modules.json").read_text())
    modules.append({"idx": 3, "name": "3", "path": "3_Custom", "type": "my_package.EvilModule"})
    (path / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(FoundationModelError, match=r"module type 'my_package\.EvilModule' is not supported"):
        FoundationModel(str(path))


def test_bad_encoding_file_is_refused(tiny_bert: Path, tmp_path: Path) -> None:
    path = tmp_path / "fm"
    shutil.copytree(tiny_bert, path)
    (path / ENCODING_FILE).write_text('{"pooling": "median"}')
    with pytest.raises(FoundationModelError, match="pooling 'median' is not one of mean, cls"):
        FoundationModel(str(path))
