"""``mas_local.ops.penalty_grad_by_device``: the fused penalty for parameters on several devices.

On CPU the grouping is shown with meta tensors (grouping reads only ``.device``) and
the per-device calls with a monkeypatched grouping key that splits CPU tensors into
two groups; the GPU tests (``tests/test_ops_gpu.py``) use two real GPUs when present.
Tolerances: grads are computed per element by the same op, so they are compared for
equality; the split value sums two fp32-rounded partial values (rtol 1e-6).
"""

from __future__ import annotations

import pytest
import torch

from mas_local import ops
from mas_local.ops import multi_device, reference


def _case(shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda s: torch.randn(s, generator=g)
    params = [mk(s) for s in shapes]
    anchors = [mk(s) for s in shapes]
    omegas = [mk(s).abs() + 0.1 for s in shapes]
    grads = [mk(s) for s in shapes]
    return grads, params, anchors, omegas


SHAPES = [(30,), (4, 5), (7,), (2, 3, 4), (11,)]


def test_group_by_device_keeps_first_appearance_order():
    ts = [torch.empty(2, device="meta"), torch.empty(3), torch.empty(1, device="meta"), torch.empty(4)]
    groups = multi_device.group_by_device(ts)
    assert list(groups.items()) == [(torch.device("meta"), [0, 2]), (torch.device("cpu"), [1, 3])]


def test_single_device_is_exactly_the_plain_op():
    grads, params, anchors, omegas = _case(SHAPES)
    g_plain = [x.clone() for x in grads]
    want = ops.penalty_grad_(g_plain, params, anchors, omegas, 0.7, "torch")
    got = ops.penalty_grad_by_device(grads, params, anchors, omegas, 0.7, "torch")
    assert torch.equal(got, want)
    assert all(torch.equal(x, y) for x, y in zip(grads, g_plain))


def test_split_into_groups_calls_the_op_once_per_group_and_sums(monkeypatch):
    calls = []
    real = reference.penalty_grad_

    def counting(grads, params, anchors, omegas, lam):
        calls.append([p.shape for p in params])
        return real(grads, params, anchors, omegas, lam)

    monkeypatch.setattr(reference, "penalty_grad_", counting)
    # two "devices": even and odd tensor sizes
    monkeypatch.setattr(multi_device, "_device_key", lambda t: ("fake", t.numel() % 2))
    grads, params, anchors, omegas = _case(SHAPES, seed=1)
    g_plain = [x.clone() for x in grads]
    want = real(g_plain, params, anchors, omegas, 0.4)
    got = ops.penalty_grad_by_device(grads, params, anchors, omegas, 0.4, "torch")
    assert calls == [[(30,), (4, 5), (2, 3, 4)], [(7,), (11,)]]  # numel 30, 20, 24 even; 7, 11 odd
    assert got.dtype == torch.float32 and got.dim() == 0
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    assert all(torch.equal(x, y) for x, y in zip(grads, g_plain))


def test_plain_op_rejects_mixed_devices_and_names_the_alternative():
    """The op's argument check (a meta tensor in the call would send it to the fake kernel, so the check
    itself is called; with CPU and CUDA tensors the op runs it first)."""
    grads, params, anchors, omegas = _case([(3,), (4,)])
    ops.check_penalty_args(grads, params, anchors, omegas)  # one device: fine
    params[1], anchors[1], omegas[1], grads[1] = (t.to("meta") for t in (params[1], anchors[1], omegas[1], grads[1]))
    with pytest.raises(ValueError, match="penalty_grad_by_device"):
        ops.check_penalty_args(grads, params, anchors, omegas)
    anchors[0] = anchors[0].to("meta")
    with pytest.raises(ValueError, match="different devices"):
        ops.check_penalty_args(grads, params, anchors, omegas)


def test_empty_lists_and_length_mismatch():
    assert ops.penalty_grad_by_device([], [], [], [], 1.0).item() == 0.0
    assert ops.penalty_grad_by_device([], [], [], [], 1.0, device="meta").device.type == "meta"
    with pytest.raises(ValueError, match="same length"):
        ops.penalty_grad_by_device([torch.zeros(1)], [], [], [], 1.0)
