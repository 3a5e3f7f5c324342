"""--fm-dtype: half-precision feature extraction stays within the stated tolerance of float32 (checked on
the CPU with the default FM on real sentences; docs/foundation-models.md states the same bounds)."""

from __future__ import annotations

import pytest
import torch

from common.datasets import builtin
from common.fm import FoundationModel

# measured on this data (640 + 64 texts): bf16 max |diff| 0.0033, min cosine 0.99990; fp16 0.0004, 0.999998
TOLERANCE = {"bf16": (0.01, 0.9995), "fp16": (0.002, 0.9999)}  # (max |feature diff|, min cosine)


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_half_precision_features_match_float32(fm: FoundationModel, dtype: str) -> None:
    public = builtin.load_public()
    # a subset of the texts the bounds were measured on: its largest difference cannot be larger
    texts = [ex.text for ex in builtin.load_test()][:128]
    texts += [" ".join(public[i : i + 12]) for i in range(0, 12 * 12, 12)]  # 120-180 tokens each
    half = FoundationModel(device="cpu", dtype=dtype)
    assert next(half.model.parameters()).dtype == {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    assert half.digest == fm.digest  # the same FM to every other node: dtype is not in the digest
    ours, exact = half.encode(texts), fm.encode(texts)
    assert ours.dtype == torch.float32 and ours.shape == exact.shape
    max_diff, min_cos = TOLERANCE[dtype]
    assert (ours - exact).abs().max().item() <= max_diff
    assert (ours * exact).sum(1).min().item() >= min_cos
    assert not torch.equal(ours, exact)  # it did run in half precision
