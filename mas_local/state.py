"""A saved MAS state: validated before anything is loaded, so a refusal changes nothing."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .distributed import fsdp


def validate_state(state: Any, params: dict[str, nn.Parameter], version: int) -> tuple[int, dict, dict]:
    """Check a state saved by :meth:`mas_local.MAS.state_dict` against ``params``; returns
    ``(num_tasks, importance, anchors)`` or raises ``ValueError`` naming the problem."""
    if not isinstance(state, dict) or "importance" not in state or "anchors" not in state:
        raise ValueError("not a MAS state dict (missing 'importance'/'anchors')")
    if state.get("version") != version:
        raise ValueError(f"unsupported MAS state version {state.get('version')!r}; expected {version}")
    num_tasks = state.get("num_tasks", 0)
    if isinstance(num_tasks, bool) or not isinstance(num_tasks, int) or num_tasks < 0:
        raise ValueError(f"MAS state has a bad num_tasks {num_tasks!r}; expected an int >= 0")
    importance, anchors = state["importance"], state["anchors"]
    if not isinstance(importance, dict) or not isinstance(anchors, dict):
        raise ValueError("MAS state's 'importance' and 'anchors' must be dicts of tensors")
    if num_tasks > 0 or importance or anchors:
        expected = set(params)
        for what, table in (("importance", importance), ("anchors", anchors)):
            got = set(table)
            if got != expected:
                raise ValueError(
                    f"MAS state does not match this model: {what} has unexpected parameters "
                    f"{sorted(got - expected)[:10]} and lacks {sorted(expected - got)[:10]}"
                )
            for name, p in params.items():
                t = table[name]
                if not isinstance(t, Tensor) or t.shape != p.shape:
                    shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
                    raise ValueError(
                        f"MAS state does not match this model: {what}[{name!r}] has shape {shape}, "
                        f"the parameter has {tuple(p.shape)}"
                    )
                local = fsdp.shard_of(t).detach().float()
                if not torch.isfinite(local).all():
                    raise ValueError(f"MAS state has NaN/Inf values in {what}[{name!r}]")
                if what == "importance" and (local < 0).any():
                    raise ValueError(
                        f"MAS state has negative values in importance[{name!r}] (min {local.min().item():.3g}); "
                        "Ω is a mean of absolute values, so this state is corrupt or not a MAS importance"
                    )
    return num_tasks, importance, anchors


def same_setting(saved: Any, own: Any) -> bool:
    if isinstance(own, float) and isinstance(saved, (int, float)) and not isinstance(saved, bool):
        return float(saved) == own
    return saved == own


def describe_changes(changes: dict[str, list[str]], limit: int = 10) -> str:
    what = {
        "added": "trainable but not regularised",
        "removed": "no longer in the model",
        "replaced": "another parameter object under the same name",
    }
    parts = []
    for key, names in changes.items():
        if names:
            more = f" and {len(names) - limit} more" if len(names) > limit else ""
            parts.append(f"{key} ({what[key]}): {names[:limit]}{more}")
    return "; ".join(parts)


def shaped_like(t: Tensor, p: Tensor) -> Tensor:
    """A loaded tensor laid out like its parameter (a copy; a DTensor shard for FSDP2 parameters)."""
    if fsdp.is_dtensor(p) and not fsdp.is_dtensor(t):
        return fsdp.shard_like(t, p).clone()
    return t.clone()


def _sharded_alias(p: Tensor, q: Tensor) -> bool:
    """FSDP2 swaps a sharded parameter for its unsharded copy during forward/backward: the same parameter."""
    return (fsdp.is_dtensor(p) or fsdp.is_dtensor(q)) and tuple(p.shape) == tuple(q.shape)


def param_changes(params: dict[str, nn.Parameter], current: dict[str, nn.Parameter]) -> dict[str, list[str]]:
    """``added`` / ``removed`` / ``replaced`` names between the regularised ``params`` and the model's ``current``."""
    removed, replaced = [], []
    for name, p in params.items():
        q = current.get(name)
        if q is None:
            removed.append(name)
        elif q is not p and not _sharded_alias(p, q):
            replaced.append(name)
    added = [name for name, q in current.items() if q.requires_grad and name not in params]
    return {"added": added, "removed": removed, "replaced": replaced}


def refreshed_tables(mas: Any, current: dict[str, nn.Parameter], changes: dict[str, list[str]]):
    """New (params, importance, anchors, skipped) of ``mas`` for ``changes``; ``mas`` is not modified.

    New trainable parameters get Ω = 0 and θ* = their value once a task was consolidated.
    """
    drop = set(changes["removed"]) | set(changes["replaced"])
    params = {n: p for n, p in mas.params.items() if n not in drop}
    importance = {n: o for n, o in mas.importance.items() if n not in drop}
    anchors = {n: a for n, a in mas.anchors.items() if n not in drop}
    for name in changes["replaced"] + changes["added"]:
        q = current[name]
        if not q.requires_grad:  # a replacement that is frozen is skipped like any frozen parameter
            continue
        params[name] = q
        if mas.num_tasks > 0:
            importance[name], anchors[name] = zero_omega(q, mas.omega_dtype), q.detach().clone()
    params = {n: params[n] for n in current if n in params}  # the model's order
    return params, importance, anchors, [n for n in current if n not in params]


def zero_omega(p: Tensor, dtype: torch.dtype) -> Tensor:
    """Ω = 0 laid out like ``p`` (a DTensor shard for FSDP2 parameters)."""
    zeros = torch.zeros(tuple(p.shape), dtype=dtype, device=fsdp.shard_of(p).device)
    return fsdp.shard_like(zeros, p) if fsdp.is_dtensor(p) else zeros
