"""The Hugging Face sweep's machinery (``bench/hf_sweep.py``, ``tests/hf_families.py``) on a few diverse
families: a causal LM (GPT-2), a bidirectional encoder (BERT), a vision transformer (ViT) and an MoE
(Mixtral), each built tiny from its default config. No check may be wrong or crash with a raw exception;
a refusal is allowed only as an ``ImportanceError`` with a message. The whole sweep writes ``docs/models.md``.
"""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")

from tests import hf_families as hf  # noqa: E402

FAMILIES = ["gpt2", "bert", "vit", "mixtral"]


@pytest.fixture(scope="module")
def discovered():
    return hf.discover()


def test_discovery_picks_one_head_per_family(discovered):
    assert len(discovered) > 100
    assert discovered["gpt2"] == ("causal_lm", "GPT2LMHeadModel")
    assert discovered["vit"][0] == "image_cls"
    assert discovered["t5"][0] == "seq2seq_lm"
    for fam in FAMILIES:
        assert fam in discovered


def test_tiny_config_is_tiny():
    for fam in ("llama", "swin", "mixtral"):
        cfg = hf.tiny_config(fam)
        assert getattr(cfg, "hidden_size", 16) <= 64
    assert hf.tiny_config("mixtral").num_local_experts == 4
    assert hf.tiny_config("mixtral").num_experts_per_tok == 2


@pytest.mark.parametrize("family", FAMILIES)
def test_family_checks(family, discovered):
    res = hf.check_family(family, discovered[family][1])
    assert res["status"] == "built", res["status"]
    assert set(res["checks"]) == set(hf.ESTIMATORS)
    problems = []
    for est, check in res["checks"].items():
        if check["status"] == "refused":
            if not check.get("detail"):
                problems.append(f"{est}: refused without a message")
        elif check["status"] != "exact":
            problems.append(f"{est}: {check['status']} {check.get('detail', '')} {check.get('error', '')}")
    assert not problems, f"{family}: " + "; ".join(problems)
