"""The self-check (``docs/math.md``, "The self-check"): per-sample gradients must add up over a subset.

On the first batch of each batch signature (``verify="first"``, the default), or on every batch
(``"every"``), the per-sample gradients the rules compute for one batch — before ``|·|`` — are summed
over a random subset S of its samples and compared with an independent computation of the same sum:

- global ``sample``: ``autograd.grad`` of ``Σ_{k∈S}‖f(x_k)‖²``, the model run on the samples of S only;
- local ``sample`` (and, under ``hebbian``, the parameters that use the ``sample`` statistic): for each
  sample of S run alone, the module-local gradient of ``½‖y‖²`` of every call of the module where the
  parameter is computed (the module re-run with the parameter as the only input that needs a gradient).

Samples that carry padding are run alone and cut to their real positions, so the check also holds the
engine to "padding changes nothing". A row given to the wrong sample, or counted twice, breaks the identity
for almost every subset; so a mismatch is never turned into a number: the pass either recomputes the
batch another way (each sample alone) or raises, naming the parameter.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ..distributed.fsdp import without_fsdp_hooks
from .batches import call_model, position_mask, select_samples, slice_batch, unpadded
from .capture import Capture
from .check_sums import CheckSums, Sketcher
from .guards import preserved_state
from .leaves import tensor_leaves
from .masks import aligned_mask, masked_squared_norm
from .reduction import BlockScratch, row_budget
from .statistics import widened as _wide

VERIFY_CHOICES = ("first", "every", "off")
MAX_ALONE = 2  # samples run alone (padded batches, local mode): the check's cost stays a fraction of a batch


class VerificationFailed(Exception):
    """Internal: the identity failed for ``mismatches`` ({parameter name: (relative error, module path)})."""

    def __init__(self, mismatches: dict[str, tuple[float, str]]) -> None:
        super().__init__(", ".join(f"{k} ({v[0]:.2g})" for k, v in mismatches.items()))
        self.mismatches = mismatches


def tolerance(dtypes: set[torch.dtype]) -> tuple[float, float]:
    """(relative tolerance, floor relative to the model's largest sum): per-sample gradients are computed in
    float64 for a float64 model and in float32 otherwise; 16-bit activations are checked loosely."""
    if dtypes & {torch.float16, torch.bfloat16}:
        return 3e-2, 1e-2
    if dtypes == {torch.float64}:
        return 1e-6, 1e-8
    return 2e-4, 1e-4


def choose_subset(n: int, mask: Tensor | None, alone: bool, generator: torch.Generator) -> Tensor:
    """Indices of a random subset S: about half the samples (both S and its complement non-empty when n > 1),
    at most ``MAX_ALONE`` when the samples are run one by one; with padding, S holds the most padded sample
    (padding that leaks into a statistic shows there). S is never sample 0 alone, whose rows come first in every
    layout. In a pair: sample 1 (S = both would sum to the batch's gradient whatever the layout), or, in local
    mode, both when sample 0 is padded (where a time-major layout's real rows differ from a sample-major one's)."""
    if n == 1:
        return torch.zeros(1, dtype=torch.long)
    padded = mask is not None and not bool(mask.all())
    # S is not the whole batch (but see pairs below): summed over every sample, the per-sample gradients are the
    # batch's gradient whichever rows are taken for which sample, and a time-major layout read as sample-major
    # would pass
    size = 1 if n == 2 else max(2, n // 2)
    if padded or alone:
        size = min(size, MAX_ALONE)
    # sample 0's rows sit first in every layout (sample- or time-major, gathered in order): a subset of
    # sample 0 alone cannot tell layouts apart, so it is chosen last
    rest = torch.randperm(n - 1, generator=generator) + 1
    order = torch.cat([rest, torch.zeros(1, dtype=torch.long)])
    if padded:  # the most padded samples first (the last of equals; one other than sample 0 if it is padded)
        lengths = mask.sum(1).cpu()
        first = [int((lengths == lengths.min()).nonzero().max())]
        others = lengths[1:]
        if bool((others < mask.shape[1]).any()):
            first.insert(0, 1 + int((others == others.min()).nonzero().max()))
        picked = list(dict.fromkeys(first + order.tolist()))
        order = torch.tensor(picked, dtype=torch.long)
    if n == 2 and padded and alone and not bool(mask[0].all()):
        # local mode, sample 0 padded: S holds it (a leak of its padding into a call shared by the batch shows
        # there), and sample 0 alone cannot tell layouts apart, so S is both: the samples' real rows, run alone,
        # differ from a time-major layout's where sample 0's padding is
        return torch.arange(2)
    chosen = order[:size]
    if chosen.tolist() == [0]:
        chosen = order[order != 0][:1]
    return chosen.sort().values


def _runs(indices: list[int]) -> list[slice]:
    """Sorted indices as maximal slices of consecutive ones."""
    runs: list[slice] = []
    for i in indices:
        if runs and runs[-1].stop == i:
            runs[-1] = slice(runs[-1].start, i + 1)
        else:
            runs.append(slice(i, i + 1))
    return runs


def _checked(est: Any, rule: Any) -> bool:
    return not (est.estimator == "hebbian" and rule.hebbian)


def engine_subset_sums(est: Any, sites: list, members: Tensor, into: CheckSums) -> None:
    """Add Σ_{k∈S} g_k per parameter, signed, from the rules' per-sample gradients of these calls, to ``into``."""
    size = float(members.numel())
    runs = _runs(members.tolist())
    for s in sites:
        if not any(d is not None for d in s.deltas):
            continue
        for rule, params in est.plan.sites[id(s.module)].groups:
            if not _checked(est, rule):
                continue
            if est.mode == "local" and not s.batched:  # shared by the batch: every sample's gradient
                for name, g in rule.batch_grads(est.acc, s, params).items():
                    into.add(params[name], _wide(g) * size)
                continue
            blocked = {n: p for n, p in params.items() if _by_rows(est, rule, p, members)}
            rest = {n: p for n, p in params.items() if n not in blocked}
            for name, p in blocked.items():
                _add_row_blocks(est, s, rule, name, p, runs, into)
            if not rest:
                continue
            numel = sum(p.numel() for p in rest.values())
            for run in runs:  # only the samples of S: runs of consecutive indices, in chunks
                for part in est.acc.chunks(run.stop - run.start, bytes_per_sample=8 * max(1, numel)):
                    rows = slice(run.start + part.start, run.start + part.stop)
                    for name, g in rule.per_sample_grads(est.acc, s, rest, rows).items():
                        into.add(rest[name], _wide(g).sum(0))


def _by_rows(est: Any, rule: Any, p: Tensor, members: Tensor) -> bool:
    """Whether S's per-sample gradients of ``p`` exceed the scratch budget and the rule can write row blocks."""
    big = p.numel() * 8 * members.numel() > est.acc.chunk_bytes // 8
    return bool(getattr(rule, "row_blocks", False)) and p.dim() > 0 and big


def _add_row_blocks(est: Any, s: Any, rule: Any, name: str, p: Tensor, runs: list[slice], into: CheckSums) -> None:
    """Σ over S of ``p``'s per-sample gradients block of rows by block (``Rule.row_blocks``), each block's scratch
    within ``chunk_bytes / 8`` (a tied 50257 × 768 embedding: never a whole per-sample gradient). The samples of
    S are added one by one into one block (the rule adds into its buffer), so no sum over samples is taken."""
    dtype, row_bytes, budget = row_budget(est.acc, p)
    block = max(1, min(p.shape[0], budget // row_bytes))
    scratch = BlockScratch(p, dtype, block * max(1, p[0].numel()))
    for lo in range(0, p.shape[0], block):
        blk = slice(lo, min(p.shape[0], lo + block))
        buf = scratch.zeros(1, blk.stop - blk.start, *p.shape[1:])
        for run in runs:
            for k in range(run.start, run.stop):
                rule.add_per_sample_grads(est.acc, s, {name: p}, slice(k, k + 1), {name: buf}, block=blk)
        into.add(p, buf[0], rows=blk)


def _pieces(est: Any, batch: Any, members: Tensor, n: int, mask: Tensor | None, alone: bool) -> list[tuple[Any, int]]:
    """The samples of S as batches: each alone (cut to its real positions) or all together."""
    if not alone:
        return [(select_samples(batch, members, n), int(members.numel()))]
    pieces = []
    for k in members.tolist():
        piece = slice_batch(batch, k, k + 1, n)
        if mask is not None:
            piece = unpadded(piece, mask[k].cpu())
        pieces.append((piece, 1))
    return pieces


def oracle_global(est: Any, batch: Any, members: Tensor, n: int, mask: Tensor | None, totals: CheckSums) -> None:
    """Add ``autograd.grad`` of Σ_{k∈S}‖f(x_k)‖² over real positions, the model run on S's samples only."""
    padded = mask is not None and not bool(mask.all())
    params = list(est.params.values())
    with preserved_state(est.model), torch.enable_grad():
        for piece, k in _pieces(est, batch, members, n, mask, alone=padded):
            out = est.output_fn(call_model(est.model, piece, est.config.forward_fn))
            piece_mask = None if padded else position_mask(est.config.mask, piece, k)
            loss = masked_squared_norm(out, piece_mask)
            if not loss.requires_grad:
                continue
            grads = list(torch.autograd.grad(loss, params, allow_unused=True))
            for i, p in enumerate(params):  # each gradient dropped once added: one copy of Ω's size at most
                g, grads[i] = grads[i], None
                if g is not None:
                    totals.add(p, _wide(g))


def oracle_local(est: Any, batch: Any, members: Tensor, n: int, mask: Tensor | None, totals: CheckSums) -> None:
    """Add, for each sample of S alone, the module-local gradient of ½‖y‖² at every call where a parameter is
    computed (``act(y)`` for layers judged through an activation)."""
    for piece, k in _pieces(est, batch, members, n, mask, alone=True):
        _run_consuming(est, piece, k, lambda s: _local_grads(est, s, totals))


def _run_consuming(est: Any, piece: Any, k: int, take) -> None:
    """Run ``piece`` with the plan's modules captured, each call handed to ``take`` as it returns (the values
    the module saw, before any later in-place change) and then dropped: one call's memory at a time."""

    def consume(site) -> bool:  # (a module re-run inside ``take`` makes no call: Capture ignores it)
        take(site)
        return True

    plan = est.plan
    cap = Capture(
        est.model, plan.modules, k, layout_modules=est._layout_modules, names=est.module_names, consume=consume
    )
    with preserved_state(est.model), torch.no_grad(), cap:
        call_model(est.model, piece, est.config.forward_fn)


def _local_grads(est: Any, s: Any, totals: CheckSums) -> None:
    """Add the module-local gradient of ½‖y‖² of call ``s`` (a sample alone) for each checked parameter."""
    plan = est.plan
    for rule, params in plan.sites[id(s.module)].groups:
        if not _checked(est, rule):
            continue
        values = {name: p.detach().requires_grad_(True) for name, p in params.items()}
        module, call_values = without_fsdp_hooks(s.module, values)
        # contiguous inputs: torch 2.13's CPU GroupNorm backward crashes on a channels-last float64 one
        args = tuple(a.contiguous() if isinstance(a, Tensor) else a for a in s.args)
        with torch.enable_grad():
            outs = tensor_leaves(torch.func.functional_call(module, call_values, args, s.kwargs))
            if not outs or not outs[0].is_floating_point():
                continue
            y = outs[0]
            act = est.activation_of.get(id(s.module))
            judged = act(y) if act is not None else y
            loss = 0.5 * _wide(judged).pow(2).sum()
            if not loss.requires_grad:
                continue
            grads = torch.autograd.grad(loss, list(values.values()), allow_unused=True)
        for p, g in zip(params.values(), grads):
            if g is not None:
                totals.add(p, _wide(g))


def compare(est: Any, engine: CheckSums, oracle: CheckSums, checked: set[int], low: bool = False) -> None:
    """Raise :class:`VerificationFailed` for each checked parameter whose sums (or their sketches,
    :mod:`.check_sums`) differ beyond the tolerance (``low``: the forward ran under autocast, with 16-bit
    activations)."""
    tol, floor_rel = tolerance(est._param_dtypes | ({torch.bfloat16} if low else set()))
    scales = {}
    for pid in checked:
        a, b = engine.get(pid), oracle.get(pid)
        scales[pid] = max(float(t.abs().max()) if t is not None and t.numel() else 0.0 for t in (a, b))
    checked = {pid for pid in checked if est.params[est.names[pid]].numel()}
    # a parameter whose sums are tiny next to the model's largest (a bias a norm cancels) is judged against
    # that largest one: float32 cancellation leaves noise there, and an error below it cannot move Ω visibly
    floor = floor_rel * max(scales.values(), default=0.0)
    bad: dict[str, tuple[float, str]] = {}
    for pid in checked:
        scale = max(scales[pid], floor)
        if scale == 0.0:
            continue
        a, b = engine.get(pid), oracle.get(pid)
        if a is None and b is None:  # neither side computed it (a parameter no call reads): both are zero
            continue
        a = torch.zeros_like(b) if a is None else a
        b = torch.zeros_like(a) if b is None else b
        if not (math.isfinite(scale) and bool(torch.isfinite(a).all()) and bool(torch.isfinite(b).all())):
            continue  # not finite: the pass's finiteness checks name it
        err = float((a.double() - b.to(a.device).double()).abs().max()) / scale
        if not err <= tol:
            bad[est.names[pid]] = (err, est.site_path_of(pid))
    if bad:
        raise VerificationFailed(bad)


def verify_batch(est: Any, batch: Any, sites: list, n: int, mask: Tensor | None) -> None:
    """Check the identity on this batch's captured calls (after Δ, before the statistics); raise on mismatch."""
    members = choose_subset(n, mask, est.mode == "local", est.verify_generator)
    if est.estimator == "hebbian":
        verify_hebbian(est, batch, sites, n, mask)
    checked = _checked_ids(est, sites)
    if not checked:
        return
    device_type = est._device_type
    low = torch.is_autocast_enabled(device_type)  # the forward ran with 16-bit activations: so does the oracle
    sketcher = Sketcher(est.verify_generator)
    engine, oracle = CheckSums(sketcher), CheckSums(sketcher)
    with torch.autocast(device_type, enabled=False), torch.no_grad():
        engine_subset_sums(est, sites, members, engine)
    if est.mode == "global":
        oracle_global(est, batch, members, n, mask, oracle)
    else:
        oracle_local(est, batch, members, n, mask, oracle)
    compare(est, engine, oracle, checked, low)


def _checked_ids(est: Any, sites: list) -> set[int]:
    return {
        id(p)
        for s in sites
        for rule, params in est.plan.sites[id(s.module)].groups
        if _checked(est, rule)
        for p in params.values()
    }


def _hebbian_linear(est: Any, rule: Any) -> bool:
    from .rules.linear import LinearRule  # the Linear family (nn.Linear, Conv1D): positions are rows

    return est.estimator == "hebbian" and isinstance(rule, LinearRule)


def _add_outer(est: Any, rule: Any, w: Tensor, y: Tensor, x: Tensor, into: CheckSums) -> None:
    """Add |y|ᵀ|x| in float64 (rows of events), in the weight's layout, block of the weight's rows by block
    (an LM head's [vocab, width] sum is never whole)."""
    y, x = y.double().abs(), x.double().abs()
    rows_side = x if getattr(rule, "transposed", False) else y  # the operand whose columns are w's rows
    other = y if rows_side is x else x
    block = max(1, (est.acc.chunk_bytes // 8) // (8 * max(1, other.shape[-1])))
    for lo in range(0, w.shape[0], block):
        blk = slice(lo, min(w.shape[0], lo + block))
        into.add(w, rows_side[:, blk].t() @ other, rows=blk)


def _engine_hebbian(est: Any, sites: list, members: Tensor, mask: Tensor, into: CheckSums) -> None:
    """Add Σ over the real rows of S's samples of |y|ᵀ|x| (the Linear family's Hebbian sums), per weight."""
    n = est.batch_samples
    for s in sites:
        for rule, params in est.plan.sites[id(s.module)].groups:
            w = params.get("weight")
            if w is None or not _hebbian_linear(est, rule):
                continue
            x, y = s.x, s.judged_output
            if s.batched:
                real = aligned_mask(x, s.x_dim, mask, features=True)
                if real is None:
                    real = torch.ones(*x.shape[:-1], 1, dtype=torch.bool, device=x.device)
                real = real.expand(*x.shape[:-1], 1)[..., 0]
                xs = s.batch_first(x, s.x_dim).reshape(n, -1, x.shape[-1])[members]
                ys = s.batch_first(y, s.out_dims[0]).reshape(n, -1, y.shape[-1])[members]
                keep = s.batch_first(real, s.x_dim).reshape(n, -1)[members]
                x2, y2 = xs[keep], ys[keep]
            else:  # shared by the batch: each sample's events
                x2 = x.reshape(-1, x.shape[-1]).repeat(members.numel(), 1)
                y2 = y.reshape(-1, y.shape[-1]).repeat(members.numel(), 1)
            _add_outer(est, rule, w, y2, x2, into)


def _oracle_hebbian(est: Any, batch: Any, members: Tensor, n: int, mask: Tensor, into: CheckSums) -> None:
    """Add, for each sample of S alone and unpadded, Σ over every row of its calls of |y|ᵀ|x|, per weight."""
    for piece, k in _pieces(est, batch, members, n, mask, alone=True):
        _run_consuming(est, piece, k, lambda s: _hebbian_sums(est, s, into))


def _hebbian_sums(est: Any, s: Any, into: CheckSums) -> None:
    """Add Σ over every row of call ``s`` (a sample alone) of |y|ᵀ|x|, per Linear-family weight."""
    for rule, params in est.plan.sites[id(s.module)].groups:
        w = params.get("weight")
        if w is None or not _hebbian_linear(est, rule) or not s.outputs:
            continue
        y = s.outputs[0]
        act = est.activation_of.get(id(s.module))
        y = act(y) if act is not None else y
        _add_outer(est, rule, w, y.reshape(-1, y.shape[-1]), s.x.reshape(-1, s.x.shape[-1]), into)


def verify_hebbian(est: Any, batch: Any, sites: list, n: int, mask: Tensor | None) -> None:
    """Padded batches under ``hebbian``: the Linear family's sums over a subset's real rows must equal those of
    the same samples run alone and unpadded (the rows a layout or a mask gives to the wrong sample show)."""
    if mask is None or bool(mask.all()):
        return
    members = choose_subset(n, mask, True, est.verify_generator)
    sketcher = Sketcher(est.verify_generator)
    engine, oracle = CheckSums(sketcher), CheckSums(sketcher)
    with torch.no_grad():
        _engine_hebbian(est, sites, members, mask, engine)
        if not engine:
            return
        _oracle_hebbian(est, batch, members, n, mask, oracle)
    compare(est, engine, oracle, set(engine) | set(oracle), low=torch.is_autocast_enabled(est._device_type))


class StreamCheck:
    """The self-check of a streamed batch (:mod:`.streaming`, :mod:`.backward_stream`): the independent sums
    first (local: each sample of S alone, one call at a time; global: ``autograd.grad`` on S's samples, before
    the batch's forward), the engine's added as each call is reduced, compared after the batch. It holds those
    sums (or their sketches, :mod:`.check_sums`) for the checked parameters only, never the batch's calls."""

    def __init__(self, est: Any, batch: Any, n: int, mask: Tensor | None) -> None:
        self.est, self.mask = est, mask
        self.members = choose_subset(n, mask, est.mode == "local", est.verify_generator)
        self.hebbian = est.estimator == "hebbian" and mask is not None and not bool(mask.all())
        sketcher = Sketcher(est.verify_generator)
        self.engine, self.oracle = CheckSums(sketcher), CheckSums(sketcher)
        self.engine_hebbian, self.oracle_hebbian = CheckSums(sketcher), CheckSums(sketcher)
        self.checked: set[int] = set()
        if est.mode == "global":
            oracle_global(est, batch, self.members, n, mask, self.oracle)
            return

        def take(s) -> None:  # each sample of the subset alone, once, for both sums
            _local_grads(est, s, self.oracle)
            if self.hebbian:
                _hebbian_sums(est, s, self.oracle_hebbian)

        for piece, k in _pieces(est, batch, self.members, n, mask, alone=True):
            _run_consuming(est, piece, k, take)

    def add(self, sites: list) -> None:
        """The engine's subset sums of these calls (after Δ)."""
        est = self.est
        self.checked |= _checked_ids(est, sites)
        with torch.autocast(est._device_type, enabled=False), torch.no_grad():
            engine_subset_sums(est, sites, self.members, self.engine)
            if self.hebbian:  # local mode: the same subset serves both checks
                _engine_hebbian(est, sites, self.members, self.mask, self.engine_hebbian)

    def finish(self) -> None:
        """Raise :class:`VerificationFailed` as :func:`verify_batch` would on the same batch."""
        est = self.est
        low = torch.is_autocast_enabled(est._device_type)
        if self.hebbian and self.engine_hebbian:
            compare(
                est, self.engine_hebbian, self.oracle_hebbian, set(self.engine_hebbian) | set(self.oracle_hebbian), low
            )
        if self.checked:
            compare(est, self.engine, self.oracle, self.checked, low)
