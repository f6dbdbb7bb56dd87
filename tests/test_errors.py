"""Bad input gets a clear error and changes nothing; backend dispatch."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

import mas_local as ml
from mas_local import backend as bk
from tests import oracles
from tests.models import MLP


def _snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}, model.training


def _unchanged(model, snap):
    params, training = snap
    assert model.training == training
    assert all(torch.equal(params[n], p) for n, p in model.named_parameters())
    assert all(p.grad is None for p in model.parameters())
    assert not any(m._forward_hooks for m in model.modules())


@pytest.mark.parametrize(
    "data, match",
    [
        ([], "no batches"),
        ([torch.randn(3, 13), torch.full((2, 13), float("inf"))], "NaN or Inf"),
        ([torch.randn(3, 13, dtype=torch.float64)], "dtype torch.float64"),
        ([torch.randn(3, 13).to("meta")], "is on meta"),
        ([torch.randn(13)], "no batch dimension"),
        (torch.randn(3, 13), "iterable of batches"),
        ([3.0], "batch must"),
    ],
    ids=["empty", "inf", "dtype", "device", "no-batch-dim", "single-tensor", "not-a-batch"],
)
@pytest.mark.parametrize("mode", ["global", "local"])
def test_bad_data(data, match, mode):
    model = MLP().train()
    snap = _snapshot(model)
    with pytest.raises((ml.ImportanceError, TypeError, ValueError), match=match):
        ml.compute_importance(model, data, mode=mode, progress=False)
    _unchanged(model, snap)


def test_output_without_batch_dimension():
    class Scalar(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 3)

        def forward(self, x):
            return self.lin(x).sum()

    with pytest.raises(ml.ImportanceError, match="no batch dimension"):
        ml.compute_importance(Scalar(), [torch.randn(5, 4)], progress=False)


def test_nan_importance_names_the_parameter():
    model = nn.Sequential(nn.Linear(4, 3))
    with torch.no_grad():
        model[0].weight[0, 0] = float("inf")
    with pytest.raises(ml.ImportanceError, match="NaN or Inf"):
        ml.compute_importance(model, [torch.randn(5, 4)], progress=False)


def test_nan_in_omega_names_parameter():
    # finite output (4e19), but |Δ|ᵀ|x| = 8e19 · 1e20 overflows float32 in the weight's Ω
    model = nn.Sequential(nn.Linear(4, 1))
    with torch.no_grad():
        model[0].weight.fill_(0.1)
        model[0].bias.fill_(0)
    x = torch.full((3, 4), 1e20)
    with pytest.raises(ml.ImportanceError, match=r"'0\.weight'"):
        ml.compute_importance(model, [x], progress=False)


def test_batchnorm_in_train_mode_is_refused_for_sample():
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 2)).train()
    with pytest.raises(ml.ImportanceError, match="mixes the samples"):
        ml.compute_importance(model, [torch.randn(5, 4)], eval_mode=False, progress=False)
    # the batch estimator is defined for it
    imp = ml.compute_importance(model, [torch.randn(5, 4)], estimator="batch", eval_mode=False, progress=False)
    assert set(imp) == {n for n, _ in model.named_parameters()}
    assert model.training


def test_parameter_used_outside_its_module_is_computed_at_the_enclosing_module():
    class Outside(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 3)
            self.scale = nn.Linear(3, 3)

        def forward(self, x):
            return torch.nn.functional.linear(self.lin(x), self.scale.weight)  # scale's forward never runs

    torch.manual_seed(0)
    model, x = Outside(), torch.randn(5, 4)
    imp = ml.compute_importance(model, [x], progress=False)  # exact, at the root module (docs/math.md)
    want = oracles.global_sample(model, [x])
    for name in want:
        torch.testing.assert_close(imp[name].double(), want[name], rtol=1e-5, atol=1e-7)
    assert imp["scale.weight"].sum() > 0


def test_parameter_read_outside_every_module_call_is_refused():
    model = nn.Sequential(nn.Linear(4, 3))
    w = model[0].weight

    def output_fn(y):  # reads the weight outside any module call: no exact per-sample method
        return y @ w

    with pytest.raises(ml.ImportanceError, match=r"'0\.weight'.*estimator='batch'"):
        ml.compute_importance(model, [torch.randn(5, 4)], output_fn=output_fn, progress=False)
    imp = ml.compute_importance(model, [torch.randn(5, 4)], output_fn=output_fn, estimator="batch", progress=False)
    assert imp["0.weight"].sum() > 0


def test_unknown_names():
    with pytest.raises(ValueError, match="unknown mode"):
        ml.compute_importance(MLP(), [torch.randn(2, 13)], mode="glob")
    with pytest.raises(ValueError, match="unknown estimator"):
        ml.compute_importance(MLP(), [torch.randn(2, 13)], mode="local", estimator="fisher")
    with pytest.raises(ValueError, match="unknown backend"):
        ml.compute_importance(MLP(), [torch.randn(2, 13)], backend="cuda", progress=False)


def test_forced_missing_backend_raises_clearly(monkeypatch):
    # Simulate an extension that is not built, whatever this environment has.
    monkeypatch.setitem(bk._SITES, "ext", "mas_local._not_built_for_this_test")
    monkeypatch.setattr(bk, "_modules", {})
    monkeypatch.setattr(bk, "_load_errors", {})
    monkeypatch.delenv("MAS_LOCAL_BACKEND", raising=False)
    model = MLP()
    with pytest.raises(ml.BackendUnavailableError, match="'ext' was requested .* not available"):
        ml.compute_importance(model, [torch.randn(2, 13)], backend="ext", progress=False)
    with pytest.raises(ml.BackendUnavailableError, match="not available"):
        ml.MAS(model, backend="ext", progress=False).consolidate([torch.randn(2, 13)])
    monkeypatch.setenv("MAS_LOCAL_BACKEND", "ext")
    with pytest.raises(ml.BackendUnavailableError, match="not available"):
        ml.ops.abs_gemm_acc_(torch.zeros(2, 3), torch.randn(4, 2), torch.randn(4, 3))
    monkeypatch.delenv("MAS_LOCAL_BACKEND")
    assert bk.resolve("penalty_grad", "cpu")[0] == "torch"  # auto falls back


def test_env_var_selects_backend(monkeypatch):
    monkeypatch.setenv("MAS_LOCAL_BACKEND", "torch")
    assert bk.resolve("abs_gemm_acc", "cpu")[0] == "torch"
    monkeypatch.setenv("MAS_LOCAL_BACKEND", "bogus")
    with pytest.raises(ValueError, match="MAS_LOCAL_BACKEND"):
        bk.resolve("abs_gemm_acc", "cpu")


def test_auto_falls_back_with_one_notice(monkeypatch, caplog):
    monkeypatch.delenv("MAS_LOCAL_BACKEND", raising=False)
    monkeypatch.setitem(bk.AUTO_ORDER, ("abs_gemm_acc", "cpu"), ("nonexistent_for_test", "torch"))
    monkeypatch.setitem(bk._SITES, "nonexistent_for_test", "mas_local._no_such_module")
    monkeypatch.setattr(bk, "BACKENDS", bk.BACKENDS + ("nonexistent_for_test",))
    monkeypatch.setattr(bk, "_noticed", set())
    with caplog.at_level(logging.INFO, logger="mas_local"):
        for _ in range(3):
            name, _fn = bk.resolve("abs_gemm_acc", "cpu")
            assert name == "torch"
    notices = [r for r in caplog.records if "nonexistent_for_test" in r.getMessage()]
    assert len(notices) == 1


def test_op_argument_errors():
    with pytest.raises(ValueError, match="expected a"):
        ml.ops.abs_gemm_acc_(torch.zeros(2, 3), torch.randn(4, 2), torch.randn(5, 3))
    with pytest.raises(TypeError, match="float32"):
        ml.ops.abs_gemm_acc_(torch.zeros(2, 3, dtype=torch.float16), torch.randn(4, 2), torch.randn(4, 3))
    with pytest.raises(ValueError, match="shape"):
        ml.ops.per_sample_abs_acc_(torch.zeros(2, 2), torch.randn(3, 4, 2), torch.randn(3, 4, 3))
    with pytest.raises(ValueError, match="mismatched"):
        ml.ops.penalty_grad_([torch.zeros(3)], [torch.zeros(3)], [torch.zeros(4)], [torch.zeros(3)], 1.0)


def test_precision_is_validated_and_reaches_the_op(monkeypatch):
    with pytest.raises(ValueError, match="unknown precision"):
        ml.compute_importance(MLP(), [torch.randn(2, 13)], precision="fp4", progress=False)
    with pytest.raises(ValueError, match="unknown precision"):
        ml.MAS(MLP(), precision="fp4")
    seen = []
    real = ml.ops.eager.abs_gemm_acc_

    def spy(omega, a, b, alpha=1.0, backend="auto", precision="accurate"):
        seen.append(precision)
        return real(omega, a, b, alpha, backend, precision)

    monkeypatch.setattr(ml.ops.eager, "abs_gemm_acc_", spy)
    mas = ml.MAS(MLP(), mode="local", precision="fast", progress=False)
    mas.consolidate([torch.randn(3, 13)])
    assert seen and set(seen) == {"fast"}


def test_parameter_read_another_way_on_a_later_batch_is_planned_again():
    """A plan holds for one batch signature; a batch of another signature, or one whose graph reads the
    parameters elsewhere, is planned anew: a weight read outside its module on some batches only stays exact."""

    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 3)
            self.extra = nn.Linear(3, 3)  # never called: its weight is read directly on some batches

        def forward(self, x):
            h = self.lin(x)
            if bool((x[:, 0] > 5).all()):  # the same for a batch and for each of its samples alone
                h = torch.nn.functional.linear(h, self.extra.weight)
            return h

    torch.manual_seed(0)
    model = Branchy().double()
    later = torch.randn(3, 4, dtype=torch.float64)
    later[:, 0] += 10
    data = [torch.randn(4, 4, dtype=torch.float64), later]
    got = ml.compute_importance(model, data, progress=False)
    want = oracles.global_sample(model, data)
    for name in ("lin.weight", "lin.bias", "extra.weight"):
        torch.testing.assert_close(got[name].double(), want[name], rtol=1e-5, atol=1e-7)


def test_a_branch_on_values_within_one_signature_is_planned_again():
    """Same shapes, another read: the graph's reads of each parameter differ, so the batch is planned again."""

    class ValueBranch(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 3)

        def forward(self, x):
            h = self.lin(x)
            if bool((x > 0).all()):  # reads the Linear's weight outside the Linear on some batches only
                h = h + torch.nn.functional.linear(x, self.lin.weight).tanh()
            return h

    torch.manual_seed(0)
    model = ValueBranch().double()
    data = [-torch.rand(3, 4, dtype=torch.float64), torch.rand(3, 4, dtype=torch.float64)]
    got = ml.compute_importance(model, data, progress=False, verify="off")  # the plan alone, not the self-check
    want = oracles.global_sample(model, data)
    for name, w in want.items():
        torch.testing.assert_close(got[name].double(), w, rtol=1e-5, atol=1e-7)


def test_packed_sequences_are_refused_for_per_sample_estimators():
    class Packed(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = nn.GRU(3, 4, batch_first=True)

        def forward(self, x):
            packed = nn.utils.rnn.pack_padded_sequence(x, [x.shape[1]] * x.shape[0], batch_first=True)
            return self.rnn(packed)[1][-1]

    with pytest.raises(ml.ImportanceError, match="PackedSequence"):
        ml.compute_importance(Packed(), [torch.randn(2, 5, 3)], progress=False)


_FINITENESS = [
    ([1.0, -2.0, 3.0], True),
    ([3e38, 3e38, 3e38], True),  # the float32 sum overflows, the values are finite
    ([6e4, 6e4, 6e4], True),  # the same in float16
    ([1.0, float("nan"), 2.0], False),
    ([1.0, float("inf"), 2.0], False),
    ([float("inf"), float("-inf")], False),  # the sum is NaN
    ([-float("inf")], False),
]


@pytest.mark.parametrize(
    "values,finite,dtype",
    [
        (v, f, dt)
        for v, f in _FINITENESS
        for dt in (torch.float32, torch.float16, torch.float64)
        if not (dt == torch.float16 and v[0] == 3e38)  # not representable in float16
    ],
)
def test_finiteness_check(values, finite, dtype):
    from mas_local.importance.statistics import all_finite

    t = torch.tensor(values, dtype=torch.float64).to(dtype)
    assert all_finite(t) is finite
    assert all_finite(t.reshape(-1, 1).expand(-1, 3)) is finite  # a strided view


def test_finiteness_check_of_empty_and_integer_tensors():
    from mas_local.importance.statistics import all_finite

    assert all_finite(torch.empty(0))
    assert all_finite(torch.arange(5))
