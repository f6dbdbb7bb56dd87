"""Brute-force oracles for the fuzzer, from docs/math.md, sharing no code with mas_local.

Every oracle runs each sample ALONE and UNPADDED (``Case.singles``), so layouts, masks and shared
inputs never need to be understood: whatever a module sees for one sample is that sample's event.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tests import oracles as base


def global_sample(case, model):
    """Ω = 1/N Σ_k |∂‖f(x_k)‖²/∂θ|."""
    return base.global_sample(model, [x for batch in case.singles for x in batch])


def global_batch(case, model):
    """Ω = 1/#B Σ_B |Σ_{k∈B} ∂‖f(x_k)‖²/∂θ| / b_B (the official MAS update, unrolled)."""
    named = base.trainable(model)
    acc = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in named}
    for batch in case.singles:
        g_sum = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in named}
        for x in batch:
            y = base._out(model, x).double()
            grads = torch.autograd.grad(y.pow(2).sum(), [p for _, p in named], allow_unused=True)
            for (n, _), g in zip(named, grads):
                if g is not None:
                    g_sum[n] += g.double()
        for n in acc:
            acc[n] += g_sum[n].abs() / len(batch)
    return {n: v / len(case.singles) for n, v in acc.items()}


def local_sample(case, model):
    """Ω = 1/N Σ_k |Σ_calls ∂(½‖y_k‖²)/∂θ|, y the judging module's own output, its inputs constant."""
    return base.local(model, [x for batch in case.singles for x in batch], "sample", judge=case.judge_modules(model))


def hebbian_module(m: nn.Module) -> str | None:
    """'linear' / 'conv' when the module runs the stock Linear/Conv forward (the rules' definition)."""
    t = type(m)
    if isinstance(m, nn.Linear) and t.forward is nn.Linear.forward:
        return "linear"
    for base_t in (nn.Conv1d, nn.Conv2d):
        if isinstance(m, base_t) and t.forward is base_t.forward and t._conv_forward is base_t._conv_forward:
            return "conv"
    return None


def _record(model, x):
    calls = []
    hooks = [
        m.register_forward_hook(lambda mod, a, kw, o: calls.append((mod, a, kw, o)), with_kwargs=True)
        for m in model.modules()
        if hebbian_module(m)
    ]
    try:
        with torch.no_grad():
            base._out(model, x)
    finally:
        for h in hooks:
            h.remove()
    return calls


def _linear_events(x, y):
    """Σ_r |y_r| ⊗ |x_r| and Σ_r |y_r| by an explicit loop over positions (rows)."""
    x2, y2 = x.reshape(-1, x.shape[-1]).double().abs(), y.reshape(-1, y.shape[-1]).double().abs()
    w = torch.zeros(y2.shape[1], x2.shape[1], dtype=torch.float64)
    b = torch.zeros(y2.shape[1], dtype=torch.float64)
    for r in range(x2.shape[0]):
        w += torch.outer(y2[r], x2[r])
        b += y2[r]
    return w, b, x2.shape[0]


def _conv_events(m, x, y):
    """Σ over output positions p of |y(p)| ⊗ |receptive field of p| (the layer's padding mode applied to x
    first: reflect/replicate/circular pad with data), by an explicit loop over positions."""
    mode = "constant" if m.padding_mode == "zeros" else m.padding_mode
    xp = F.pad(x.double(), m._reversed_padding_repeated_twice, mode=mode)
    yy = y.double()
    if isinstance(m, nn.Conv1d):
        xp, yy = xp.unsqueeze(2), yy.unsqueeze(2)
        ks, st, dl = (1, m.kernel_size[0]), (1, m.stride[0]), (1, m.dilation[0])
    else:
        ks, st, dl = m.kernel_size, m.stride, m.dilation
    xa, ya = xp.abs()[0], yy.abs()[0]  # one sample: [C, H, W], [O, Ho, Wo]
    o_ch, ho, wo = ya.shape
    g = m.groups
    cin_g, out_g = m.in_channels // g, o_ch // g
    w = torch.zeros(o_ch, cin_g, *ks, dtype=torch.float64)
    for i in range(ho):
        for j in range(wo):
            r0, c0 = i * st[0], j * st[1]
            patch = xa[:, r0 : r0 + dl[0] * (ks[0] - 1) + 1 : dl[0], c0 : c0 + dl[1] * (ks[1] - 1) + 1 : dl[1]]
            assert patch.shape[1:] == tuple(ks)
            for grp in range(g):
                o = slice(grp * out_g, (grp + 1) * out_g)
                w[o] += ya[o, i, j][:, None, None, None] * patch[grp * cin_g : (grp + 1) * cin_g][None]
    w = w.view(m.weight.shape)
    return w, ya.sum((1, 2)), ho * wo


def local_hebbian(case, model):
    """Linear/Conv weights and biases: 1/R Σ_r |y_r||x_r| (R = positions over all the data and all calls);
    every other parameter (and any judged outside its module): local ``sample``."""
    omega = local_sample(case, model)
    named = dict(base.trainable(model))
    ids = {id(p): n for n, p in named.items()}
    judged = {id(named[n]) for n in case.judge}
    sums, counts = {}, {}
    for batch in case.singles:
        for x in batch:
            for m, a, kw, y in _record(model, x):
                inp = a[0] if a else kw["input"]
                kind = hebbian_module(m)
                w_ev, b_ev, r = _linear_events(inp, y) if kind == "linear" else _conv_events(m, inp, y)
                for p, ev in ((m._parameters.get("weight"), w_ev), (m._parameters.get("bias"), b_ev)):
                    if p is None or not p.requires_grad or id(p) in judged:
                        continue
                    n = ids[id(p)]
                    sums[n] = sums.get(n, 0) + ev
                    counts[n] = counts.get(n, 0) + r
    for n in sums:
        omega[n] = sums[n] / counts[n] if counts[n] else torch.zeros_like(omega[n])
    return omega


ORACLES = {
    ("global", "sample"): global_sample,
    ("global", "batch"): global_batch,
    ("local", "sample"): local_sample,
    ("local", "hebbian"): local_hebbian,
}
