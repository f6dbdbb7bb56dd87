"""Importance estimators: global MAS and local (Hebbian) MAS.

The definitions are in DESIGN.md §1; in short, for samples x_k, k = 1..N:

global sample   Ω = 1/N Σ_k |∂‖f(x_k)‖²/∂θ|
global batch    Ω = 1/N Σ_B |∂ Σ_{k∈B}‖f(x_k)‖²/∂θ|
local hebbian   Ω_ij = 1/R Σ_r |y_ri||x_rj|   (Linear/Conv; other modules use local sample)
local sample    Ω = 1/N Σ_k |∂(½‖y_k‖²)/∂θ|   (y: the module's own output)
local batch     Ω = 1/N Σ_B |∂(½ Σ_{k∈B}‖y_k‖²)/∂θ|

How it is computed. Every module that owns trainable parameters directly is a
*site*: converted layers report to the estimator from their forward, every other
module through a temporary forward hook. For each call we keep the inputs and the
output; the output gradient Δ is ∂(Σ_k‖f(x_k)‖²)/∂y from one backward pass
(global) or y itself (local: ∂(½‖y‖²)/∂y = y). A per-module *rule* turns (x, Δ)
into per-sample absolute gradients without a per-sample loop:

Linear          2-D input: Σ_k|Δ_k ⊗ x_k| = |Δ|ᵀ|X| (abs-GEMM op); sequences: Σ_b|Δ_bᵀ X_b| (per-sample op)
Conv1d/Conv2d   the per-sample op on the unfolded input, per group, in batch chunks
Embedding       per sample, only the rows of its tokens (never [B, vocab, dim])
anything else   torch.func: vmap of the module-local vector-Jacobian product

A parameter used at several sites in one batch (tied weights, a layer called
twice) gets its per-sample gradients summed over the sites before the absolute
value, as the definition requires. Samples must be independent: modules that mix
them (BatchNorm in train mode) are rejected for per-sample estimators.

Ω is accumulated in float32 as a sum and a count per parameter (the sufficient
statistics), so passes can be merged across processes or resumed.
"""

from __future__ import annotations

import fnmatch
import logging
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from . import ops
from .layers import _TapMixin

log = logging.getLogger("mas_local")

MODES = ("global", "local")
ESTIMATORS = {"global": ("sample", "batch"), "local": ("hebbian", "sample", "batch")}
DEFAULT_ESTIMATOR = {"global": "sample", "local": "hebbian"}
DEFAULT_CHUNK_BYTES = 256 << 20
_CHECKPOINT_VERSION = 1


class ImportanceError(RuntimeError):
    """The data or model cannot be estimated as asked; nothing was changed."""


def resolve_mode(mode: str, estimator: str | None) -> tuple[str, str]:
    """Validate ``mode``/``estimator`` and fill in the mode's default estimator."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")
    if estimator is None:
        estimator = DEFAULT_ESTIMATOR[mode]
    if estimator not in ESTIMATORS[mode]:
        raise ValueError(f"unknown estimator {estimator!r} for mode {mode!r}; expected one of {ESTIMATORS[mode]}")
    return mode, estimator


def resolve_precision(precision: str) -> str:
    """Validate the abs-GEMM operand precision (see :func:`mas_local.ops.abs_gemm_acc_`)."""
    if precision not in ops.PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; expected one of {ops.PRECISIONS}")
    return precision


def default_output_fn(output: Any) -> Tensor:
    """The tensor MAS measures: the output itself, its ``.logits``, or the first element of a tuple."""
    if isinstance(output, Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    raise ImportanceError(f"cannot find the output tensor in a {type(output).__name__}; pass output_fn=... to pick it")


def call_model(model: nn.Module, batch: Any) -> Any:
    """Run the model on one batch: a Tensor, a tuple/list (first element is the input) or a dict of kwargs."""
    if isinstance(batch, Tensor):
        return model(batch)
    if isinstance(batch, (tuple, list)):
        if not batch:
            raise ImportanceError("a batch is an empty tuple/list")
        return model(batch[0])
    if isinstance(batch, Mapping):
        return model(**batch)
    raise ImportanceError(f"a batch must be a Tensor, a tuple/list or a dict, got {type(batch).__name__}")


def model_inputs(batch: Any) -> Any:
    """The part of a batch the model sees (labels in a tuple are ignored)."""
    if isinstance(batch, (tuple, list)):
        return batch[0]
    return batch


def batch_size(batch: Any) -> int:
    leaves = [t for t in tree_flatten(model_inputs(batch))[0] if isinstance(t, Tensor)]
    if not leaves or leaves[0].dim() == 0:
        raise ImportanceError("a batch must hold a tensor with a leading batch dimension")
    return int(leaves[0].shape[0])


def check_batch(model: nn.Module, batch: Any, index: int) -> None:
    """Clear errors for inputs on the wrong device or in the wrong floating dtype."""
    params = [p for p in model.parameters()]
    if not params:
        return
    devices = {p.device for p in params}
    float_dtypes = {p.dtype for p in params if p.is_floating_point()}
    for t in tree_flatten(model_inputs(batch))[0]:
        if not isinstance(t, Tensor):
            continue
        if len(devices) == 1 and t.device not in devices:
            raise ImportanceError(
                f"batch {index}: input tensor is on {t.device} but the model is on {next(iter(devices))}"
            )
        if (
            t.is_floating_point()
            and len(float_dtypes) == 1
            and t.dtype not in float_dtypes
            and not torch.is_autocast_enabled(t.device.type)
        ):
            raise ImportanceError(
                f"batch {index}: input tensor has dtype {t.dtype} but the model's parameters are "
                f"{next(iter(float_dtypes))}; convert the data (or run under torch.autocast)"
            )


def _mixes_samples(module: nn.Module) -> bool:
    """BatchNorm normalises with batch statistics in train mode (and always without running stats)."""
    return isinstance(module, nn.modules.batchnorm._BatchNorm) and (module.training or module.running_mean is None)


# ----------------------------------------------------------------------------- sites


@dataclass
class Site:
    """One call of a module that owns trainable parameters, during one batch."""

    module: nn.Module
    params: dict[str, nn.Parameter]  # local name -> parameter (trainable, direct)
    args: tuple
    kwargs: dict
    outputs: list[Tensor]  # tensor leaves of the output
    out_spec: Any
    versions: list[int] = field(default_factory=list)
    deltas: list[Tensor | None] = field(default_factory=list)
    live: dict[str, Tensor] | None = None  # the tensors the module used, when not its registered params (FSDP2)
    activated: Tensor | None = None  # local mode with a user activation: act(y), the layer's judged output

    @property
    def judged_output(self) -> Tensor:
        """The output local hebbian pairs with the input: act(y) if an activation was given, else y."""
        return self.outputs[0] if self.activated is None else self.activated

    @property
    def x(self) -> Tensor:
        return self.args[0]

    def delta(self) -> Tensor | None:
        return self.deltas[0] if self.deltas else None


def _tensor_leaves(obj: Any) -> list[Tensor]:
    return [t for t in tree_flatten(obj)[0] if isinstance(t, Tensor)]


# ----------------------------------------------------------------------------- rules


class Rule:
    """How one kind of module turns (inputs, Δ) into importance statistics."""

    def check(self, site: Site, n: int, per_sample: bool) -> None:
        if per_sample:
            for t in _tensor_leaves((site.args, site.kwargs))[:1]:
                if t.dim() == 0 or t.shape[0] != n:
                    raise ImportanceError(
                        f"module {type(site.module).__name__} sees an input with leading dimension "
                        f"{tuple(t.shape)[:1]} but the batch has {n} samples; per-sample estimators need "
                        "the batch dimension first in every module (use estimator='batch' otherwise)"
                    )

    def sample_abs(self, est: Estimator, site: Site, delta: Tensor) -> None:
        """sums[p] += Σ_k |g_k(p)| for every parameter of the site."""
        dense = self.dense(est, site, delta, 0, est.n)
        for name, g in dense.items():
            est.add_sum(site.params[name], g.abs().sum(0))

    def batch_signed(self, est: Estimator, site: Site, delta: Tensor) -> dict[str, Tensor]:
        """Σ_k g_k(p) over the batch, signed (abs is taken after all sites of a batch)."""
        return {name: g.sum(0) for name, g in self.dense(est, site, delta, 0, est.n).items()}

    def dense(self, est: Estimator, site: Site, delta: Tensor, b0: int, b1: int) -> dict[str, Tensor]:
        """Per-sample gradients ``[b1-b0, *shape]`` of samples b0..b1 (used for shared parameters)."""
        raise NotImplementedError


class LinearRule(Rule):
    @staticmethod
    def _rows(site: Site, delta: Tensor, n: int) -> tuple[Tensor, Tensor]:
        x, d = site.x, delta
        if x.dim() == 1:  # unbatched call: one sample, one position
            x, d = x.unsqueeze(0), d.unsqueeze(0)
        return x.reshape(n, -1, x.shape[-1]), d.reshape(n, -1, d.shape[-1])

    def sample_abs(self, est, site, delta):
        x, d = self._rows(site, delta, est.n)
        w, b = site.params.get("weight"), site.params.get("bias")
        if w is not None:
            if x.shape[1] == 1:  # one position per sample: |Σ_k| is rank-1, Σ_k|Δ_k x_kᵀ| = |Δ|ᵀ|X|
                ops.abs_gemm_acc_(est.sum_of(w), d[:, 0], x[:, 0], 1.0, est.backend, est.precision)
            else:
                out_f, in_f = d.shape[-1], x.shape[-1]
                for s in est.chunks(x.shape[0], bytes_per_sample=4 * (out_f * in_f + x[0].numel() + d[0].numel())):
                    ops.per_sample_abs_acc_(est.sum_of(w), d[s], x[s], 1.0, est.backend)
        if b is not None:
            est.add_sum(b, d.float().sum(1).abs().sum(0))

    def batch_signed(self, est, site, delta):
        x, d = self._rows(site, delta, est.n)
        x2, d2 = x.reshape(-1, x.shape[-1]).float(), d.reshape(-1, d.shape[-1]).float()
        out = {}
        if "weight" in site.params:
            out["weight"] = d2.t() @ x2
        if "bias" in site.params:
            out["bias"] = d2.sum(0)
        return out

    def hebbian(self, est, site):
        y = site.judged_output
        x2 = site.x.reshape(-1, site.x.shape[-1])
        y2 = y.reshape(-1, y.shape[-1])
        rows = x2.shape[0]
        if "weight" in site.params:
            w = site.params["weight"]
            ops.abs_gemm_acc_(est.sum_of(w), y2, x2, 1.0, est.backend, est.precision)
            est.add_count(w, rows)
        if "bias" in site.params:
            b = site.params["bias"]
            est.add_sum(b, y2.float().abs().sum(0))
            est.add_count(b, rows)

    def dense(self, est, site, delta, b0, b1):
        x, d = self._rows(site, delta, est.n)
        x, d = x[b0:b1].float(), d[b0:b1].float()
        out = {}
        if "weight" in site.params:
            out["weight"] = torch.einsum("bto,bti->boi", d, x)
        if "bias" in site.params:
            out["bias"] = d.sum(1)
        return out


class ConvRule(Rule):
    """Conv1d and Conv2d (Conv1d is handled as a Conv2d of height 1)."""

    @staticmethod
    def _geometry(module: nn.Module):
        two_d = isinstance(module, nn.Conv2d)
        k = tuple(module.kernel_size) if two_d else (1, module.kernel_size[0])
        stride = tuple(module.stride) if two_d else (1, module.stride[0])
        dilation = tuple(module.dilation) if two_d else (1, module.dilation[0])
        return two_d, k, stride, dilation

    def _padded(self, site: Site) -> tuple[Tensor, tuple[int, int]]:
        """The input as [B, C, H, W] and the zero padding still to apply, as the layer pads it.

        Zero padding given as numbers is passed on to the kernels (no copy); 'same' (which
        may be asymmetric) and the other padding modes are applied here, as the layer does.
        """
        m = site.module
        x = site.x
        two_d, *_ = self._geometry(m)
        expected = 4 if two_d else 3
        if x.dim() != expected:
            raise ImportanceError(
                f"{type(m).__name__} got an input of shape {tuple(x.shape)}; importance needs a batched "
                f"{expected}-D input"
            )
        if m.padding_mode == "zeros" and not isinstance(m.padding, str):
            pad = tuple(m.padding) if two_d else (0, m.padding[0])
        else:
            mode = "constant" if m.padding_mode == "zeros" else m.padding_mode
            x = F.pad(x, m._reversed_padding_repeated_twice, mode=mode)
            pad = (0, 0)
        return (x if two_d else x.unsqueeze(2)), pad

    @staticmethod
    def _operand(t: Tensor) -> Tensor:
        """cuDNN takes 16-bit operands as they are (fp32 accumulation inside); elsewhere compute in fp32."""
        return t if t.is_cuda and t.dtype in (torch.float16, torch.bfloat16) else t.float()

    @staticmethod
    def _as4d(t: Tensor, two_d: bool) -> Tensor:
        return t if two_d else t.unsqueeze(2)

    def _unfolded_groups(self, site: Site, xp: Tensor, pad: tuple[int, int], d: Tensor):
        """Yield (omega row slice selector, Δ_g [B, L, O_g], unfolded x_g [B, L, C_g·k]) per group."""
        m = site.module
        _, k, stride, dilation = self._geometry(m)
        unf = F.unfold(xp, k, dilation=dilation, padding=pad, stride=stride)  # [B, C·kh·kw, L]
        groups = m.groups
        out_g = m.out_channels // groups
        cols_g = unf.shape[1] // groups
        d = d.reshape(d.shape[0], m.out_channels, -1)
        for g in range(groups):
            yield (
                slice(g * out_g, (g + 1) * out_g),
                d[:, g * out_g : (g + 1) * out_g].transpose(1, 2),
                unf[:, g * cols_g : (g + 1) * cols_g].transpose(1, 2),
            )

    def sample_abs(self, est, site, delta):
        m = site.module
        two_d, k, stride, dilation = self._geometry(m)
        xp, pad = self._padded(site)
        d = self._as4d(delta, two_d)
        w, b = site.params.get("weight"), site.params.get("bias")
        if w is not None:
            omega = est.sum_of(w).view(m.out_channels, -1)
            positions = d.shape[2] * d.shape[3]
            cols = xp.shape[1] * k[0] * k[1]
            per_sample = 4 * (omega.numel() // m.groups + positions * cols + d[0].numel())
            for s in est.chunks(xp.shape[0], bytes_per_sample=per_sample):
                for rows, d_g, x_g in self._unfolded_groups(site, xp[s], pad, d[s]):
                    ops.per_sample_abs_acc_(omega[rows], d_g, x_g, 1.0, est.backend)
        if b is not None:
            est.add_sum(b, d.float().sum((2, 3)).abs().sum(0))

    def batch_signed(self, est, site, delta):
        m = site.module
        two_d, k, stride, dilation = self._geometry(m)
        xp, pad = self._padded(site)
        d = self._as4d(delta, two_d)
        out = {}
        if "weight" in site.params:
            w = site.params["weight"]
            xo = self._operand(xp)
            g = torch.nn.grad.conv2d_weight(
                xo, (m.out_channels, m.in_channels // m.groups, *k), d.to(xo.dtype), stride, pad, dilation, m.groups
            )
            out["weight"] = g.float().view(w.shape)
        if "bias" in site.params:
            out["bias"] = d.float().sum((0, 2, 3))
        return out

    def hebbian(self, est, site):
        m = site.module
        two_d, k, stride, dilation = self._geometry(m)
        xp, pad = self._padded(site)
        y = self._as4d(site.judged_output, two_d)
        events = y.shape[0] * y.shape[2] * y.shape[3]
        if "weight" in site.params:
            w = site.params["weight"]
            xo = self._operand(xp).abs()
            # the Hebbian sum is cuDNN's weight gradient of |x| and |y| (DESIGN.md §1)
            g = torch.nn.grad.conv2d_weight(
                xo,
                (m.out_channels, m.in_channels // m.groups, *k),
                y.to(xo.dtype).abs(),
                stride,
                pad,
                dilation,
                m.groups,
            )
            est.add_sum(w, g.view(w.shape))
            est.add_count(w, events)
        if "bias" in site.params:
            b = site.params["bias"]
            est.add_sum(b, y.float().abs().sum((0, 2, 3)))
            est.add_count(b, events)

    def dense(self, est, site, delta, b0, b1):
        m = site.module
        two_d, *_ = self._geometry(m)
        xp, pad = self._padded(site)
        d = self._as4d(delta, two_d)[b0:b1].float()
        out = {}
        if "weight" in site.params:
            w = site.params["weight"]
            parts = [
                torch.einsum("blo,bli->boi", d_g, x_g)
                for _, d_g, x_g in self._unfolded_groups(site, xp[b0:b1].float(), pad, d)
            ]
            out["weight"] = torch.cat(parts, dim=1).reshape(b1 - b0, *w.shape)
        if "bias" in site.params:
            out["bias"] = d.sum((2, 3))
        return out


class EmbeddingRule(Rule):
    """A sample's gradient touches only the rows of its own tokens."""

    @staticmethod
    def _flat(site: Site, delta: Tensor, n: int) -> tuple[Tensor, Tensor, Tensor]:
        idx = site.x
        if idx.dim() == 0:
            raise ImportanceError("nn.Embedding got a 0-d index; importance needs a batch dimension")
        idx = idx.reshape(n, -1)
        d = delta.reshape(n, idx.shape[1], -1).float()
        sample = torch.arange(n, device=idx.device).unsqueeze(1).expand_as(idx)
        m = site.module
        keep = torch.ones_like(idx, dtype=torch.bool) if m.padding_idx is None else idx != m.padding_idx
        return idx[keep], d[keep], sample[keep]

    def _segments(self, site: Site, rows: Tensor, d: Tensor, group: Tensor) -> tuple[Tensor, Tensor]:
        """Sum Δ over equal (group, row) pairs; returns (row of each segment, segment sums)."""
        m = site.module
        keys = group * m.num_embeddings + rows
        uniq, inv = torch.unique(keys, return_inverse=True)
        seg = torch.zeros(uniq.numel(), d.shape[1], device=d.device, dtype=torch.float32)
        seg.index_add_(0, inv, d)
        if m.scale_grad_by_freq:
            counts = torch.bincount(inv, minlength=uniq.numel()).to(seg.dtype)
            seg /= counts.unsqueeze(1)
        return uniq % m.num_embeddings, seg

    def sample_abs(self, est, site, delta):
        if "weight" not in site.params:
            return
        rows, d, sample = self._flat(site, delta, est.n)
        uniq_rows, seg = self._segments(site, rows, d, sample)
        est.sum_of(site.params["weight"]).index_add_(0, uniq_rows, seg.abs())

    def batch_signed(self, est, site, delta):
        if "weight" not in site.params:
            return {}
        w = site.params["weight"]
        rows, d, _ = self._flat(site, delta, est.n)
        uniq_rows, seg = self._segments(site, rows, d, torch.zeros_like(rows))
        g = torch.zeros(w.shape, dtype=torch.float32, device=w.device)
        g.index_add_(0, uniq_rows, seg)
        return {"weight": g}

    def dense(self, est, site, delta, b0, b1):
        if "weight" not in site.params:
            return {}
        w = site.params["weight"]
        rows, d, sample = self._flat(site, delta, est.n)
        sel = (sample >= b0) & (sample < b1)
        uniq_rows, seg = self._segments(site, rows[sel], d[sel], sample[sel] - b0)
        keys = torch.unique((sample[sel] - b0) * w.shape[0] + rows[sel])
        g = torch.zeros(b1 - b0, *w.shape, dtype=torch.float32, device=w.device)
        g.view(-1, w.shape[1]).index_add_(0, keys, seg)
        return {"weight": g}


class GenericRule(Rule):
    """Any module: per-sample vector-Jacobian products of its own forward through torch.func."""

    def _call(self, site: Site, params: dict[str, Tensor], args, kwargs) -> list[Tensor]:
        from .distributed import without_fsdp_hooks

        module, params = without_fsdp_hooks(site.module, params)
        out = torch.func.functional_call(module, params, args, kwargs)
        return _tensor_leaves(out)

    def _split(self, site: Site, n: int):
        leaves, spec = tree_flatten((site.args, site.kwargs))
        batched = [isinstance(t, Tensor) and t.dim() > 0 and t.shape[0] == n for t in leaves]
        return leaves, spec, batched

    def dense(self, est, site, delta_unused, b0, b1):
        n = est.n
        leaves, spec, batched = self._split(site, n)
        live = [i for i, d in enumerate(site.deltas) if d is not None]
        names = list(site.params)
        detached = {k: p.detach() for k, p in (site.live or site.params).items()}

        def vjp_of_sample(params, sample_leaves, sample_deltas):
            full = list(leaves)
            it = iter(sample_leaves)
            for i, is_b in enumerate(batched):
                if is_b:
                    full[i] = next(it).unsqueeze(0)
            args, kwargs = tree_unflatten(full, spec)
            outs = self._call(site, params, args, kwargs)
            return sum((outs[i].float() * d.unsqueeze(0).float()).sum() for i, d in zip(live, sample_deltas))

        sample_leaves = [t[b0:b1] for t, is_b in zip(leaves, batched) if is_b]
        sample_deltas = [site.deltas[i][b0:b1] for i in live]
        grad_fn = torch.func.grad(vjp_of_sample)
        with est.recomputing():
            try:
                g = torch.func.vmap(grad_fn, in_dims=(None, 0, 0), randomness="same")(
                    detached, sample_leaves, sample_deltas
                )
            except Exception as exc:  # data-dependent control flow etc.: a per-sample loop, same maths
                est.notice_once(
                    ("vmap", type(site.module)),
                    "torch.func.vmap failed for %s (%s); using a per-sample loop for it",
                    type(site.module).__name__,
                    exc,
                )
                per = [
                    grad_fn(detached, [t[k] for t in sample_leaves], [d[k] for d in sample_deltas])
                    for k in range(b1 - b0)
                ]
                g = {name: torch.stack([p[name] for p in per]) for name in names}
        return {name: g[name].float() for name in names}

    def check(self, site, n, per_sample):
        if per_sample and _mixes_samples(site.module):
            raise ImportanceError(
                f"{type(site.module).__name__} in train mode mixes the samples of a batch, so per-sample "
                "importance is undefined; call model.eval() (the default eval_mode=True does) or use "
                "estimator='batch'"
            )
        if per_sample and not any(
            isinstance(t, Tensor) and t.dim() > 0 and t.shape[0] == n for t in _tensor_leaves((site.args, site.kwargs))
        ):
            raise ImportanceError(
                f"module {type(site.module).__name__} has no input with the batch dimension ({n}) first; "
                "per-sample importance cannot separate its samples (use estimator='batch')"
            )


def rule_for(module: nn.Module) -> Rule:
    if isinstance(module, nn.Linear):
        return _LINEAR
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        return _CONV
    if isinstance(module, nn.Embedding):
        return _EMBEDDING
    return _GENERIC


_LINEAR, _CONV, _EMBEDDING, _GENERIC = LinearRule(), ConvRule(), EmbeddingRule(), GenericRule()


# ----------------------------------------------------------------------------- the estimator

Activation = Callable[[Tensor], Tensor] | Mapping[str, Callable[[Tensor], Tensor]] | None


def resolve_activations(model: nn.Module, mode: str, activation: Activation) -> dict[int, Callable[[Tensor], Tensor]]:
    """Which Linear/Conv layers local MAS judges through an activation: ``{id(module): act}``.

    ``activation`` is one callable for every Linear/Conv layer, or a mapping from
    qualified module names or glob patterns to callables (layers not matched keep
    their pre-activation output).
    """
    if activation is None:
        return {}
    if mode != "local":
        raise ValueError("activation= applies to local MAS only (global MAS measures the model output)")
    layers = {name: m for name, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d))}
    if callable(activation):
        return {id(m): activation for m in layers.values()}
    if not isinstance(activation, Mapping):
        raise TypeError(f"activation must be a callable or a mapping of module names to callables, got {activation!r}")
    chosen: dict[int, Callable[[Tensor], Tensor]] = {}
    for pattern, act in activation.items():
        if not callable(act):
            raise TypeError(f"activation[{pattern!r}] is not callable")
        hits = [m for name, m in layers.items() if fnmatch.fnmatchcase(name, pattern)]
        if not hits:
            raise ValueError(
                f"activation key {pattern!r} matches no Linear/Conv layer; layers are e.g. {list(layers)[:5]}"
            )
        for m in hits:
            chosen[id(m)] = act
    return chosen


class Estimator:
    """Accumulates the sufficient statistics of one importance pass.

    ``update(batch)`` processes one batch; ``result()`` returns Ω = sums / counts.
    ``sums``/``counts`` (keyed by parameter name) can be merged across processes.
    """

    # global/batch: one autograd.grad w.r.t. the parameters (False: through the per-module rules)
    batch_by_autograd = True

    def __init__(
        self,
        model: nn.Module,
        mode: str = "global",
        estimator: str | None = None,
        output_fn: Callable[[Any], Tensor] | None = None,
        backend: str = "auto",
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        activation: Activation = None,
        precision: str = "accurate",
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        self.model = model
        self.mode, self.estimator = resolve_mode(mode, estimator)
        self._activation_of = resolve_activations(model, self.mode, activation)
        self.precision = resolve_precision(precision)
        from .distributed import check_sharded

        check_sharded(model, self.mode)
        self.output_fn = output_fn or default_output_fn
        self.backend = backend
        if chunk_bytes <= 0:
            raise ValueError(f"chunk_bytes must be positive, got {chunk_bytes}")
        self.chunk_bytes = int(chunk_bytes)
        # Parameters: named_parameters() lists a tied parameter once.
        self.names: dict[int, str] = {}
        self.params: dict[str, nn.Parameter] = {}
        self.frozen: list[str] = []
        for name, p in model.named_parameters():
            if p.requires_grad:
                self.names[id(p)] = name
                self.params[name] = p
            else:
                self.frozen.append(name)
        if not self.params:
            raise ImportanceError("the model has no trainable parameters (all have requires_grad=False)")
        self.owners: list[tuple[nn.Module, dict[str, nn.Parameter]]] = []
        for module in model.modules():
            own = {n: p for n, p in module.named_parameters(recurse=False) if p.requires_grad}
            if own:
                self.owners.append((module, own))
        self._device_type = next(iter(self.params.values())).device.type
        self.sums: dict[str, Tensor] = {}
        self.counts: dict[str, int] = {name: 0 for name in self.params}
        self.seen: set[str] = set()  # parameters some site reported
        self.samples = 0
        self.batches = 0
        self.n = 0
        self._sites: list[Site] | None = None
        self._clone = False
        self._recomputing = 0
        self._notices: set = set()

    # -- accumulators -----------------------------------------------------------
    def sum_of(self, p: Tensor) -> Tensor:
        name = self.names[id(p)]
        s = self.sums.get(name)
        if s is None:
            s = self.sums[name] = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
        return s

    def add_sum(self, p: Tensor, value: Tensor) -> None:
        self.sum_of(p).add_(value.to(torch.float32))

    def add_count(self, p: Tensor, count: int) -> None:
        self.counts[self.names[id(p)]] += int(count)

    def chunks(self, n: int, bytes_per_sample: int) -> list[slice]:
        step = max(1, self.chunk_bytes // max(1, bytes_per_sample))
        return [slice(i, min(n, i + step)) for i in range(0, n, step)]

    def notice_once(self, key, msg, *args) -> None:
        if key not in self._notices:
            self._notices.add(key)
            log.info("mas_local: " + msg, *args)

    class _Recomputing:
        def __init__(self, est):
            self.est = est

        def __enter__(self):
            self.est._recomputing += 1

        def __exit__(self, *exc):
            self.est._recomputing -= 1

    def recomputing(self):
        return Estimator._Recomputing(self)

    # -- capture ----------------------------------------------------------------
    def _tap(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        if self._sites is None or self._recomputing:
            return output
        own = self._own[id(module)]
        leaves, spec = tree_flatten(output)
        tensors = [t for t in leaves if isinstance(t, Tensor)]
        if self._clone:
            args = tuple(a.clone() if isinstance(a, Tensor) else a for a in args)
            kwargs = {k: (v.clone() if isinstance(v, Tensor) else v) for k, v in kwargs.items()}
        site = Site(module, own, args, kwargs, tensors, spec)
        # FSDP2: the generic rule re-runs the module, so it needs the full parameter values, which FSDP2
        # frees after the forward (Linear/Conv/Embedding rules never read parameter values).
        if rule_for(module) is _GENERIC:
            from .distributed import full_params

            site.live = full_params(module, own)
        site.versions = [t._version for t in _tensor_leaves((args, kwargs)) + tensors]
        self._sites.append(site)
        if self._clone:
            return tree_unflatten([t.clone() if isinstance(t, Tensor) else t for t in leaves], spec)
        return output

    def _attach(self) -> list:
        self._own = {id(m): own for m, own in self.owners}
        handles = []
        for module, _ in self.owners:
            if isinstance(module, _TapMixin):
                module._mas_tap = self._tap
            else:
                handles.append(module.register_forward_hook(self._tap, with_kwargs=True))
        return handles

    def _detach(self, handles: list) -> None:
        for h in handles:
            h.remove()
        for module, _ in self.owners:
            if isinstance(module, _TapMixin):
                module.__dict__.pop("_mas_tap", None)

    # -- one batch --------------------------------------------------------------
    def update(self, batch: Any) -> None:
        """Add one batch to the statistics.

        An error leaves the estimator unusable (partial sums) but never touches the model.
        """
        check_batch(self.model, batch, self.batches)
        n = batch_size(batch)
        self._update(batch, n)
        self.samples += n
        self.batches += 1

    def _forward(self, batch: Any, n: int) -> tuple[Tensor, list[Site]]:
        handles = self._attach()
        self._sites = []
        try:
            out = self.output_fn(call_model(self.model, batch))
            sites = self._sites
        finally:
            self._sites = None
            self._detach(handles)
        if not isinstance(out, Tensor):
            raise ImportanceError(f"output_fn returned {type(out).__name__}, expected a Tensor")
        if out.dim() == 0 or out.shape[0] != n:
            raise ImportanceError(
                f"the model output has shape {tuple(out.shape)}, which has no batch dimension of size {n}; "
                "MAS needs one output per sample (pass output_fn to select it)"
            )
        if not torch.isfinite(out).all():
            raise ImportanceError("the model output contains NaN or Inf values; importance would be meaningless")
        return out, sites

    def _needs_samples(self, rule: Rule) -> bool:
        """Whether this rule must separate the samples of a batch under the current estimator."""
        if self.estimator == "sample":
            return True
        if self.estimator == "hebbian":
            return not isinstance(rule, (LinearRule, ConvRule))
        return isinstance(rule, GenericRule) and self.mode == "local"

    def _versions_changed(self, sites: list[Site]) -> bool:
        for s in sites:
            now = [t._version for t in _tensor_leaves((s.args, s.kwargs)) + s.outputs]
            if now != s.versions:
                return True
        return False

    def _update(self, batch: Any, n: int) -> None:
        self.n = n
        if self.mode == "global" and self.estimator == "batch" and self.batch_by_autograd:
            self._global_batch(batch, n)
            return
        for attempt in range(2):
            self._clone = attempt == 1
            try:
                grad_ctx = torch.enable_grad() if self.mode == "global" else torch.no_grad()
                with grad_ctx:
                    out, sites = self._forward(batch, n)
                    for s in sites:
                        rule = rule_for(s.module)
                        rule.check(s, n, self._needs_samples(rule))
                    if self.mode == "global":
                        self._global_deltas(out, sites)
                    else:
                        for s in sites:
                            s.deltas = list(s.outputs)
                            act = self._activation_of.get(id(s.module))
                            if act is not None:
                                self._apply_activation(s, act)
                if self._versions_changed(sites):
                    if attempt == 0:
                        self.notice_once(
                            "inplace",
                            "a layer input or output was modified in place (e.g. ReLU(inplace=True)); "
                            "re-running with copies of the captured tensors",
                        )
                        continue
                    raise ImportanceError("captured tensors changed in place even on copies")
                # The forward may run under autocast (bf16 activations); the statistics are computed in fp32.
                with torch.autocast(self._device_type, enabled=False):
                    self._reduce(sites)
                return
            finally:
                self._clone = False

    @staticmethod
    def _apply_activation(site: Site, act: Callable[[Tensor], Tensor]) -> None:
        """Judge the layer by a = act(y): hebbian pairs |a| with |x|; sample/batch use Δ = ∂(½‖a‖²)/∂y."""
        y = site.outputs[0]
        with torch.enable_grad():
            leaf = y.detach().requires_grad_(True)
            a = act(leaf)
            if not isinstance(a, Tensor) or a.shape != y.shape:
                raise ImportanceError(
                    f"the activation for {type(site.module).__name__} must return a tensor of the layer's output "
                    f"shape {tuple(y.shape)}, got {tuple(a.shape) if isinstance(a, Tensor) else type(a).__name__}"
                )
            (delta,) = torch.autograd.grad(0.5 * a.float().pow(2).sum(), leaf, allow_unused=True)
        site.activated = a.detach()
        site.deltas[0] = torch.zeros_like(y) if delta is None else delta

    def _global_deltas(self, out: Tensor, sites: list[Site]) -> None:
        loss = out.float().pow(2).sum()
        targets: list[Tensor] = []
        for s in sites:
            for t in s.outputs:
                if t.requires_grad:
                    targets.append(t)
        covered = {id(p) for s in sites for p in s.params.values()}
        uncovered = [p for p in self.params.values() if id(p) not in covered]
        if not loss.requires_grad:
            raise ImportanceError("the model output does not depend on any trainable parameter")
        grads = torch.autograd.grad(loss, targets + uncovered, allow_unused=True)
        by_id = {id(t): g for t, g in zip(targets, grads[: len(targets)])}
        for s in sites:
            s.deltas = [by_id.get(id(t)) for t in s.outputs]
        used_outside = [self.names[id(p)] for p, g in zip(uncovered, grads[len(targets) :]) if g is not None]
        if used_outside:
            raise ImportanceError(
                "these parameters reach the output without passing through their own module's forward, so "
                f"per-sample gradients cannot be attributed to them: {used_outside}. Use estimator='batch' "
                "for this model, or freeze them (requires_grad=False)"
            )

    def _global_batch(self, batch: Any, n: int) -> None:
        with torch.enable_grad():
            out, _ = self._forward(batch, n)
            loss = out.float().pow(2).sum()
            if not loss.requires_grad:
                raise ImportanceError("the model output does not depend on any trainable parameter")
            names = list(self.params)
            grads = torch.autograd.grad(loss, [self.params[k] for k in names], allow_unused=True)
        for name, g in zip(names, grads):
            p = self.params[name]
            if g is not None:
                self.add_sum(p, g.float().abs())
            else:
                self.sum_of(p)
            self.counts[name] += n

    def _reduce(self, sites: list[Site]) -> None:
        n = self.n
        uses: dict[int, int] = {}
        for s in sites:
            for p in s.params.values():
                uses[id(p)] = uses.get(id(p), 0) + 1
                self.seen.add(self.names[id(p)])
        if self.estimator == "batch":
            signed: dict[int, Tensor] = {}
            for s in sites:
                d = s.delta()
                if d is None:
                    continue
                for name, g in rule_for(s.module).batch_signed(self, s, d).items():
                    p = s.params[name]
                    signed[id(p)] = g if id(p) not in signed else signed[id(p)] + g
            for pid, g in signed.items():
                self.add_sum(self.params[self.names[pid]], g.abs())
            self._count_samples(uses, n)
            return
        if self.estimator == "hebbian":
            for s in sites:
                rule = rule_for(s.module)
                if isinstance(rule, (LinearRule, ConvRule)):
                    rule.hebbian(self, s)
                    continue
                if isinstance(rule, GenericRule):
                    self._generic_sample(s)
                else:
                    rule.sample_abs(self, s, s.outputs[0])
                for p in s.params.values():
                    self.add_count(p, n)
            return
        # sample: parameters used at one site go through the fused rules; shared ones are summed densely.
        shared = {pid for pid, k in uses.items() if k > 1}
        for s in sites:
            if all(id(p) in shared for p in s.params.values()):
                continue
            rule = rule_for(s.module)
            if isinstance(rule, GenericRule):
                self._generic_sample(s, skip=shared)
            elif s.delta() is not None:
                if any(id(p) in shared for p in s.params.values()):
                    for name, g in rule.dense(self, s, s.delta(), 0, n).items():
                        if id(s.params[name]) not in shared:
                            self.add_sum(s.params[name], g.abs().sum(0))
                else:
                    rule.sample_abs(self, s, s.delta())
        if shared:
            self._shared_sample(sites, shared)
        self._count_samples(uses, n)

    def _generic_sample(self, s: Site, skip: set[int] = frozenset()) -> None:
        if all(d is None for d in s.deltas):
            return
        numel = sum(p.numel() for p in s.params.values())
        for c in self.chunks(self.n, bytes_per_sample=8 * numel):
            for name, g in _GENERIC.dense(self, s, None, c.start, c.stop).items():
                if id(s.params[name]) not in skip:
                    self.add_sum(s.params[name], g.abs().sum(0))

    def _shared_sample(self, sites: list[Site], shared: set[int]) -> None:
        numel = sum(self.params[self.names[pid]].numel() for pid in shared)
        for c in self.chunks(self.n, bytes_per_sample=8 * numel):
            total: dict[int, Tensor] = {}
            for s in sites:
                if not any(id(p) in shared for p in s.params.values()) or all(d is None for d in s.deltas):
                    continue
                for name, g in rule_for(s.module).dense(self, s, s.delta(), c.start, c.stop).items():
                    pid = id(s.params[name])
                    if pid in shared:
                        total[pid] = g if pid not in total else total[pid] + g
            for pid, g in total.items():
                self.add_sum(self.params[self.names[pid]], g.abs().sum(0))

    def _count_samples(self, uses: dict[int, int], n: int) -> None:
        for name, p in self.params.items():
            self.sum_of(p)
            self.counts[name] += n

    # -- checkpoints --------------------------------------------------------------
    def sum_shape(self, p: Tensor) -> torch.Size:
        """Shape of the sum kept for ``p`` (a subclass may keep only a shard)."""
        return p.shape

    def fingerprint(self) -> dict[str, Any]:
        """What a partial pass depends on: settings and the trainable parameters' names, shapes, dtypes."""
        return {
            "mode": self.mode,
            "estimator": self.estimator,
            "params": [[name, list(p.shape), str(p.dtype).replace("torch.", "")] for name, p in self.params.items()],
        }

    def state_dict(self) -> dict[str, Any]:
        """The partial statistics of this pass (sums, counts, samples, batches seen) and the fingerprint.

        Plain tensors, ints and strings only: loads with ``torch.load(weights_only=True)``.
        """
        return {
            "version": _CHECKPOINT_VERSION,
            "fingerprint": self.fingerprint(),
            "sums": {k: v.detach().cpu().clone() for k, v in self.sums.items()},
            "counts": dict(self.counts),
            "seen": sorted(self.seen),
            "samples": int(self.samples),
            "batches": int(self.batches),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume from :meth:`state_dict`; refuses a state from another model or other settings."""
        if not isinstance(state, Mapping) or "fingerprint" not in state or "sums" not in state:
            raise ValueError("not an importance-pass checkpoint (missing 'fingerprint'/'sums')")
        if state.get("version") != _CHECKPOINT_VERSION:
            raise ValueError(f"unsupported checkpoint version {state.get('version')!r}; expected {_CHECKPOINT_VERSION}")
        want, got = self.fingerprint(), state["fingerprint"]
        for key in ("mode", "estimator"):
            if got.get(key) != want[key]:
                raise ValueError(f"checkpoint was made with {key}={got.get(key)!r}, this pass uses {want[key]!r}")
        if [list(x) for x in got.get("params", [])] != want["params"]:
            theirs = {x[0]: x for x in got.get("params", [])}
            diff = [x for x in want["params"] if theirs.get(x[0]) != x]
            extra = sorted(set(theirs) - set(self.params))
            raise ValueError(
                "checkpoint is from another model: parameters differ in name, shape or dtype "
                f"(first mismatches: {diff[:3]}, unknown names: {extra[:3]})"
            )
        sums = {}
        for name, t in state["sums"].items():
            p = self.params.get(name)
            shape = tuple(self.sum_shape(p)) if p is not None else None
            if p is None or not isinstance(t, Tensor) or tuple(t.shape) != shape or t.dtype != torch.float32:
                raise ValueError(f"checkpoint sums for {name!r} do not match the parameter")
            sums[name] = t.to(p.device).clone()
        counts = state["counts"]
        if set(counts) != set(self.params):
            raise ValueError("checkpoint counts do not match the parameters")
        self.sums = sums
        self.counts = {k: int(counts[k]) for k in self.params}
        self.seen = set(state.get("seen", []))
        self.samples = int(state["samples"])
        self.batches = int(state["batches"])

    # -- result -----------------------------------------------------------------
    def uncovered(self) -> list[str]:
        """Trainable parameters whose module never ran (global batch covers all through autograd)."""
        if self.mode == "global" and self.estimator == "batch":
            return []
        return [name for name in self.params if name not in self.seen]

    def result(self) -> dict[str, Tensor]:
        """Ω per parameter name (float32). Raises if any value is not finite."""
        if self.batches == 0:
            raise ImportanceError("data yielded no batches; importance needs at least one")
        out = {}
        for name, p in self.params.items():
            s = self.sums.get(name)
            if s is None:
                s = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
            c = self.counts[name]
            omega = s / c if c > 0 else s.clone()
            if not torch.isfinite(omega).all():
                raise ImportanceError(f"importance of parameter {name!r} has NaN or Inf values")
            out[name] = omega
        missing = self.uncovered()
        if missing:
            log.warning("mas_local: these parameters' modules never ran, their importance is 0: %s", missing)
        return out


def compute_importance(
    model: nn.Module,
    data: Iterable[Any],
    mode: str = "global",
    estimator: str | None = None,
    output_fn: Callable[[Any], Tensor] | None = None,
    backend: str = "auto",
    *,
    eval_mode: bool = True,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    progress: bool = True,
    max_batches: int | None = None,
    sync: bool | None = None,
    process_group: Any = None,
    activation: Activation = None,
    precision: str = "accurate",
) -> dict[str, Tensor]:
    """Estimate MAS importance Ω for every trainable parameter of ``model``.

    Args:
        model: any ``nn.Module``; converted layers (:func:`mas_local.convert`) report
            from their own forward, all other modules through temporary hooks.
        data: an iterable of batches: a Tensor (``model(x)``), a tuple/list (the first
            element is the input; labels are never used) or a dict (``model(**batch)``).
        mode: ``"global"`` (gradients of the squared output norm) or ``"local"``
            (each layer judged by its own output).
        estimator: ``"sample"`` (paper-exact, per-sample; global default),
            ``"batch"`` (per-batch, as other libraries), ``"hebbian"`` (local default).
        output_fn: picks the output tensor from what the model returns (default:
            the tensor, its ``.logits``, or a tuple's first element).
        backend: ``"auto" | "torch" | "triton" | "ext"`` for the fused ops.
        eval_mode: run in ``eval()`` (default) and restore the previous mode afterwards.
        chunk_bytes: memory bound for the per-sample work of one layer call.
        progress: show a progress bar (tqdm; hidden when stderr is not a terminal).
        max_batches: stop after this many batches.
        sync: under ``torch.distributed`` each rank passes its own share of the data and
            the statistics are all-reduced, so every rank returns the Ω of all the data.
            ``None`` (default): sync when a process group with more than one rank is
            initialised; ``False``: this rank's data only; ``True``: require a group.
        process_group: the group to sync over (default: the world).
        activation: local mode only: judge Linear/Conv layers by ``act(y)`` instead of
            their pre-activation output ``y`` (one callable for all such layers, or a
            mapping from module names/glob patterns to callables).
        precision: operand precision of the abs-GEMM on GPUs: ``"accurate"`` (16-bit
            operands as given, fp32 as TF32), ``"exact"`` (fp32) or ``"fast"`` (fp8 with
            scales where the GPU has it; Ω error ≤ 1e-2). CPU backends are always exact.

    Returns:
        ``{parameter name: Ω}``, float32, on each parameter's device. Parameters with
        ``requires_grad=False`` are left out (and logged).
    """
    from . import distributed

    group = distributed.resolve_group(sync, process_group)
    est = distributed.make_estimator(
        distributed.unwrap(model),
        mode,
        estimator,
        output_fn,
        backend,
        chunk_bytes,
        group,
        activation=activation,
        precision=precision,
    )
    run_pass(est, data, eval_mode=eval_mode, progress=progress, max_batches=max_batches, allow_empty=group is not None)
    if group is not None:
        distributed.sync_estimator(est, group)
    return est.result()


def run_pass(
    est: Estimator,
    data: Iterable[Any],
    *,
    eval_mode: bool = True,
    progress: bool = True,
    max_batches: int | None = None,
    start: int = 0,
    on_batch: Callable[[Estimator], None] | None = None,
    allow_empty: bool = False,
) -> Estimator:
    """Feed ``data`` (skipping the first ``start`` batches) into ``est``; restores the model's mode.

    ``on_batch(est)`` runs after each batch (checkpointing); ``allow_empty`` lets a rank
    with no data of its own take part in a distributed pass.
    """
    if isinstance(data, (Tensor, Mapping)):
        raise TypeError("data must be an iterable of batches (e.g. a DataLoader or a list of tensors), not one batch")
    if est.frozen:
        log.info("mas_local: skipping %d parameters with requires_grad=False: %s", len(est.frozen), est.frozen)
    model = est.model
    was_training = {m: m.training for m in model.modules()}
    if eval_mode:
        model.eval()
    try:
        from tqdm.auto import tqdm

        total = len(data) if hasattr(data, "__len__") else None
        bar = tqdm(
            data, total=total, desc=f"MAS {est.mode}/{est.estimator}", disable=None if progress else True, leave=False
        )
        for i, batch in enumerate(bar):
            if i < start:
                continue
            if max_batches is not None and i >= max_batches:
                break
            est.update(batch)
            if on_batch is not None:
                on_batch(est)
    finally:
        for m, t in was_training.items():
            m.training = t
        from .distributed import reshard

        reshard(model)  # FSDP2 keeps the root unsharded after a forward without backward
    if est.batches == 0 and not allow_empty:
        raise ImportanceError("data yielded no batches; importance needs at least one")
    if math.isnan(float(est.samples)):
        raise ImportanceError("internal error: sample count is NaN")
    return est
