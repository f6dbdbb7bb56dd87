"""Which module call computes the importance of which parameter.

Each trainable parameter gets its per-sample gradients from exactly one place,
found by *where it is read* (``docs/math.md``, "Where each parameter is computed"):

1. If every read of the parameter happens directly inside the forward of a module
   that registers it (a Linear's weight inside that Linear; a tied weight inside each
   of the modules that share it), those modules' rules compute it, and per-sample
   gradients of several calls are summed before the absolute value. In global mode
   those calls must also *carry the batch*: a batched input, and no output without the
   batch dimension that the loss depends on.
2. Otherwise (a weight read outside its module, ``nn.MultiheadAttention`` reading its
   ``out_proj``, a parametrization, a position embedding called on ids shared by the
   batch), the generic rule computes it at the smallest enclosing module that holds all
   its reads and whose calls carry the batch.
3. If there is none (a read outside any module call of the model, e.g. in
   ``output_fn``), the parameter has no exact per-sample method; per-sample
   estimators then stop with an :class:`~mas_local.errors.ImportanceError` naming it.

Reads are observed once, on the first batch of a pass, by a ``TorchFunctionMode``
that records which parameters enter a differentiable op while which module calls
are active. Parameters never read then are assigned to the modules that register
them (rule 1), for modules that only run on later batches (e.g. MoE experts).
"""

from __future__ import annotations

import inspect
import weakref
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from .layouts import input_dims, is_sequence_first, output_dims, positional_first
from .leaves import flat_leaves
from .rules import GENERIC, Rule, rule_for

# Functions that read a tensor's metadata: neither a use of its values nor a tensor computed from it.
_METADATA = frozenset(
    "size dim numel stride is_contiguous data_ptr element_size nelement is_floating_point get_device __len__ "
    "__hash__ storage_offset untyped_storage is_complex ndimension __format__ __repr__ requires_grad_ "
    "__reduce_ex__ __deepcopy__ __set__".split()
)
# Functions whose result holds the same values without a gradient path: data for the batch, not a read.
_DETACHING = frozenset({"detach", "detach_"})
# Tensor properties (``x.T``, ``x.mT``, ``x.data``) reach ``__torch_function__`` as a descriptor's ``__get__``.
_VIEW_PROPERTIES = frozenset({"T", "mT", "H", "mH", "real", "imag"})
_DATA_PROPERTIES = frozenset({"data"})


_KINDS: dict[Any, str] = {}


def _kind(func) -> str:
    """``"metadata"``, ``"detaching"`` (values without gradient) or ``"op"`` (a use of the values)."""
    name = getattr(func, "__name__", "")
    if name == "__get__":
        prop = getattr(getattr(func, "__self__", None), "__name__", "")
        if prop in _VIEW_PROPERTIES:
            return "op"
        return "detaching" if prop in _DATA_PROPERTIES else "metadata"
    if name in _METADATA:
        return "metadata"
    return "detaching" if name in _DETACHING else "op"


@dataclass
class SitePlan:
    """One module whose calls are captured, and which rule computes which of the parameters."""

    module: nn.Module
    groups: list[tuple[Rule, dict[str, nn.Parameter]]] = field(default_factory=list)

    def add(self, rule: Rule, local_name: str, param: nn.Parameter) -> None:
        for r, params in self.groups:
            if r is rule:
                params[local_name] = param
                return
        self.groups.append((rule, {local_name: param}))


@dataclass
class Plan:
    sites: dict[int, SitePlan] = field(default_factory=dict)  # id(module) -> plan
    unreachable: dict[str, str] = field(default_factory=dict)  # parameter name -> why
    # global mode: calls shared by the batch whose outputs are laid out [1, ...] (position embeddings on
    # position_ids [1, T]): captured expanded to the batch, so that backprop gives per-sample Δ
    expand: set[int] = field(default_factory=set)
    # id(module) -> indices of input leaves whose size says "batched" but that do not come from the batch
    # (cache positions [T], relative-position buckets [T, T] when T == B): shared by the batch
    shared_leaves: dict[int, set[int]] = field(default_factory=dict)
    # id(module): calls that get tensors computed from the batch whose batch dimension the sizes do not show
    # (gathered MoE tokens, windows or heads folded into the batch): their rows cannot be given to samples
    unfollowed: set[int] = field(default_factory=set)
    # id(module): calls whose gathered rows (picked by values of the data) happen to number B on the planning
    # batch: their sizes read as one row per sample, which they are not
    misread: set[int] = field(default_factory=set)

    @property
    def modules(self) -> list[nn.Module]:
        return [s.module for s in self.sites.values()]

    def rows_unfollowed(self, module_id: int, batched: bool) -> bool:
        """Whether a call of this module gets rows whose samples its sizes misstate: an unbatched-looking call of
        an ``unfollowed`` module, or any call of a ``misread`` one."""
        return (not batched and module_id in self.unfollowed) or module_id in self.misread

    def assignments(self) -> frozenset:
        """Which module computes which parameter under which rule and name, whatever the order they were found."""
        return frozenset(
            (mid, id(rule), local, id(p))
            for mid, sp in self.sites.items()
            for rule, ps in sp.groups
            for local, p in ps.items()
        )

    def assign(self, module: nn.Module, rule: Rule, local_name: str, param: nn.Parameter) -> None:
        self.sites.setdefault(id(module), SitePlan(module)).add(rule, local_name, param)


def _same_along(t: Tensor, dim: int) -> bool:
    """Whether every slice of ``t`` along ``dim`` equals the first (a broadcast: slicing it is harmless)."""
    if t.stride(dim) == 0:
        return True
    return bool((t == t.narrow(dim, 0, 1)).all())


def _local_name(module: nn.Module, p: Tensor) -> str | None:
    for k, v in module._parameters.items():
        if v is p:
            return k
    return None


def _relative_name(module: nn.Module, p: Tensor) -> str | None:
    for k, v in module.named_parameters(remove_duplicate=False):
        if v is p:
            return k
    return None


def _assign_to_registrants(plan: Plan, registrants: list[nn.Module], p: nn.Parameter) -> None:
    for m in registrants:
        local = _local_name(m, p)
        rule = rule_for(m)
        plan.assign(m, rule if rule.handles(local) else GENERIC, local, p)


def _minimal_registrants(model: nn.Module, p: Tensor) -> list[nn.Module]:
    """Modules registering ``p`` directly, without those that contain another (an alias on a parent)."""
    regs = [m for m in model.modules() if _local_name(m, p) is not None]
    inner = {id(m): {id(c) for c in m.modules() if c is not m} for m in regs}
    return [m for m in regs if not any(id(o) in inner[id(m)] for o in regs if o is not m)]


# function -> (whether its name says it writes its first argument, position of its ``inplace`` parameter)
_WRITES: dict[Any, tuple[bool, int | None]] = {}


def _write_kind(func) -> tuple[bool, int | None]:
    kind = _WRITES.get(func)
    if kind is None:
        name = getattr(func, "__name__", "")
        by_name = (name.endswith("_") and not name.endswith("__")) or name.startswith("__i") or name == "__setitem__"
        try:
            names = list(inspect.signature(func).parameters)
        except (TypeError, ValueError):  # builtins without a signature
            names = []
        kind = _WRITES[func] = (by_name, names.index("inplace") if "inplace" in names else None)
    return kind


_SCATTERS = frozenset(
    "index_add index_add_ index_copy index_copy_ index_put index_put_ scatter scatter_ scatter_add scatter_add_ "
    "scatter_reduce scatter_reduce_ masked_scatter masked_scatter_ __setitem__".split()
)


def _scatters(func) -> bool:
    """Whether ``func`` writes rows into a target by index: the result has the target's rows (the gathered
    tokens put back where they came from)."""
    return getattr(func, "__name__", "") in _SCATTERS


def _gathers_rows(func, args: tuple, kwargs: dict) -> bool:
    """Whether ``func`` picks the first dimension's rows of its input by values (an index tensor or a mask):
    ``x[idx]``, ``x[None, idx]``, ``x[mask]``, ``index_select``/``gather`` along dim 0."""
    name = getattr(func, "__name__", "")
    if name == "__getitem__" and len(args) > 1:
        items = args[1] if isinstance(args[1], tuple) else (args[1],)
        for item in items:
            if item is None:  # a new dimension: the next item still indexes the input's first one
                continue
            return (isinstance(item, Tensor) and item.dim() > 0) or isinstance(item, list)
        return False
    if name in ("index_select", "gather", "take_along_dim"):
        dim = args[1] if len(args) > 1 else kwargs.get("dim")
        x = args[0] if args else None
        return isinstance(x, Tensor) and isinstance(dim, int) and x.dim() > 0 and dim % x.dim() == 0
    return name in ("masked_select", "take")


def written_tensors(func, args: tuple, kwargs: dict) -> list[Tensor]:
    """The tensors a torch function call is about to change in place, as far as its name and arguments say.

    ``x.relu_()``, ``x += y``, ``x[i] = v``, ``F.relu(x, inplace=True)`` and ``out=`` are recognised; anything
    else (an in-place op inside another function, say) is still caught afterwards by the version counters.
    """
    by_name, pos = _write_kind(func)
    written: list[Tensor] = []
    if args and isinstance(args[0], Tensor):
        if by_name or (pos is not None and (kwargs.get("inplace") is True or (len(args) > pos and args[pos] is True))):
            written.append(args[0])
    out = kwargs.get("out") if kwargs else None
    if out is not None:
        written.extend(t for t in flat_leaves(out) if isinstance(t, Tensor))
    return written


class UsageProbe(TorchFunctionMode):
    """Records, for each parameter, the stack of module calls active at each differentiable read."""

    def __init__(
        self, model: nn.Module, params: dict[str, nn.Parameter], n: int, positions: int | None, mode: str
    ) -> None:
        super().__init__()
        self.model, self.n, self.mode = model, n, mode
        self.flat_rows = n * positions if positions is not None and positions > 1 else None
        self.names = {id(p): name for name, p in params.items()}
        self.stack: list[nn.Module] = []
        self.reads: dict[str, list[tuple[nn.Module, ...]]] = defaultdict(list)
        self.unbatched_calls: set[int] = set()  # modules with a call that had no batched input
        self.shared_outputs: list[tuple[int, Tensor]] = []  # (module, output without the batch dim needing grad)
        self.expandable: set[int] = set()  # shared calls whose outputs needing grad are all [1, ...]
        self._unbatched_stack: list[bool] = []
        self.ineligible: set[int] = set()  # modules with a call that does not carry the batch
        # tensors computed from the batch's tensors: id -> weak reference (see _mark_from_batch)
        self.from_batch: dict[int, weakref.ref] = {}
        # tensors computed from the batch whose first dimension was picked by values of the data (tokens gathered
        # for an MoE expert: ``flat[idx]``), until a scatter puts them back: their rows are not the samples, even
        # where they number B
        self.regathered: dict[int, weakref.ref] = {}
        # tensors computed from parameters alone: id -> (weak reference, parameter names)
        self.aliases: dict[int, tuple[weakref.ref, tuple[str, ...]]] = {}
        self.shared_leaves: dict[int, set[int]] = {}
        self.unfollowed: set[int] = set()
        self.misread: set[int] = set()
        self._seq_first = 0
        self._handles: list = []
        # called with each tensor an in-place op is about to change (local mode: the capture copies it first)
        self.before_write: Callable[[Tensor], None] | None = None
        # True while a streamed call is reduced inside the forward: the engine's own ops and module re-runs
        # are not the model's reads or calls
        self.paused = False

    def watch(self, batch_tensors: list[Tensor]) -> None:
        for t in batch_tensors:
            self._mark_from_batch(t)

    def _mark_from_batch(self, t: Tensor, table: dict | None = None) -> None:
        # by id, forgotten when the tensor dies (so a reused id is not mistaken for it, and nothing is kept alive)
        key = id(t)
        table = self.from_batch if table is None else table

        def forget(ref, key=key, table=table):
            if table.get(key) is ref:
                del table[key]

        table[key] = weakref.ref(t, forget)

    def _mark_alias(self, t: Tensor, names: tuple[str, ...]) -> None:
        key = id(t)

        def forget(ref, key=key, table=self.aliases):
            if table.get(key, (None,))[0] is ref:
                del table[key]

        self.aliases[key] = (weakref.ref(t, forget), names)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.paused:
            return func(*args, **kwargs)
        if self.before_write is not None:
            for t in written_tensors(func, args, kwargs):
                self.before_write(t)
        out = func(*args, **kwargs)
        kind = _KINDS.get(func)
        if kind is None:
            kind = _KINDS[func] = _kind(func)
        if kind == "metadata":
            return out
        from_batch, names, aliases = self.from_batch, self.names, self.aliases
        derived, hits = False, None
        for t in flat_leaves((args, kwargs)):
            if isinstance(t, Tensor):
                key = id(t)
                if key in from_batch:
                    derived = True
                name = names.get(key)
                if name is not None:
                    hits = [name] if hits is None else hits + [name]
                alias = aliases.get(key)
                if alias is not None:
                    hits = list(alias[1]) if hits is None else hits + list(alias[1])
        if not derived and hits is None:
            return out
        outs = [t for t in flat_leaves(out) if isinstance(t, Tensor)]
        if derived:
            regathered = self.regathered
            gathered = _gathers_rows(func, args, kwargs) or (
                bool(regathered)
                and not _scatters(func)
                and any(id(t) in regathered for t in flat_leaves((args, kwargs)))
            )
            for t in outs:
                self._mark_from_batch(t)
                if gathered:
                    self._mark_from_batch(t, self.regathered)
        if hits is None or kind == "detaching":
            return out
        if not derived:  # computed from parameters alone (w.T, w.float(), a parametrization): its use reads them
            carried = tuple(dict.fromkeys(hits))
            for t in outs:
                if t.is_floating_point() or t.is_complex():
                    self._mark_alias(t, carried)
        if not torch.is_grad_enabled() or any(t.requires_grad for t in outs):
            frames = tuple(self.stack)
            for name in hits:
                self.reads[name].append(frames)
        return out

    def _push(self, module, args, kwargs):
        if self.paused:
            return
        args, kwargs = positional_first(module, args, kwargs)
        dims = input_dims(module, args, kwargs, self.n, self._seq_first > 0, self.flat_rows)
        for i, t in enumerate(flat_leaves((args, kwargs))):
            if dims[i] is None and isinstance(t, Tensor) and t.dim() >= 1 and id(t) in self.from_batch:
                self.unfollowed.add(id(module))
            if dims[i] is not None and id(t) in self.regathered:  # gathered rows that happen to number B
                self.unfollowed.add(id(module))
                self.misread.add(id(module))
            if isinstance(dims[i], int) and id(t) not in self.from_batch and not _same_along(t, dims[i]):
                # its size happens to be B, but it is not computed from the batch and its slices differ:
                # positions or relative-position buckets [T, ...] with T == B
                dims[i] = None
                self.shared_leaves.setdefault(id(module), set()).add(i)
        unbatched = all(d is None for d in dims)
        if unbatched:
            self.unbatched_calls.add(id(module))
        self._unbatched_stack.append(unbatched)
        self.stack.append(module)
        if is_sequence_first(module):
            self._seq_first += 1

    def _pop(self, module, args, kwargs, output):
        if self.paused:
            return
        if self.stack and self.stack[-1] is module:
            self.stack.pop()
        if is_sequence_first(module):
            self._seq_first -= 1
        unbatched = self._unbatched_stack.pop() if self._unbatched_stack else True
        outs = [t for t in flat_leaves(output) if isinstance(t, Tensor)]
        if self.aliases:  # a module's output is an activation: using it is not a read of the module's parameters
            for t in outs:
                self.aliases.pop(id(t), None)
        if self.mode != "global":
            return
        if unbatched:
            needs_grad = [t for t in outs if t.requires_grad and t.is_floating_point()]
            if needs_grad and all(t.dim() >= 1 and t.shape[0] == 1 for t in needs_grad):
                self.expandable.add(id(module))
            else:
                self.ineligible.add(id(module))
            return
        seq_first = self._seq_first - (1 if is_sequence_first(module) else 0) > 0
        for t, dim in zip(outs, output_dims(module, outs, self.n, seq_first, self.flat_rows)):
            if dim is None and t.requires_grad and t.is_floating_point():
                self.shared_outputs.append((id(module), t))

    def mark_shared_outputs(self, loss: Tensor, retain_graph: bool = False) -> None:
        """Global mode: a call whose output without the batch dimension reaches the loss does not carry the batch."""
        if not self.shared_outputs or not loss.requires_grad:
            return
        targets = [t for _, t in self.shared_outputs]
        grads = torch.autograd.grad(loss, targets, allow_unused=True, retain_graph=retain_graph)
        for (module_id, _), g in zip(self.shared_outputs, grads):
            if g is not None:
                self.ineligible.add(module_id)
        self.shared_outputs = []

    def __enter__(self) -> Any:
        for m in self.model.modules():
            # first among the pre-hooks: what they read (a user's hook, FSDP2's all-gather into the unsharded
            # parameters) is part of calling the module
            self._handles.append(m.register_forward_pre_hook(self._push, with_kwargs=True, prepend=True))
            # last among the forward hooks: a read in a user's forward hook is part of calling the module
            self._handles.append(m.register_forward_hook(self._pop, with_kwargs=True, always_call=True))
        return super().__enter__()

    def __exit__(self, *exc) -> None:
        super().__exit__(*exc)
        self.from_batch.clear()
        self.aliases.clear()
        for h in self._handles:
            h.remove()
        self._handles = []

    def registered_plan(self, params: dict[str, nn.Parameter]) -> Plan:
        """The plan if every parameter is read only inside the modules that register it (rule 1), before any
        read is seen: what a local first batch streams on while this probe rides along, confirmed by
        :meth:`plan` after the forward. It shares the probe's live tables (shared leaves, unfollowed calls)."""
        registrants: dict[int, list[nn.Module]] = defaultdict(list)
        for m in self.model.modules():
            for p in m._parameters.values():
                if p is not None:
                    registrants[id(p)].append(m)
        plan = Plan(shared_leaves=self.shared_leaves, unfollowed=self.unfollowed, misread=self.misread)
        for p in params.values():
            regs = registrants[id(p)]
            _assign_to_registrants(plan, regs if len(regs) == 1 else _minimal_registrants(self.model, p), p)
        return plan

    def plan(self, params: dict[str, nn.Parameter], expand: bool = True) -> Plan:
        """The plan; ``expand=False`` computes shared calls' parameters at enclosing calls instead."""
        expand_ids = self.expandable - self.ineligible if expand and self.mode == "global" else set()
        if self.mode == "global":
            self.ineligible |= self.expandable - expand_ids
        plan = Plan(
            shared_leaves=self.shared_leaves, expand=expand_ids, unfollowed=self.unfollowed, misread=self.misread
        )
        for name, p in params.items():
            stacks = self.reads.get(name)
            if not stacks:
                _assign_to_registrants(plan, _minimal_registrants(self.model, p), p)
                continue
            inner = [s[-1] if s else None for s in stacks]
            registered = all(m is not None and _local_name(m, p) is not None for m in inner)
            # a read in a module that is itself inside another reading module (an alias on a parent read by the
            # parent and by its child): a rule at the outer one would count the inner read again
            inner_ids = {id(m) for m in inner}
            nested = any(id(f) in inner_ids for s in stacks for f in s[:-1])
            eligible = self.mode == "local" or not any(id(m) in self.ineligible for m in inner)
            if registered and eligible and not nested:
                _assign_to_registrants(plan, list({id(m): m for m in inner}.values()), p)
                continue
            site = self._enclosing(stacks, p)
            if site is None:
                plan.unreachable[name] = "read outside every module call that carries the batch"
                continue
            plan.assign(site, GENERIC, _relative_name(site, p), p)
        return plan

    def _enclosing(self, stacks: list[tuple[nn.Module, ...]], p: Tensor) -> nn.Module | None:
        """The deepest module on every stack that holds ``p`` among its parameters and whose calls all carry the
        batch (local mode: have a batched input)."""
        common: list[nn.Module] = []
        for frames in zip(*stacks):
            if all(f is frames[0] for f in frames):
                common.append(frames[0])
            else:
                break
        excluded = self.ineligible if self.mode == "global" else self.unbatched_calls
        for m in reversed(common):
            if id(m) not in excluded and _relative_name(m, p) is not None:
                return m
        return None
