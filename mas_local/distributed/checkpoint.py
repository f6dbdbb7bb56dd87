"""Resumable passes: one atomic checkpoint file per rank."""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist


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


def load_checkpoint(path: str) -> Any:
    """Load a pass checkpoint with ``weights_only=True``; a truncated or foreign file gets a clear error."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(
            f"cannot read the importance-pass checkpoint {path!r} ({type(exc).__name__}: {str(exc).splitlines()[0]}); "
            "it is truncated or not a mas-local pass checkpoint: remove it to start the pass over"
        ) from exc


def resume_pass(est: Any, path: str, task: int) -> None:
    """Load a pass checkpoint of consolidation ``task`` into ``est``; a truncated, foreign or mismatched file
    is refused with a ``ValueError`` naming it."""
    state = load_checkpoint(path)  # a truncated or non-torch file: ValueError naming it
    if not isinstance(state, dict) or "mas_task" not in state or "fingerprint" not in state:
        raise ValueError(
            f"{path!r} is not a mas-local importance-pass checkpoint (a {type(state).__name__} without the "
            "pass statistics); remove it to start the pass over, or pass another checkpoint_path"
        )
    if state["mas_task"] != task:
        raise ValueError(
            f"checkpoint {path!r} belongs to task {state['mas_task']!r}, this MAS is consolidating task "
            f"{task}; remove it to start over"
        )
    try:
        est.load_state_dict(state)
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(
            f"cannot resume from the importance-pass checkpoint {path!r}: {exc}; it was written by another "
            "model or other settings: remove it to start the pass over"
        ) from exc
