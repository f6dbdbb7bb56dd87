"""`mas-local compare --model transformer`: the model, its layer types, the agreement by type, the cost columns."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

import mas_local as ml
from mas_local.cli import main
from mas_local.experiments import importance_agreement
from mas_local.experiments.config import Config
from mas_local.experiments.cost import peak_extra_bytes
from mas_local.experiments.data import make_tasks
from mas_local.experiments.models import LAYER_TYPES, build_model, parameter_labels
from mas_local.experiments.transformer import Positions
from mas_local.importance.rules.generic import GenericRule
from mas_local.importance.rules.linear import LinearRule
from mas_local.layers import MASLinear

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TYPES = set(LAYER_TYPES["transformer"])
PAIR = "global-sample vs local-hebbian"


def _model(seed: int = 0, n_heads: int | None = None) -> nn.Module:
    torch.manual_seed(seed)
    model = build_model("transformer", n_heads, 2 if n_heads else 10)
    with torch.no_grad():  # trained-like, not initial, parameters: no exact zeros (biases start at 0)
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def _images(n: int, seed: int = 1) -> torch.Tensor:
    return make_tasks("permuted", 2, seed)[1].x["train"][:n]


def test_every_parameter_has_a_transformer_layer_type():
    model = _model()
    labels = parameter_labels(model)
    assert set(labels) == {n for n, _ in model.named_parameters()}
    kinds = {lab["type"] for lab in labels.values()}
    assert kinds == TYPES  # each type present, nothing unclassified
    assert labels["body.blocks.0.attn.q.weight"]["type"] == "attention q/k/v"
    assert labels["body.blocks.1.attn.out.bias"]["type"] == "attention out"
    assert labels["body.blocks.0.mlp_in.weight"]["type"] == "MLP in"
    assert labels["body.blocks.1.mlp_out.weight"]["type"] == "MLP out"
    assert labels["body.norm.weight"]["type"] == labels["body.blocks.0.norm2.bias"]["type"] == "norms"
    assert labels["body.pos.weight"]["type"] == labels["body.patch.proj.weight"]["type"] == "embeddings/positions"
    assert labels["head.weight"]["type"] == "head"
    assert labels["body.blocks.0.attn.q.weight"]["layer"] == "block 1 attn.q"
    # the MLP and CNN keep their numbered layers, and get their own types
    mlp = parameter_labels(build_model("mlp", None, 10))
    assert mlp["body.0.weight"]["layer"] == "layer 1" and mlp["body.0.weight"]["type"] == "hidden Linear"
    cnn = parameter_labels(build_model("cnn", None, 10))
    assert {lab["type"] for lab in cnn.values()} == set(LAYER_TYPES["cnn"])


def test_patches_are_2x2_blocks_of_the_image():
    model = _model()
    x = torch.arange(64, dtype=torch.float32).view(1, 64)
    seen = {}
    model.body.patch.proj.register_forward_hook(lambda m, inp, out: seen.update(x=inp[0]))
    model(x)
    patches = seen["x"][0]
    assert patches.shape == (16, 4)
    assert patches[0].tolist() == [0, 1, 8, 9]  # top-left 2×2 block of the row-major 8×8 image
    assert patches[5].tolist() == [18, 19, 26, 27]  # second patch row, second column


def test_global_sample_equals_the_per_sample_loop_on_the_transformer():
    model = _model(n_heads=None)
    x = _images(7)
    omega = ml.compute_importance(model, [x[:4], x[4:]], mode="global", estimator="sample", progress=False)
    expected = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in model.named_parameters()}
    names, params = zip(*model.named_parameters())
    for k in range(x.shape[0]):
        out = model(x[k : k + 1])
        grads = torch.autograd.grad(out.pow(2).sum(), params)
        for n, g in zip(names, grads):
            expected[n] += g.double().abs() / x.shape[0]
    for n in names:
        torch.testing.assert_close(omega[n].double(), expected[n], rtol=2e-4, atol=1e-7, msg=n)


def test_convert_swaps_every_linear_and_the_hebbian_rule_computes_them(monkeypatch):
    model = _model()
    x = _images(9)
    before = ml.compute_importance(model, [x], mode="local", estimator="hebbian", progress=False)
    linears = {name for name, m in model.named_modules() if type(m) is nn.Linear}
    assert len(linears) == 2 * 6 + 2  # q, k, v, out, mlp_in, mlp_out per block; patch embedding; head
    ml.convert(model)
    converted = {name for name, m in model.named_modules() if isinstance(m, MASLinear)}
    assert converted == linears
    assert not any(type(m) is nn.Linear for m in model.modules())

    served: dict[str, set[str]] = {"hebbian": set(), "generic": set()}
    names = {m: n for n, m in model.named_modules()}
    real_hebbian = LinearRule.add_hebbian

    def spy_hebbian(self, acc, site, params):
        served["hebbian"].add(names[site.module])
        return real_hebbian(self, acc, site, params)

    monkeypatch.setattr(LinearRule, "add_hebbian", spy_hebbian)
    for method in ("per_sample_grads", "add_sample_abs", "batch_grads", "add_per_sample_grads"):
        real = getattr(GenericRule, method)

        def spy(self, acc, site, *args, _real=real, **kwargs):
            served["generic"].add(names[site.module])
            return _real(self, acc, site, *args, **kwargs)

        monkeypatch.setattr(GenericRule, method, spy)

    after = ml.compute_importance(model, [x], mode="local", estimator="hebbian", progress=False)
    assert served["hebbian"] == linears
    assert served["generic"] == {"body.pos"}  # the generic rule sees only the positions module
    assert isinstance(model.body.pos, Positions)
    # Ω of one projection by hand (its input recomputed, no hook on the model): mean over the 9 × 16
    # token rows of |y_i|·|x_j|
    body, q = model.body, model.body.blocks[1].attn.q
    with torch.no_grad():
        inp = body.blocks[1].norm1(body.blocks[0](body.pos(body.patch(x))))
        out = torch.nn.functional.linear(inp, q.weight, q.bias)
    rows_x, rows_y = inp.reshape(-1, inp.shape[-1]), out.reshape(-1, out.shape[-1])
    hand = rows_y.abs().t().double() @ rows_x.abs().double() / rows_x.shape[0]
    torch.testing.assert_close(after["body.blocks.1.attn.q.weight"].double(), hand, rtol=1e-5, atol=1e-8)
    for n in before:  # the drop-in layers change nothing
        torch.testing.assert_close(after[n], before[n], rtol=1e-5, atol=1e-8, msg=n)


def _agreement(monkeypatch=None, broken=None) -> dict:
    model = _model()
    task = make_tasks("permuted", 2, 0)[0]
    task.x["train"] = task.x["train"][:96]
    cfg = Config(model="transformer", importance_batch_size=32)
    cfg.validate()
    if broken is not None:
        real = ml.compute_importance

        def fake(model, data, mode, estimator, **kw):
            omega = real(model, data, mode=mode, estimator=estimator, **kw)
            return {n: broken(v) for n, v in omega.items()} if mode == "local" else omega

        monkeypatch.setattr(ml, "compute_importance", fake)
    return importance_agreement.compare_estimators(model, task, cfg)


def test_agreement_by_type_and_what_a_broken_local_estimator_does_to_it(monkeypatch):
    real = _agreement()
    by_type = real["spearman_by_type"][PAIR]
    assert set(by_type) == TYPES | {"whole model"}
    assert all(math.isfinite(v) for v in by_type.values())
    # the head's global per-sample gradient is 2·f·xᵀ, its Hebbian term |f|·|x|: the same ranking
    assert by_type["head"] > 0.999
    assert all(real["peak_bytes"][m] > 0 for m in real["seconds"])

    constant = _agreement(monkeypatch, broken=lambda v: torch.full_like(v, 0.5))
    assert all(math.isnan(v) for v in constant["spearman_by_type"][PAIR].values())
    monkeypatch.undo()

    gen = torch.Generator().manual_seed(3)
    shuffled = _agreement(monkeypatch, broken=lambda v: torch.rand(v.shape, generator=gen))
    noise = shuffled["spearman_by_type"][PAIR]
    assert abs(noise["head"]) < 0.3 and abs(noise["whole model"]) < 0.1
    assert noise["head"] < by_type["head"] - 0.6
    # global-only pairs are untouched by a broken local estimator
    assert shuffled["spearman_by_type"]["global-sample vs global-batch"] == pytest.approx(
        real["spearman_by_type"]["global-sample vs global-batch"], nan_ok=True
    )


def test_peak_extra_bytes_counts_what_is_held_at_once():
    kept = torch.randn(300, 300)

    def work():
        a, b = torch.randn(500, 500), torch.randn(500, 500)
        c = a @ b
        del a, b
        return c + kept.sum()

    _, peak = peak_extra_bytes(work)
    assert peak == 3 * 500 * 500 * 4  # a, b and c at once; c + scalar comes after a and b are gone


def test_short_transformer_run_finishes_in_range(tmp_path, capsys):
    out = tmp_path / "out"
    args = ["compare", "--model", "transformer", "--seeds", "1", "--tasks", "2", "--epochs", "3"]
    args += ["--lam-grid", "0.1,1", "--quiet", "--out", str(out)]
    assert main(args) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["config"]["model"] == "transformer"
    assert res["config"]["lr"] == 3e-3 and res["config"]["batch_size"] == 64  # the model's defaults
    for name, m in res["methods"].items():
        acc = np.array(m["acc_matrix_mean"])
        assert acc.shape == (2, 2) and ((0 <= acc) & (acc <= 1)).all()
        assert acc[0, 0] > 0.3, name  # task 1 learnt well above chance (0.1) in 3 epochs
        s = m["summary"]
        if name in ("finetune", "joint"):
            assert s["importance_peak_mib"] is None
        else:
            assert 0 < s["importance_seconds_per_task"]["mean"] < 30
            assert 0 < s["importance_peak_mib"]["mean"] < 512
    imp = res["importance_comparison"]
    assert set(imp["spearman_by_type"][PAIR]) == TYPES | {"whole model"}
    assert imp["spearman_by_type"][PAIR]["head"]["mean"] > 0.999
    assert set(imp["peak_mib"]) == {"global-sample", "global-batch", "local-hebbian", "local-sample"}
    for name in ("accuracy_matrices.png", "task1_accuracy.png", "importance_global_vs_local.png"):
        assert (out / name).read_bytes()[:8] == PNG_MAGIC
    assert (out / "agreement_by_layer_type.png").stat().st_size > 5000
    text = capsys.readouterr().out
    assert "per layer type (pooled): embeddings/positions" in text and "attention q/k/v" in text
    assert "per layer type (mean within tensors): embeddings/positions" in text
    assert "Ω peak MiB" in text and "Ω s/task" in text
