"""MAS at scale: data parallel (DDP), sharded models (FSDP2), resumable passes, memory accounting.

Data parallel. Each rank runs the importance pass on its own share of the data;
the sufficient statistics (per-parameter float32 sums, counts, samples, batches)
are then all-reduced, so every rank ends with the Ω a single process would get on
all the data (up to float summation order). A ``DistributedDataParallel`` (or
``DataParallel``) wrapper is looked through: estimation runs on ``.module``
(running DDP's forward without its backward would leave its reducer waiting), and
MAS names parameters as the *inner* module does (no ``module.`` prefix), so
``MAS(ddp_model)`` and ``MAS(ddp_model.module)`` have identical state dicts.

Sharded models. With FSDP2 (``fully_shard``) parameters are ``DTensor`` shards;
Ω and θ* are stored as ``DTensor`` with the parameter's mesh and placements (each
rank keeps only its shard); the penalty runs on the local shards and its value is
summed over the sharded mesh dimensions. The importance pass (``ShardedEstimator``)
keeps only the local shard of its float32 sums: contributions go to bounded
full-size pending buffers that are all-reduced and cut to the shard.

The rest: atomic checkpoint files for resumable passes, and the memory report.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .importance import Estimator

SYNC_BUCKET_BYTES = 64 << 20

try:  # torch >= 2.4
    from torch.distributed.tensor import DTensor, distribute_tensor
except ImportError:  # pragma: no cover
    DTensor = None
    distribute_tensor = None


# ----------------------------------------------------------------------------- wrappers and groups


def unwrap(model: nn.Module) -> nn.Module:
    """The module MAS estimates and names parameters by: DDP / DataParallel wrappers are looked through."""
    wrappers = (nn.parallel.DistributedDataParallel, nn.DataParallel)
    while isinstance(model, wrappers):
        model = model.module
    return model


def resolve_group(sync: bool | None, process_group: Any = None) -> Any:
    """The process group to all-reduce statistics over, or ``None`` for a single-process pass."""
    if sync not in (None, True, False):
        raise ValueError(f"sync must be None, True or False, got {sync!r}")
    if sync is False:
        return None
    ready = dist.is_available() and dist.is_initialized()
    if not ready:
        if sync:
            raise RuntimeError("sync=True needs an initialised torch.distributed process group")
        return None
    group = process_group if process_group is not None else dist.group.WORLD
    if dist.get_world_size(group) <= 1:
        return None
    return group


def sync_estimator(est, group: Any, bucket_bytes: int = SYNC_BUCKET_BYTES) -> None:
    """All-reduce an Estimator's sums, counts, samples, batches and coverage over ``group`` in place.

    Every rank must call this with an estimator of the same model and settings; the
    sums travel in flat float32 buckets of at most ``bucket_bytes``.
    """
    names = list(est.params)
    presynced = getattr(est, "sharded", set())  # FSDP2 shards: already all-reduced batch by batch
    for name in names:
        if name not in presynced:
            est.sum_of(est.params[name])  # ranks that never saw a parameter contribute zeros
    by_device: dict[torch.device, list[str]] = {}
    for name in names:
        if name in presynced:
            continue
        by_device.setdefault(est.sums[name].device, []).append(name)
    for names_on_dev in by_device.values():
        bucket: list[str] = []
        size = 0
        for name in names_on_dev + [None]:
            if name is not None and (not bucket or size + 4 * est.sums[name].numel() <= bucket_bytes):
                bucket.append(name)
                size += 4 * est.sums[name].numel()
                continue
            flat = torch.cat([est.sums[k].reshape(-1) for k in bucket])
            dist.all_reduce(flat, group=group)
            offset = 0
            for k in bucket:
                n = est.sums[k].numel()
                est.sums[k].copy_(flat[offset : offset + n].view_as(est.sums[k]))
                offset += n
            bucket, size = ([name], 4 * est.sums[name].numel()) if name is not None else ([], 0)
    device = local(est.params[names[0]]).device
    meta = torch.tensor(
        [est.counts[k] for k in names] + [int(k in est.seen) for k in names] + [est.samples, est.batches],
        dtype=torch.int64,
        device=device,
    )
    dist.all_reduce(meta, group=group)
    values = meta.tolist()
    n = len(names)
    est.counts = {k: int(values[i]) for i, k in enumerate(names)}
    est.seen = {k for i, k in enumerate(names) if values[n + i] > 0}
    est.samples, est.batches = int(values[2 * n]), int(values[2 * n + 1])


# ----------------------------------------------------------------------------- sharded tensors (FSDP2)


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


def check_sharded(model: nn.Module, mode: str) -> None:
    """FSDP2 models: put the parameters back in their sharded state before a pass collects them."""
    reshard(model)


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


class _HoldUnsharded:
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
    """For re-running an FSDP2 module functionally: the module and parameter names to pass to functional_call."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover
        return module, params
    if not isinstance(module, FSDPModule):
        return module, params
    return _Bare(module), {f"inner.{k}": v for k, v in params.items()}


def full_params(module: nn.Module, own: dict[str, Tensor]) -> dict[str, Tensor] | None:
    """Copies of the full parameter values a module used in its forward, when they are not ``own`` (FSDP2).

    Inside the forward FSDP2 swaps in unsharded parameters (copied here); once a module's own
    post-forward hook has re-sharded them, the sharded DTensors are gathered (a collective, issued
    in the same module order on every rank). ``None`` for ordinary modules.
    """
    current = {k: getattr(module, k, p) for k, p in own.items()}
    if all(t is own[k] and not is_dtensor(t) for k, t in current.items()):
        return None
    return {k: (t.full_tensor() if is_dtensor(t) else t).detach().clone() for k, t in current.items()}


def is_dtensor(t: Any) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def local(t: Tensor) -> Tensor:
    """The local shard of a DTensor (the tensor itself otherwise)."""
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
    return [mesh.get_group(i) for i, pl in enumerate(param.placements) if pl.is_shard()]


def sum_over_shards(values: dict[tuple, Tensor]) -> Tensor:
    """Sum per-shard-group partial values: each key is a tuple of groups to all-reduce that value over."""
    total = None
    for groups, v in values.items():
        v = v.detach().clone()
        for g in groups:
            dist.all_reduce(v, group=g)
        total = v if total is None else total + v
    return total


def sharded_penalty(mas) -> Tensor:
    """``λ Σ Ω (θ − θ*)²`` for sharded parameters: local shards, value summed over the shard groups.

    The gradient flows only through this rank's own terms (coefficient 1): the
    all-reduced remainder is detached, so backward does not multiply the penalty
    gradient by the number of ranks.
    """
    parts: dict[tuple, Tensor] = {}
    for _, p, anchor, omega in mas._terms():
        term = (local(omega).float() * (local(p).float() - local(anchor).float()).pow(2)).sum()
        key = tuple(shard_groups(p))
        parts[key] = parts[key] + term if key in parts else term
    if not parts:
        return torch.zeros((), device=local(next(iter(mas.params.values()))).device)
    mine = sum(parts.values())
    total = sum_over_shards(parts)
    return mas.lam * (mine + (total - mine.detach()))


def sharded_add_penalty_grad_(mas, terms) -> Tensor:
    """The fused penalty on local shards (grad shards updated in place); value summed over the shard groups."""
    from . import ops

    groups: dict[tuple, list] = {}
    for _, p, anchor, omega in terms:
        groups.setdefault(tuple(shard_groups(p)), []).append((p, anchor, omega))
    parts = {}
    with torch.no_grad():
        for key, items in groups.items():
            parts[key] = ops.penalty_grad_(
                [local(p.grad) for p, _, _ in items],
                [local(p.detach()) for p, _, _ in items],
                [local(a) for _, a, _ in items],
                [local(o) for _, _, o in items],
                mas.lam,
                mas.backend,
            )
        return sum_over_shards(parts)


def make_estimator(model, mode, estimator, output_fn, backend, chunk_bytes, group=None, **options):
    """An :class:`~mas_local.importance.Estimator`, or a :class:`ShardedEstimator` for FSDP2 models.

    ``options`` are the Estimator's keyword settings (``activation``, ``precision``).
    """
    if any(is_dtensor(p) for p in model.parameters()):
        return ShardedEstimator(model, mode, estimator, output_fn, backend, chunk_bytes, group=group, **options)
    return Estimator(model, mode, estimator, output_fn, backend, chunk_bytes, **options)


class ShardedEstimator(Estimator):
    """Keeps only this rank's shard of the float32 sums of FSDP2 (DTensor) parameters.

    The rules write a parameter's contribution into a full-size pending buffer;
    pending buffers are all-reduced over the sync group and cut to the local shard
    when they would exceed ``flush_bytes`` and after every batch. The transient
    full-size memory is thus ``flush_bytes`` plus one parameter, not the model.
    Every rank must run the same batches count (FSDP2 requires it for the forward
    anyway): the flushes are collectives issued in the same order on all ranks.
    """

    def __init__(self, *args, group=None, flush_bytes=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.group = group
        self.flush_bytes = SYNC_BUCKET_BYTES if flush_bytes is None else int(flush_bytes)
        self.sharded = {n for n, p in self.params.items() if is_dtensor(p)}
        self._pending: dict[str, Tensor] = {}
        self._pending_bytes = 0

    def sum_shape(self, p):
        return local(p).shape if self.names[id(p)] in self.sharded else p.shape

    def sum_of(self, p):
        name = self.names[id(p)]
        if name not in self.sharded:
            return super().sum_of(p)
        buf = self._pending.get(name)
        if buf is None:
            size = 4 * p.numel()
            if self._pending and self._pending_bytes + size > self.flush_bytes:
                self.flush()
            buf = self._pending[name] = torch.zeros(p.shape, dtype=torch.float32, device=local(p).device)
            self._pending_bytes += size
        return buf

    def flush(self) -> None:
        """All-reduce the pending full-size contributions and add this rank's shard to the sums."""
        if not self._pending:
            return
        names = list(self._pending)  # the same order on every rank
        flat = torch.cat([self._pending[n].reshape(-1) for n in names])
        self._pending, self._pending_bytes = {}, 0
        if self.group is not None:
            dist.all_reduce(flat, group=self.group)
        offset = 0
        for n in names:
            p = self.params[n]
            full = flat[offset : offset + p.numel()].view(p.shape)
            offset += p.numel()
            shard = shard_like(full, p).to_local()
            if n in self.sums:
                self.sums[n].add_(shard)
            else:
                self.sums[n] = shard.clone()

    batch_by_autograd = False  # the sharded parameters are not in the graph: use the per-module rules

    def update(self, batch) -> None:
        if self.mode == "global":
            with _HoldUnsharded(self.model):
                super().update(batch)
        else:
            super().update(batch)
        self.flush()

    def _count_samples(self, uses, n):
        for name in self.params:  # no materialising of full-size buffers
            self.counts[name] += n

    def result(self):
        self.flush()
        out = super().result()
        for n in self.sharded:
            p = self.params[n]
            omega = out[n] if out[n].shape == local(p).shape else torch.zeros_like(local(p), dtype=torch.float32)
            out[n] = DTensor.from_local(omega, p.device_mesh, p.placements, shape=p.shape, stride=p.stride())
        return out


# ----------------------------------------------------------------------------- checkpoints


def rank_path(path: str | os.PathLike, group: Any) -> str:
    """One checkpoint file per rank in a synced pass (each rank holds partial statistics of its data)."""
    path = os.fspath(path)
    if group is None:
        return path
    return f"{path}.rank{dist.get_rank(group)}-of-{dist.get_world_size(group)}"


def save_atomic(obj: Any, path: str) -> None:
    """``torch.save`` to a temporary file in the same folder, then ``os.replace``: never a torn checkpoint."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


# ----------------------------------------------------------------------------- memory report


_UNITS = ((1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB"))


def _fmt(n: float) -> str:
    for scale, unit in _UNITS:
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


class MemoryReport(dict):
    """A dict (see :meth:`mas_local.MAS.memory_report`) that prints as a table."""

    def __str__(self) -> str:
        rows = [("parameter", "numel", "local", "omega", "theta*", "estimation")]
        for name, r in self["params"].items():
            rows.append(
                (
                    name,
                    str(r["numel"]),
                    str(r["local_numel"]),
                    _fmt(r["omega"]),
                    _fmt(r["anchor"]),
                    _fmt(r["estimation"]),
                )
            )
        t = self["total"]
        rows.append(
            (
                "total",
                str(t["numel"]),
                str(t["local_numel"]),
                _fmt(t["omega"]),
                _fmt(t["anchor"]),
                _fmt(t["estimation"]),
            )
        )
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = [
            "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows
        ]
        lines.insert(1, "-" * len(lines[0]))
        lines.insert(len(lines) - 1, "-" * len(lines[0]))
        b = self["bytes_per_param"]
        lines.append(
            f"per parameter: omega {b['omega']:.3f} B + theta* {b['anchor']:.3f} B = {b['persistent']:.3f} B kept; "
            f"+ {b['estimation']:.3f} B during consolidation (omega_dtype={self['omega_dtype']})"
        )
        for dev, d in self["devices"].items():
            lines.append(
                f"{dev}: kept {_fmt(d['persistent'])}, consolidation peak {_fmt(d['persistent'] + d['estimation'])}"
            )
        return "\n".join(lines)


def memory_report(mas) -> MemoryReport:
    """Bytes MAS adds on this rank's devices: Ω, θ*, and the transient estimation buffers.

    Sizes are those of the stored tensors once consolidated (Ω in ``omega_dtype``,
    θ* in the parameter's dtype, local shards for sharded parameters); before the
    first consolidation they are what consolidation will allocate. ``estimation``
    is the float32 sum the importance pass keeps per parameter (a local shard for
    sharded parameters) — transient, freed after :meth:`consolidate`. ``workspace``
    per device bounds the rest: ``chunk_bytes`` of per-sample work, plus for FSDP2
    the pending full-size buffers (``SYNC_BUCKET_BYTES`` and the largest parameter).
    """
    params: dict[str, dict[str, Any]] = {}
    devices: dict[str, dict[str, int]] = {}
    omega_size = torch.empty((), dtype=mas.omega_dtype).element_size()
    tot = {"numel": 0, "local_numel": 0, "omega": 0, "anchor": 0, "estimation": 0}
    for name, p in mas.params.items():
        lp = local(p.detach())
        numel, local_numel = p.numel(), lp.numel()
        omega_t, anchor_t = mas.importance.get(name), mas.anchors.get(name)
        omega_b = (
            local(omega_t).numel() * local(omega_t).element_size() if omega_t is not None else local_numel * omega_size
        )
        anchor_b = (
            local(anchor_t).numel() * local(anchor_t).element_size()
            if anchor_t is not None
            else local_numel * lp.element_size()
        )
        est_b = 4 * (local_numel if is_dtensor(p) else numel)
        params[name] = {
            "numel": numel,
            "local_numel": local_numel,
            "omega": omega_b,
            "anchor": anchor_b,
            "estimation": est_b,
            "device": str(lp.device),
        }
        d = devices.setdefault(str(lp.device), {"omega": 0, "anchor": 0, "persistent": 0, "estimation": 0})
        d["omega"] += omega_b
        d["anchor"] += anchor_b
        d["persistent"] += omega_b + anchor_b
        d["estimation"] += est_b
        for k, v in (("numel", numel), ("local_numel", local_numel), ("omega", omega_b), ("anchor", anchor_b)):
            tot[k] += v
        tot["estimation"] += est_b
    largest = max((4 * p.numel() for p in mas.params.values() if is_dtensor(p)), default=0)
    for d in devices.values():
        d["workspace"] = int(mas.chunk_bytes) + (SYNC_BUCKET_BYTES + largest if largest else 0)
    n = max(1, tot["numel"])
    return MemoryReport(
        params=params,
        devices=devices,
        total=tot,
        omega_dtype=str(mas.omega_dtype).replace("torch.", ""),
        bytes_per_param={
            "omega": tot["omega"] / n,
            "anchor": tot["anchor"] / n,
            "persistent": (tot["omega"] + tot["anchor"]) / n,
            "estimation": tot["estimation"] / n,
        },
    )
