"""Normalisation layers in closed form: y = x̂ ⊙ w + b, where x̂ depends on the sample's own input only.

Per sample, ``g_w = Σ_positions Δ ⊙ x̂`` and ``g_b = Σ_positions Δ``: two elementwise products and
a reduction, instead of re-running the module under ``torch.func`` (``docs/rules.md``).
BatchNorm qualifies in eval mode (running statistics); in train mode it mixes the samples
of a batch, so per-sample estimators refuse it and ``batch`` takes the generic rule.
RMSNorm classes of other libraries (``LlamaRMSNorm``, ``T5LayerNorm``, ...) are recognised by
what they compute: each call's output is checked against ``x̂ ⊙ w``; a module that computes
something else (``(1 + w)`` scaling, say) takes the generic rule for that call.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...errors import ImportanceError
from .base import Rule
from .generic import GenericRule, mixes_samples

_GENERIC = GenericRule()


class _AffineNorm(Rule):
    param_names = ("weight", "bias")
    channel_dim = False  # True: weight is per channel (dim 1 of a batch-first input), else over the last dims

    def normalized(self, site, x: Tensor) -> Tensor:
        """x̂ (float32 or float64) for a batch-first input ``x``."""
        raise NotImplementedError

    def _exact(self, acc, site) -> bool:
        return True

    def check(self, acc, site, per_sample):
        if per_sample and mixes_samples(site.module):
            _GENERIC.check(acc, site, per_sample)
        super().check(acc, site, per_sample)

    def _per_position(self, site, rows: slice) -> tuple[Tensor, Tensor, int]:
        """(Δ, x̂, positions dim) batch-first for samples ``rows``.

        Per-channel weights: ``[b, C, positions]`` (dim 2, the layout the input already has);
        weights over the last dims: ``[b, positions, *param_shape]`` (dim 1).
        """
        x = site.batch_first(site.x, site.x_dim)[rows]
        d = site.batch_first(site.delta, site.out_dims[0])[rows]
        xhat = self.normalized(site, x)
        d = d.to(xhat.dtype)
        b = x.shape[0]
        if self.channel_dim:
            channels = x.shape[1]
            return d.reshape(b, channels, -1), xhat.reshape(b, channels, -1), 2
        shape = site.module.weight.shape if site.module.weight is not None else site.module.bias.shape
        return d.reshape(b, -1, *shape), xhat.reshape(b, -1, *shape), 1

    def per_sample_grads(self, acc, site, params, rows):
        if not self._exact(acc, site):
            return _GENERIC.per_sample_grads(acc, site, params, rows)
        d, xhat, dim = self._per_position(site, rows)
        out = {}
        if "weight" in params:
            out["weight"] = (d * xhat).sum(dim)
        if "bias" in params:
            out["bias"] = d.sum(dim)
        return out

    def batch_grads(self, acc, site, params):
        if mixes_samples(site.module) or not self._exact(acc, site):
            return _GENERIC.batch_grads(acc, site, params)
        return {k: g.sum(0) for k, g in self.per_sample_grads(acc, site, params, slice(0, acc.batch_samples)).items()}


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


class LayerNormRule(_AffineNorm):
    def normalized(self, site, x):
        m = site.module
        return F.layer_norm(x.to(_compute_dtype(x)), m.normalized_shape, eps=m.eps)


class RMSNormRule(_AffineNorm):
    """``nn.RMSNorm``; with ``recognise=True`` any module computing ``w ⊙ x / rms(x)`` over its weight's dims."""

    param_names = ("weight",)

    def __init__(self, recognise: bool = False) -> None:
        self.recognise = recognise
        self.reruns_module = recognise  # reads the weight's value to check the call (gathered under FSDP2)

    @staticmethod
    def _eps(m: nn.Module, x: Tensor) -> float:
        eps = getattr(m, "eps", None)
        if eps is None:
            eps = getattr(m, "variance_epsilon", None)
        return torch.finfo(x.dtype).eps if eps is None else float(eps)

    def normalized(self, site, x):
        m = site.module
        dims = tuple(range(x.dim() - m.weight.dim(), x.dim()))
        xc = x.to(_compute_dtype(x))
        xhat = xc * torch.rsqrt(xc.pow(2).mean(dims, keepdim=True) + self._eps(m, x))
        return xhat.to(x.dtype).to(xc.dtype) if self.recognise else xhat  # as HF: x̂ in the input dtype

    def _exact(self, acc, site):
        if not self.recognise:
            return True
        checked = acc.closed_form_checked  # decided once per module and pass
        same = checked.get(id(site.module))
        if same is None:  # does the module compute w ⊙ x̂? (checked on one sample: a norm is per position)
            m, x, y = site.module, site.x, site.outputs[0]
            if site.x_dim is not None and site.out_dims[0] is not None:
                one_x, one_y = site.batch_first(x, site.x_dim)[:1], site.batch_first(y, site.out_dims[0])[:1]
                if bool(one_y.any()):  # an all-zero sample matches any scaling: then check them all
                    x, y = one_x, one_y
            weight = site.live["weight"] if site.live and "weight" in site.live else m.weight
            with torch.no_grad():
                want = weight.to(y.dtype) * self.normalized(site, x).to(y.dtype)
                tol = {torch.float64: 1e-9, torch.float32: 1e-5}.get(y.dtype, 1e-2)
                # |want - y| <= tol·(|y| + max|y|) everywhere, as allclose with atol = tol·max|y|, in fewer ops
                mag = y.abs()
                same = want.shape == y.shape and bool(((want - y).abs_() <= (mag + mag.max()).mul_(tol)).all())
            checked[id(site.module)] = same
        return same


class BatchNormRule(_AffineNorm):
    channel_dim = True

    def normalized(self, site, x):
        m = site.module
        if mixes_samples(m):
            raise ImportanceError(f"{type(m).__name__} in train mode mixes the samples of a batch")
        dt = _compute_dtype(x)  # eval-mode batch_norm without the affine part: x̂ in one pass
        return F.batch_norm(x.to(dt), m.running_mean.to(dt), m.running_var.to(dt), None, None, False, 0.0, m.eps)


class GroupNormRule(_AffineNorm):
    channel_dim = True

    def normalized(self, site, x):
        m = site.module
        return F.group_norm(x.to(_compute_dtype(x)), m.num_groups, eps=m.eps)


class InstanceNormRule(_AffineNorm):
    channel_dim = True

    def normalized(self, site, x):
        m = site.module
        dt = _compute_dtype(x)
        if m.training or not m.track_running_stats:  # the sample's own statistics; never touch the buffers
            return F.instance_norm(x.to(dt), eps=m.eps)
        return F.instance_norm(x.to(dt), m.running_mean.to(dt), m.running_var.to(dt), use_input_stats=False, eps=m.eps)


def looks_like_rms_norm(module: nn.Module) -> bool:
    """A module named like an RMSNorm whose only parameter is a weight, with an epsilon attribute."""
    name = type(module).__name__
    if not (name.endswith("RMSNorm") or name == "T5LayerNorm"):
        return False
    params = dict(module.named_parameters(recurse=False))
    return set(params) == {"weight"} and (hasattr(module, "variance_epsilon") or hasattr(module, "eps"))
