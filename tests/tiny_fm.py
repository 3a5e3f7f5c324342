"""Test helpers: tiny random-weight encoders (BERT, RoBERTa, DistilBERT, XLM-R) built offline from configs,
with tokenizers trained on a few sentences, and sentence-transformers layouts around them."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

ARCHS = ("bert", "roberta", "distilbert", "xlm-roberta")
HIDDEN = 32
POSITIONS = 64  # tokens a text may have (RoBERTa-style models get 2 more position rows for their offset)

ENGLISH = [
    "book a table for two tonight",
    "what is the weather like tomorrow",
    "play some jazz music please",
    "set an alarm for seven in the morning",
    "how much money is in my account",
    "transfer fifty dollars to my savings",
    "turn off the lights in the kitchen",
    "remind me to call my mother",
    "what time does the pharmacy close",
    "order a large pizza with mushrooms",
    "translate hello into french",
    "is it going to rain this weekend",
]
MULTILINGUAL = [
    "明天的天气怎么样",
    "请帮我订一张去北京的火车票",
    "我的银行账户里有多少钱",
    "播放一些轻松的音乐",
    "東京の天気を教えてください",
    "明日の朝七時に起こして",
    "كيف سيكون الطقس غدا",
    "أريد حجز طاولة لشخصين الليلة",
    "كم رصيدي في الحساب البنكي",
    "شغل بعض الموسيقى الهادئة",
    "what is the weather like tomorrow",
    "book a table for two tonight",
]


def build_tiny_encoder(out: Path, arch: str, corpus: Sequence[str], seed: int = 0) -> Path:
    """A random-weight `arch` encoder (hidden 32, 2 layers), a tokenizer trained on `corpus`, in `out`."""
    from transformers import AutoModel

    tokenizer = _tokenizer(arch, list(corpus))
    config = _config(arch, len(tokenizer))
    torch.manual_seed(seed)
    model = AutoModel.from_config(config)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def write_st_files(
    model_dir: Path,
    pooling: dict[str, Any],
    normalize: bool = True,
    max_seq_length: int | None = None,
    prompts: dict[str, str] | None = None,
    default_prompt_name: str | None = None,
    do_lower_case: bool = False,
) -> Path:
    """Turn a transformers directory into a sentence-transformers one, by the documented file format:
    modules.json (Transformer, Pooling, Normalize), 1_Pooling/config.json, sentence_bert_config.json and
    config_sentence_transformers.json."""
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    if normalize:
        modules.append(
            {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}
        )
    (model_dir / "modules.json").write_text(json.dumps(modules, indent=2))
    (model_dir / "1_Pooling").mkdir(exist_ok=True)
    (model_dir / "1_Pooling" / "config.json").write_text(
        json.dumps({"word_embedding_dimension": HIDDEN, **pooling}, indent=2)
    )
    bert: dict[str, Any] = {"do_lower_case": do_lower_case}
    if max_seq_length is not None:
        bert["max_seq_length"] = max_seq_length
    (model_dir / "sentence_bert_config.json").write_text(json.dumps(bert))
    config: dict[str, Any] = {"__version__": {"sentence_transformers": "2.0.0"}}
    if prompts is not None:
        config["prompts"] = prompts
    config["default_prompt_name"] = default_prompt_name
    (model_dir / "config_sentence_transformers.json").write_text(json.dumps(config, indent=2))
    return model_dir


def hidden_states(
    model_dir: Path, texts: Sequence[str], max_length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The encoder's last hidden states and attention mask for `texts` as one padded batch (by hand)."""
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    model = AutoModel.from_pretrained(str(model_dir), local_files_only=True).eval()
    batch = tokenizer(list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        return model(**inputs).last_hidden_state, batch["attention_mask"]


def _tokenizer(arch: str, corpus: list[str]) -> Any:
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if arch in ("bert", "distilbert"):
        specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tok.normalizer = normalizers.BertNormalizer(lowercase=True)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.train_from_iterator(corpus, trainers.WordPieceTrainer(vocab_size=400, special_tokens=specials))
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]",
            pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", 2), ("[SEP]", 3)],
        )
        tok.decoder = decoders.WordPiece()
        names = {"pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]", "sep_token": "[SEP]"}
        return PreTrainedTokenizerFast(
            tokenizer_object=tok, model_max_length=POSITIONS, mask_token="[MASK]", **names
        )
    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]  # ids 0-4, RoBERTa's order
    if arch == "roberta":
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        trainer: Any = trainers.BpeTrainer(
            vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        )
        tok.train_from_iterator(corpus, trainer)
        tok.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
        tok.decoder = decoders.ByteLevel()
    elif arch == "xlm-roberta":  # a sentencepiece-style unigram model, as XLM-R's
        tok = Tokenizer(models.Unigram())
        tok.normalizer = normalizers.NFKC()
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        trainer = trainers.UnigramTrainer(vocab_size=400, special_tokens=specials, unk_token="<unk>")
        tok.train_from_iterator(corpus, trainer)
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>", special_tokens=[("<s>", 0), ("</s>", 2)]
        )
        tok.decoder = decoders.Metaspace()
    else:
        raise ValueError(f"unknown arch {arch!r}; one of {ARCHS}")
    names = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        model_max_length=POSITIONS,
        mask_token="<mask>",
        cls_token="<s>",
        sep_token="</s>",
        model_input_names=["input_ids", "attention_mask"],
        **names,
    )


def _config(arch: str, vocab: int) -> Any:
    from transformers import BertConfig, DistilBertConfig, RobertaConfig, XLMRobertaConfig

    common = {
        "vocab_size": vocab,
        "hidden_size": HIDDEN,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 64,
    }
    if arch == "bert":
        return BertConfig(**common, max_position_embeddings=POSITIONS, pad_token_id=0)
    if arch == "distilbert":
        return DistilBertConfig(
            vocab_size=vocab,
            dim=HIDDEN,
            n_layers=2,
            n_heads=2,
            hidden_dim=64,
            max_position_embeddings=POSITIONS,
            pad_token_id=0,
        )
    cls = RobertaConfig if arch == "roberta" else XLMRobertaConfig
    return cls(
        **common,
        max_position_embeddings=POSITIONS + 2,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
        type_vocab_size=1,
    )
