"""Any module: per-sample vector-Jacobian products of its own forward, through ``torch.func``.

For each sample k the module is re-run on that sample alone (``vmap`` over the batch
dimension of every batched input, :mod:`..layouts`) and ``torch.func.grad`` gives
∂⟨y_k, Δ_k⟩/∂θ for the requested parameters; the names may reach into children
(``out_proj.weight``, ``parametrizations.weight.original0``). When ``vmap`` cannot run
the module (data-dependent control flow), a per-sample loop computes the same.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from ...distributed.fsdp import without_fsdp_hooks
from ...errors import ImportanceError, LayoutError
from ..layouts import FLAT
from ..leaves import tensor_leaves
from ..statistics import sum_dtype
from .base import Rule, work_dtype


def mixes_samples(module: nn.Module) -> bool:
    """BatchNorm normalises with batch statistics in train mode (and always without running stats)."""
    return isinstance(module, nn.modules.batchnorm._BatchNorm) and (module.training or module.running_mean is None)


class GenericRule(Rule):
    param_names = None
    reruns_module = True

    def check(self, acc, site, per_sample):
        if not per_sample or acc.batch_samples == 1:  # one sample: the call is its own, whatever its layout
            return
        name = f"'{site.path}' ({type(site.module).__name__})"
        if mixes_samples(site.module):
            raise ImportanceError(
                f"{name} in train mode mixes the samples of a batch, so per-sample importance is undefined; "
                "call model.eval() (the default eval_mode=True does) or use estimator='batch'"
            )
        if not site.batched:
            raise LayoutError(
                f"module {name} has no input with the batch dimension ({acc.batch_samples} samples); per-sample "
                "importance cannot separate its samples (use estimator='batch')"
            )
        for i, d in enumerate(site.deltas):
            if d is not None and site.out_dims[i] is None:
                raise LayoutError(
                    f"module {name} returns a tensor of shape {tuple(site.outputs[i].shape)} without the batch "
                    "dimension that the output depends on; per-sample importance cannot split it "
                    "(use estimator='batch')"
                )

    def per_sample_grads(self, acc, site, params, rows):
        if acc.batch_samples == 1:  # one sample: its gradient is the call's, whatever the call's layout
            return {name: g.unsqueeze(0) for name, g in self.batch_grads(acc, site, params).items()}
        try:
            return self._per_sample_grads(acc, site, params, rows)
        except ImportanceError:
            raise
        except Exception as exc:  # the module does not run on one sample's slices: its samples are not separable
            raise LayoutError(
                f"module '{site.path}' ({type(site.module).__name__}) cannot be re-run on one sample's slices "
                f"of its call ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
            ) from exc

    def _per_sample_grads(self, acc, site, params, rows):
        leaves, spec = tree_flatten((site.args, site.kwargs))
        live = [i for i, d in enumerate(site.deltas) if d is not None]
        dt = work_dtype(*[site.deltas[i] for i in live])
        values = {k: (site.live[k] if site.live and k in site.live else p).detach() for k, p in params.items()}
        module, values = without_fsdp_hooks(site.module, values)
        names = list(params)
        count = rows.stop - rows.start
        batched = [i for i, dim in enumerate(site.in_dims) if dim is not None]
        sample_leaves, sample_dims = _split(
            site, [leaves[i] for i in batched], [site.in_dims[i] for i in batched], rows
        )
        sample_deltas, delta_dims = _split(site, [site.deltas[i] for i in live], [site.out_dims[i] for i in live], rows)

        def loss_of_sample(values, sample_leaves, sample_deltas):
            full = list(leaves)
            for i, t in zip(batched, sample_leaves):
                full[i] = _one_sample(t, site.in_dims[i])
            args, kwargs = tree_unflatten(full, spec)
            outs = tensor_leaves(torch.func.functional_call(module, values, args, kwargs))
            return sum(
                (outs[i].to(dt) * _one_sample(d, site.out_dims[i]).to(dt)).sum() for i, d in zip(live, sample_deltas)
            )

        grad_fn = torch.func.grad(loss_of_sample)
        try:
            g = torch.func.vmap(grad_fn, in_dims=(None, sample_dims, delta_dims), randomness="same")(
                values, sample_leaves, sample_deltas
            )
        except Exception as exc:  # data-dependent control flow etc.: a per-sample loop, same maths
            acc.notice_once(
                ("vmap", type(site.module)),
                "torch.func.vmap failed for %s (%s); using a per-sample loop for it",
                type(site.module).__name__,
                exc,
            )
            # plain autograd per sample: also runs modules whose hooks functorch refuses (requires_grad_)
            per = []
            for k in range(count):
                leaves_k = [t.select(dim, k) for t, dim in zip(sample_leaves, sample_dims)]
                deltas_k = [d.select(dim, k) for d, dim in zip(sample_deltas, delta_dims)]
                with torch.enable_grad():
                    inputs = {key: v.detach().requires_grad_(True) for key, v in values.items()}
                    loss = loss_of_sample(inputs, leaves_k, deltas_k)
                    grads = torch.autograd.grad(loss, list(inputs.values()), allow_unused=True)
                per.append(
                    {key: torch.zeros_like(v) if gr is None else gr for (key, v), gr in zip(inputs.items(), grads)}
                )
            g = {key: torch.stack([p[key] for p in per]) for key in values}
        keys = list(values)
        return {name: g[key].to(dt) for name, key in zip(names, keys)}

    def batch_grads(self, acc, site, params):
        """Σ_k g_k by one re-run of the module on the whole batch (no per-sample split needed).

        Buffers are passed as copies, so a module in train mode (BatchNorm) does not update
        its running statistics a second time.
        """
        live = [i for i, d in enumerate(site.deltas) if d is not None]
        values = {k: (site.live[k] if site.live and k in site.live else p).detach() for k, p in params.items()}
        names = list(params)
        buffers = {k: b.clone() for k, b in site.module.named_buffers()}
        with torch.enable_grad():
            leaves = [v.requires_grad_(True) for v in values.values()]
            module, call_values = without_fsdp_hooks(site.module, {**values, **buffers})
            outs = tensor_leaves(torch.func.functional_call(module, call_values, site.args, site.kwargs))
            dt = work_dtype(*[site.deltas[i] for i in live])
            loss = sum((outs[i].to(dt) * site.deltas[i].to(dt)).sum() for i in live)
            if isinstance(loss, Tensor) and loss.requires_grad:
                grads = torch.autograd.grad(loss, leaves, allow_unused=True)
            else:
                grads = [None] * len(leaves)
        return {
            name: (torch.zeros(p.shape, dtype=sum_dtype(p), device=p.device) if g is None else g)
            for name, p, g in zip(names, params.values(), grads)
        }


def _split(site, tensors: list[Tensor], dims: list, rows: slice) -> tuple[list[Tensor], list[int]]:
    """Samples ``rows`` of each tensor, and the dimension vmap maps over (flattened tokens become [B, T, ...])."""
    out, vmap_dims = [], []
    for t, dim in zip(tensors, dims):
        if dim == FLAT:
            t, dim = site.batch_first(t, FLAT), 0
        out.append(t.narrow(dim, rows.start, rows.stop - rows.start))
        vmap_dims.append(dim)
    return out, vmap_dims


def _one_sample(t: Tensor, dim) -> Tensor:
    """One sample's slice as the module sees it: a batch of one, or its own tokens ``[T, ...]`` when flattened."""
    return t if dim == FLAT else t.unsqueeze(dim)
