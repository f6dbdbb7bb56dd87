"""LoRA through ``peft`` (the way most large models are fine-tuned): MAS over the adapter parameters, the base
frozen. A tiny Llama with ``LoraConfig(target_modules=["q_proj", "v_proj", "up_proj"])``: global ``sample``
equals the brute-force loop over the unpadded samples, local MAS is padding-invariant, Ω covers exactly the
adapters, and the docs' example runs as written."""

from __future__ import annotations

import pytest
import torch

import mas_local as ml
from tests.closeness import assert_close_model_wide as assert_close
from tests.models import tiny_llama
from tests.oracles import global_sample

peft = pytest.importorskip("peft")


def lora_llama(seed=0):
    model = tiny_llama(seed=seed).double().eval()
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], lora_dropout=0.0)
    model = peft.get_peft_model(model, config)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # LoRA's B starts at zero: give the adapters values, as after some training
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


def padded_batches(seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for lengths in ([7, 4, 6], [5, 2]):
        t = max(lengths)
        ids = torch.randint(1, 97, (len(lengths), t), generator=g)
        mask = torch.zeros(len(lengths), t, dtype=torch.long)
        for k, n in enumerate(lengths):
            mask[k, :n] = 1
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def unpadded(batches):
    singles = []
    for b in batches:
        for k, n in enumerate(b["attention_mask"].sum(1).tolist()):
            singles.append(
                {"input_ids": b["input_ids"][k : k + 1, :n], "attention_mask": b["attention_mask"][k : k + 1, :n]}
            )
    return singles


def test_omega_covers_exactly_the_adapters():
    model = lora_llama()
    got = ml.compute_importance(model, padded_batches(), progress=False)
    adapters = {n for n, p in model.named_parameters() if p.requires_grad}
    assert adapters and all("lora_" in n for n in adapters)
    assert set(got) == adapters


def test_global_sample_equals_the_loop_over_unpadded_samples():
    model = lora_llama()
    batches = padded_batches()
    got = ml.compute_importance(model, batches, mode="global", estimator="sample", progress=False)
    assert_close(got, global_sample(model, unpadded(batches)))


@pytest.mark.parametrize("estimator", ["hebbian", "sample"])
def test_local_mas_is_padding_invariant(estimator):
    model = lora_llama()
    batches = padded_batches()
    padded = ml.compute_importance(model, batches, mode="local", estimator=estimator, progress=False)
    alone = ml.compute_importance(model, unpadded(batches), mode="local", estimator=estimator, progress=False)
    assert_close(padded, {k: v.double() for k, v in alone.items()})


def test_the_penalty_moves_only_the_adapters():
    model = lora_llama()
    mas = ml.MAS(model, lam=10.0, progress=False)
    mas.consolidate(padded_batches())
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.01)
    model.zero_grad()
    mas.add_penalty_grad_()
    for name, p in model.named_parameters():
        assert (p.grad is not None) == p.requires_grad, name


def test_docs_example(tmp_path):
    from tests.test_docs_examples import python_block, run

    model = tiny_llama(seed=2).eval()
    ns = run(
        python_block("docs/integrations.md", "## LoRA with `peft`\n\n```bash"),
        tmp_path,
        model=model,
        task1_batches=padded_batches(),
    )
    mas = ns["mas"]
    assert mas.num_tasks == 1 and set(mas.importance) == {
        n for n, p in ns["model"].named_parameters() if p.requires_grad
    }
    assert all("lora_" in n for n in mas.importance)
