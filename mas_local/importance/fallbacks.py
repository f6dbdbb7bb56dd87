"""The exact ways out when a batch cannot be split per sample as planned (``docs/math.md``).

``update_alone``: each sample alone, cut to its real positions, where every row of every call is that
sample's. ``refusal``: the error when even that fails the self-check. ``global_batch``: global ``batch``
by one ``autograd.grad`` of the batch (summed over unpadded samples when the model's own backward is not
finite on padding).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..errors import ImportanceError
from .batches import slice_batch, unpadded
from .guards import check_output
from .masks import masked_squared_norm
from .statistics import all_finite
from .verify import VerificationFailed


def update_alone(est, batch: Any, n: int) -> None:
    """Each sample alone, cut to its real positions: every row of every call is that sample's."""
    mask = est._mask
    for k in range(n):
        piece = slice_batch(batch, k, k + 1, n)
        if mask is not None:
            piece = unpadded(piece, mask[k].cpu())
        est.update_piece(piece, 1)
    est.batch_samples = n


def refusal(est, failed: VerificationFailed) -> ImportanceError:
    lines = [
        f"{name} (computed at '{path}', relative error {err:.2g})" for name, (err, path) in failed.mismatches.items()
    ]
    other = "mode='global', estimator='batch'" if est.mode == "global" else "mode='local', estimator='batch'"
    what = "output norm" if est.mode == "global" else "module outputs"
    return ImportanceError(
        "the self-check failed: per-sample gradients summed over a subset of the samples do not equal "
        f"autograd's gradient of that subset's {what}, even with each sample run alone, for: "
        + "; ".join(lines)
        + ". The model may mix the samples of a batch (or depend on the batch size); use "
        f"{other}, which needs no per-sample split, or freeze these parameters (requires_grad=False)"
    )


def global_batch(est, batch: Any, n: int) -> None:
    with torch.enable_grad():
        out = est.output_fn(est._call(batch))
        check_output(out, n)
        loss = masked_squared_norm(out, est._mask)
        if not loss.requires_grad:
            raise ImportanceError("the model output does not depend on any trainable parameter")
        grads = torch.autograd.grad(loss, list(est.params.values()), allow_unused=True)
    mask = est._mask
    if mask is not None and not bool(mask.all()) and not all(g is None or all_finite(g) for g in grads):
        # the model's own backward is not finite on padding (a softmax over a row it masks entirely, then
        # zeroed): g_B = Σ_k g_k, each sample alone and unpadded, as the definition has it
        grads = sum_alone(est, batch, n)
    for p, g in zip(est.params.values(), grads):
        if g is not None:
            est.stats.add_sum(p, g.abs() / n)  # |g_B| / b_B: every batch weighs the same
    est.stats.count_all(1)


def sum_alone(est, batch: Any, n: int) -> list[Tensor | None]:
    params = list(est.params.values())
    total: list[Tensor | None] = [None] * len(params)
    for k in range(n):
        piece = unpadded(slice_batch(batch, k, k + 1, n), est._mask[k].cpu())
        with torch.enable_grad():
            out = est.output_fn(est._call(piece))
            grads = torch.autograd.grad(masked_squared_norm(out, None), params, allow_unused=True)
        total = [t if g is None else (g if t is None else t + g) for t, g in zip(total, grads)]
    return total
