"""README's Hugging Face example with a real tokenizer's output.

A tokenizer called with ``padding=True, return_tensors="pt"`` returns a ``BatchEncoding``: a Mapping (a
``UserDict``), not a ``dict``. The tokenizer here is built locally (``tokenizers`` WordLevel trained on the
example's sentences, wrapped in ``PreTrainedTokenizerFast``; nothing downloaded) and the models are tiny
GPT-2 / BERT built from configs. ``compute_importance(model, [enc])`` and ``MAS.consolidate([enc])`` must
work on it, count the attention mask, and give the same Ω as the brute-force loop over the unpadded samples.
"""

from __future__ import annotations

from collections.abc import Mapping

import pytest
import torch

import mas_local as ml
from tests import oracles
from tests.closeness import assert_close_model_wide as assert_close

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

TEXTS = [
    "the first task's text",
    "a longer sample of the first task, padded on the right",
    "a short one",
]


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(TEXTS, trainers.WordLevelTrainer(special_tokens=["[PAD]", "[UNK]"]))
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]")


def _model(name, vocab, pad):
    if name == "gpt2":
        cfg = transformers.GPT2Config(
            n_layer=2,
            n_embd=16,
            n_head=2,
            n_positions=32,
            vocab_size=vocab,
            bos_token_id=1,
            eos_token_id=1,
            pad_token_id=pad,
        )
        cls = transformers.GPT2LMHeadModel
    else:
        cfg = transformers.BertConfig(
            hidden_size=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=24,
            max_position_embeddings=32,
            vocab_size=vocab,
            pad_token_id=pad,
        )
        cls = transformers.BertForMaskedLM
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    return cls(cfg).double().eval()


def _encode():
    tok = _tokenizer()
    enc = tok(TEXTS, padding=True, return_tensors="pt")
    return tok, enc


def test_the_tokenizer_returns_a_mapping_that_is_not_a_dict():
    _, enc = _encode()
    assert isinstance(enc, transformers.BatchEncoding)
    assert isinstance(enc, Mapping) and not isinstance(enc, dict)
    lengths = enc["attention_mask"].sum(1).tolist()
    assert len(set(lengths)) == len(TEXTS)  # right-padded, samples of different lengths


def _unpadded(enc):
    lengths = enc["attention_mask"].sum(1).tolist()
    return [
        {"input_ids": enc["input_ids"][k : k + 1, :n], "attention_mask": enc["attention_mask"][k : k + 1, :n]}
        for k, n in enumerate(lengths)
    ]


@pytest.mark.parametrize("name", ["gpt2", "bert"])
def test_compute_importance_on_a_batch_encoding(name):
    tok, enc = _encode()
    model = _model(name, len(tok), tok.pad_token_id)
    got = ml.compute_importance(model, [enc], mode="global", progress=False)
    assert set(got) == {n for n, p in model.named_parameters() if p.requires_grad}
    assert_close(got, oracles.global_sample(model, _unpadded(enc)))
    # the BatchEncoding gives what the same batch as a plain dict gives
    plain = ml.compute_importance(model, [dict(enc)], mode="global", progress=False)
    assert_close(got, {k: v.double() for k, v in plain.items()})


@pytest.mark.parametrize("name", ["gpt2", "bert"])
def test_local_importance_on_a_batch_encoding(name):
    tok, enc = _encode()
    model = _model(name, len(tok), tok.pad_token_id)
    padded = ml.compute_importance(model, [enc], mode="local", progress=False)
    one_by_one = ml.compute_importance(model, _unpadded(enc), mode="local", progress=False)  # batches of one
    assert_close(padded, {k: v.double() for k, v in one_by_one.items()})


def test_readme_example_consolidates_a_batch_encoding():
    tok, enc = _encode()
    model = _model("gpt2", len(tok), tok.pad_token_id).float()
    ml.convert(model)
    mas = ml.MAS(model, lam=100.0, progress=False)
    mas.consolidate([enc])
    assert all(torch.isfinite(v).all() for v in mas.importance.values())
    assert sum(v.sum().item() for v in mas.importance.values()) > 0
