"""What MAS keeps in memory: Ω, θ* and the transient sums of a pass, per parameter and device."""

from __future__ import annotations

from typing import Any

import torch

from ..importance.statistics import sum_dtype
from .fsdp import is_dtensor, shard_of
from .groups import SYNC_BUCKET_BYTES

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
    is the float32 sum (float64 for a float64 parameter) the importance pass keeps per parameter (a local shard for
    sharded parameters) — transient, freed after :meth:`consolidate`. ``workspace``
    per device bounds the rest: ``chunk_bytes`` of per-sample work, plus for FSDP2
    the pending full-size buffers (``SYNC_BUCKET_BYTES`` and the largest parameter).
    """
    params: dict[str, dict[str, Any]] = {}
    devices: dict[str, dict[str, int]] = {}
    omega_size = torch.empty((), dtype=mas.omega_dtype).element_size()
    tot = {"numel": 0, "local_numel": 0, "omega": 0, "anchor": 0, "estimation": 0}
    for name, p in mas.params.items():
        lp = shard_of(p.detach())
        numel, local_numel = p.numel(), lp.numel()
        omega_t, anchor_t = mas.importance.get(name), mas.anchors.get(name)
        omega_b = (
            shard_of(omega_t).numel() * shard_of(omega_t).element_size()
            if omega_t is not None
            else local_numel * omega_size
        )
        anchor_b = (
            shard_of(anchor_t).numel() * shard_of(anchor_t).element_size()
            if anchor_t is not None
            else local_numel * lp.element_size()
        )
        est_b = sum_dtype(p).itemsize * (local_numel if is_dtensor(p) else numel)
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
