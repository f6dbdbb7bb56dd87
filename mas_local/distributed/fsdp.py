"""FSDP2 (``fully_shard``) and DTensor helpers shared by the importance pass and the regulariser.

Nothing here imports the importance engine, so the engine can use it.
"""

from __future__ import annotations

from typing import Any

import torch.distributed as dist
from torch import Tensor, nn

try:  # torch >= 2.4
    from torch.distributed.tensor import DTensor, distribute_tensor
except ImportError:  # pragma: no cover
    DTensor = None
    distribute_tensor = None


def is_dtensor(t: Any) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def shard_of(t: Tensor) -> Tensor:
    """This rank's shard of a DTensor (the tensor itself otherwise)."""
    return t.to_local() if is_dtensor(t) else t


def shard_like(full: Tensor, param: Tensor) -> Tensor:
    """A full-size tensor (identical on all ranks) laid out like ``param``: a DTensor shard if it is one."""
    if not is_dtensor(param):
        return full
    # Every rank holds the same full tensor, so each takes its own piece without communication.
    return distribute_tensor(full.detach(), param.device_mesh, param.placements, src_data_rank=None)


def shard_groups(param: Tensor) -> list[Any]:
    """Process groups over which a parameter is sharded (a penalty value is summed over them)."""
    if not is_dtensor(param):
        return []
    mesh = param.device_mesh
    return [mesh.get_group(i) for i, placement in enumerate(param.placements) if placement.is_shard()]


def sum_over_shards(values: dict[tuple, Tensor]) -> Tensor:
    """Sum per-shard-group partial values: each key is a tuple of groups to all-reduce that value over."""
    total = None
    for groups, v in values.items():
        v = v.detach().clone()
        for g in groups:
            dist.all_reduce(v, group=g)
        total = v if total is None else total + v
    return total


def reshard(model: nn.Module) -> bool:
    """Put FSDP2 modules back in their sharded state (a forward without backward leaves the root unsharded).

    Returns whether the model has FSDP2-sharded (DTensor) parameters.
    """
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover
        return False
    found = False
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()
            found = True
    return found and any(is_dtensor(p) for p in model.parameters())


def _reshards_after_forward(module) -> bool:
    """Whether an FSDP2 module frees its unsharded parameters after forward (private state; True if unknown)."""
    try:
        state = module._get_fsdp_state()
        groups = getattr(state, "_fsdp_param_groups", None)
        if groups is None:
            group = getattr(state, "_fsdp_param_group", None)
            groups = [group] if group is not None else []
        return any(g.post_forward_mesh_info is not None for g in groups)
    except Exception:  # pragma: no cover - another torch version's internals
        return True


class HoldUnsharded:
    """Keep FSDP2 parameters unsharded from the forward to the end of the importance backward of one batch.

    Global mode back-propagates to each layer's output with ``torch.autograd.grad``, which does not
    drive FSDP2's re-gathering backward hooks; so for each batch the gathered parameters stay alive
    (like ``reshard_after_forward=False``) and are freed afterwards. Costs the unsharded model per rank
    during one batch of a global pass.
    """

    def __init__(self, model: nn.Module):
        from torch.distributed.fsdp import FSDPModule

        self.saved = [(m, _reshards_after_forward(m)) for m in model.modules() if isinstance(m, FSDPModule)]

    def __enter__(self):
        for m, _ in self.saved:
            m.set_reshard_after_forward(False, recurse=False)

    def __exit__(self, *exc):
        for m, was in self.saved:
            m.set_reshard_after_forward(was, recurse=False)
        for m, _ in self.saved:
            m.reshard()


class _Bare(nn.Module):
    """Runs a module's own ``forward`` without its hooks (FSDP2's would re-gather and swap parameters)."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, *args, **kwargs):
        return self.inner.forward(*args, **kwargs)


def without_fsdp_hooks(module: nn.Module, params: dict[str, Tensor]) -> tuple[nn.Module, dict[str, Tensor]]:
    """For re-running a module functionally: the module and parameter names to pass to functional_call.

    A module with pre-hooks (FSDP2's re-gather and swap parameters; a user's pre-hook has already changed the
    captured arguments) is re-run through its ``forward`` alone; its children keep their hooks, which are part
    of that forward. A module's forward hooks are kept: the capture records what they return.
    """
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover
        FSDPModule = ()
    # mas-local's own pre-hooks (the usage probe riding along, the capture's layout tracking) are not the user's
    theirs = [
        h for h in module._forward_pre_hooks.values() if not getattr(h, "__module__", "").startswith("mas_local.")
    ]
    hooked = theirs or isinstance(module, FSDPModule)
    if not hooked:
        return module, params
    return _Bare(module), {f"inner.{k}": v for k, v in params.items()}


def full_params(module: nn.Module, own: dict[str, Tensor]) -> dict[str, Tensor] | None:
    """Copies of the full parameter values a module used in its forward, when they are not ``own`` (FSDP2).

    Inside the forward FSDP2 swaps in unsharded parameters (copied here); once a module's own
    post-forward hook has re-sharded them, the sharded DTensors are gathered (a collective, issued
    in the same module order on every rank). ``None`` for ordinary modules.
    """
    current = {k: module.get_parameter(k) if "." in k else getattr(module, k, p) for k, p in own.items()}
    if all(t is own[k] and not is_dtensor(t) for k, t in current.items()):
        return None
    return {k: (t.full_tensor() if is_dtensor(t) else t).detach().clone() for k, t in current.items()}


def _param_groups(module: nn.Module) -> list:
    state = module._get_fsdp_state()
    groups = getattr(state, "_fsdp_param_groups", None)
    if groups is None:
        group = getattr(state, "_fsdp_param_group", None)
        groups = [group] if group is not None else []
    return list(groups)


def unsharded_names(model: nn.Module, names: dict[int, str]) -> dict[int, str]:
    """FSDP2: ``{id(unsharded parameter): name}`` for the registered (sharded) parameters named in ``names``.

    Inside every forward FSDP2 swaps in an unsharded ``nn.Parameter`` per parameter, created by its first
    all-gather and reused after (private state, torch 2.13): the usage probe follows reads by identity, so
    it needs these objects' names. Unshards and reshards every FSDP2 module once (collectives, in module
    order on every rank) so that they exist.
    """
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for m in units:
        m.unshard()
    out: dict[int, str] = {}
    for m in units:
        for group in _param_groups(m):
            for fsdp_param in getattr(group, "fsdp_params", ()):
                name = names.get(id(getattr(fsdp_param, "sharded_param", None)))
                unsharded = getattr(fsdp_param, "_unsharded_param", None)
                if name is not None and unsharded is not None:
                    out[id(unsharded)] = name
    for m in units:
        m.reshard()
    return out
