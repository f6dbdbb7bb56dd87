"""Brute-force oracles: Python loops over single samples with torch.autograd.grad.

They share no code with mas_local.importance: each definition of docs/math.md
is written out literally, one sample (or one batch) at a time.
"""

from __future__ import annotations

import torch
from torch import nn


def _out(model, x):
    y = model(x) if not isinstance(x, dict) else model(**x)
    if hasattr(y, "logits"):
        y = y.logits
    if isinstance(y, tuple):
        y = y[0]
    return y


def _slice(x, k):
    if isinstance(x, dict):
        return {key: v[k : k + 1] for key, v in x.items()}
    return x[k : k + 1]


def _size(x):
    return next(iter(x.values())).shape[0] if isinstance(x, dict) else x.shape[0]


def trainable(model):
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def global_sample(model: nn.Module, batches) -> dict[str, torch.Tensor]:
    """Ω = 1/N Σ_k |∂‖f(x_k)‖²/∂θ|, one sample at a time."""
    named = trainable(model)
    acc = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in named}
    total = 0
    for x in batches:
        for k in range(_size(x)):
            y = _out(model, _slice(x, k))
            grads = torch.autograd.grad(y.double().pow(2).sum(), [p for _, p in named], allow_unused=True)
            for (n, _), g in zip(named, grads):
                if g is not None:
                    acc[n] += g.double().abs()
            total += 1
    return {n: v / total for n, v in acc.items()}


def global_batch_official(model: nn.Module, batches) -> dict[str, torch.Tensor]:
    """The official MAS code (Aljundi et al.), its omega update transcribed line by line.

    For batch ``index`` of size ``b`` it back-propagates ``MSELoss(size_average=False)(out, 0)``
    = Σ_{k∈B}‖f(x_k)‖² and updates ``omega += (|g| - b·omega) / ((index+1)·b)``, with b the
    *current* batch's size: this unrolls to (1/#B) Σ_B |g_B| / b_B.
    """
    named = trainable(model)
    omega = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in named}
    for index, x in enumerate(batches):
        y = _out(model, x).double()
        loss = torch.nn.functional.mse_loss(y, torch.zeros_like(y), reduction="sum")
        grads = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
        batch_size = _size(x)
        step_size = 1.0 / float((index + 1) * batch_size)
        for (n, _), g in zip(named, grads):
            g = torch.zeros_like(omega[n]) if g is None else g.double().abs()
            omega[n] = omega[n] + step_size * (g - batch_size * omega[n])
    return omega


def global_batch_avalanche(model: nn.Module, batches) -> dict[str, torch.Tensor]:
    """Avalanche 0.6 ``MASPlugin._get_importance``: ``loss = norm(out, p='fro', dim=1).pow(2).mean()``,
    ``importance += |grad|`` per batch, then divided by the number of batches.

    On a 2-D output this is (1/#B) Σ_B |∂ mean_{k∈B}‖f(x_k)‖² / ∂θ|; on ``[B, T, C]`` the
    norm runs over T and the mean over B and C, so it is that divided by C.
    """
    named = trainable(model)
    importance = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in named}
    count = 0
    for x in batches:
        out = _out(model, x).double()
        loss = torch.norm(out, p="fro", dim=1).pow(2).mean()
        grads = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
        for (n, _), g in zip(named, grads):
            if g is not None:
                importance[n] += g.double().abs()
        count += 1
    return {n: v / count for n, v in importance.items()}


def _record_calls(model, x, extra=()):
    """Run the model once; return [(module, args, kwargs)] for each call of a module owning parameters
    (or listed in ``extra``)."""
    calls = []
    hooks = []
    extra_ids = {id(m) for m in extra}
    for m in model.modules():
        if any(True for _ in m.parameters(recurse=False)) or id(m) in extra_ids:
            hooks.append(m.register_forward_hook(lambda mod, a, kw, o: calls.append((mod, a, kw)), with_kwargs=True))
    try:
        with torch.no_grad():
            _out(model, x)
    finally:
        for h in hooks:
            h.remove()
    return calls


def _module_out(mod, args, kwargs):
    y = mod(*args, **kwargs)
    return y[0] if isinstance(y, tuple) else y


def _leading(mod, t, b):
    return 0 if torch.is_tensor(t) and t.dim() > 0 and t.shape[0] == b else None


def local(model: nn.Module, batches, estimator: str, judge=None, batch_dim=None) -> dict[str, torch.Tensor]:
    """Local sample/batch: |∂(½‖y‖²)/∂θ| of each module's own output.

    ``sample``: (1/N) Σ_k over single samples. ``batch``: (1/#B) Σ_B |g_B| / b_B with g_B
    the gradient of the whole batch. Gradients of a parameter used at several calls are
    summed over the calls before the absolute value. ``judge`` maps parameter names to the
    module whose output judges them, for parameters not read by the module that owns them;
    ``batch_dim(module, tensor, b)`` says where a module input's batch dimension is.
    """
    named = dict(trainable(model))
    ids = {id(p): n for n, p in named.items()}
    judge = judge or {}
    judged_by = {}
    for n, m in judge.items():
        judged_by.setdefault(id(m), []).append(named[n])
    overridden = {id(named[n]) for n in judge}
    batch_dim = batch_dim or _leading
    acc = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in named.items()}
    total = 0
    for x in batches:
        calls = _record_calls(model, x, extra=list(judge.values()))
        b = _size(x)
        groups = [range(k, k + 1) for k in range(b)] if estimator == "sample" else [range(b)]
        for rows in groups:
            g_sum = {}
            for mod, args, kwargs in calls:
                own = [p for p in mod.parameters(recurse=False) if p.requires_grad and id(p) not in overridden]
                own += judged_by.get(id(mod), [])
                if not own:
                    continue

                def cut(t, mod=mod, rows=rows, b=b):
                    d = batch_dim(mod, t, b)
                    t = t if d is None else t.narrow(d, rows.start, len(rows))
                    # contiguous: torch 2.13's CPU GroupNorm backward crashes on a channels-last float64 input
                    return t.contiguous() if torch.is_tensor(t) else t

                a = tuple(cut(t) for t in args)
                kw = {k: cut(v) for k, v in kwargs.items()}
                y = _module_out(mod, a, kw)
                grads = torch.autograd.grad(0.5 * y.double().pow(2).sum(), own, allow_unused=True)
                for p, g in zip(own, grads):
                    if g is not None:
                        g_sum[id(p)] = g_sum.get(id(p), 0) + g.double()
            for pid, g in g_sum.items():
                acc[ids[pid]] += g.abs() if estimator == "sample" else g.abs() / b
        total += b if estimator == "sample" else 1
    return {n: v / total for n, v in acc.items()}


def hebbian_linear(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Ω_ij = 1/R Σ_r |y_ri||x_rj| and Ω_i = 1/R Σ_r |y_ri|, by an explicit loop over rows."""
    x2, y2 = x.reshape(-1, x.shape[-1]).double(), y.reshape(-1, y.shape[-1]).double()
    w = torch.zeros(y2.shape[1], x2.shape[1], dtype=torch.float64)
    for r in range(x2.shape[0]):
        w += torch.outer(y2[r].abs(), x2[r].abs())
    return w / x2.shape[0], y2.abs().sum(0) / x2.shape[0]


def hebbian_conv2d(x: torch.Tensor, y: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """Ω[o,c,u,v] = 1/R Σ_{k,p} |y_k,o(p)| |x_k,c(p·s + u·d − pad)| with explicit loops (zero padding)."""
    n, _, h, w = x.shape
    _, o_ch, ho, wo = y.shape
    kh, kw = conv.kernel_size
    sh, sw = conv.stride
    dh, dw = conv.dilation
    ph, pw = conv.padding
    g = conv.groups
    cin_g, out_g = conv.in_channels // g, o_ch // g
    omega = torch.zeros(o_ch, cin_g, kh, kw, dtype=torch.float64)
    xa, ya = x.double().abs(), y.double().abs()
    for o in range(o_ch):
        grp = o // out_g
        for c in range(cin_g):
            ci = grp * cin_g + c
            for u in range(kh):
                for v in range(kw):
                    s = 0.0
                    for i in range(ho):
                        for j in range(wo):
                            r, q = i * sh + u * dh - ph, j * sw + v * dw - pw
                            if 0 <= r < h and 0 <= q < w:
                                s += (ya[:, o, i, j] * xa[:, ci, r, q]).sum().item()
                    omega[o, c, u, v] = s
    return omega / (n * ho * wo)
