"""The FM encoding options fcl-server and fcl-client share: one definition, so both CLIs agree."""

from __future__ import annotations

from typing import Any

from pydantic import Field

POOLING_HELP = (
    "pooling of the FM's token states: mean, cls, max, lasttoken, mean_sqrt_len_tokens or weightedmean "
    "(default: as the model's 1_Pooling/config.json says; mean for a plain transformers directory)"
)
MAX_LENGTH_HELP = (
    "tokens per text the FM sees, longer texts are truncated (default: max_seq_length of the model's "
    "sentence_bert_config.json; 128 for a plain transformers directory)"
)
PROMPT_HELP = (
    "text put before every text the FM encodes, e.g. 'query: ' ('' for none; default: the model's "
    "'query' prompt, else its default_prompt_name, from config_sentence_transformers.json)"
)
DTYPE_HELP = (
    "precision of the FM's forward pass: float32, bf16 or fp16 (half precision is meant for --device "
    "cuda; features stay within the tolerance in docs/foundation-models.md)"
)


def fm_pooling_field() -> Any:
    return Field(None, description=POOLING_HELP, examples=["cls"])


def fm_max_length_field() -> Any:
    return Field(None, ge=2, description=MAX_LENGTH_HELP, examples=[256])


def fm_prompt_field() -> Any:
    return Field(None, description=PROMPT_HELP, examples=["query: "])


def fm_dtype_field() -> Any:
    return Field("float32", description=DTYPE_HELP)
