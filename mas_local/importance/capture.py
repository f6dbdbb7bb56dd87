"""Capture of module calls during one forward pass.

Converted layers (:mod:`mas_local.layers`) report their input and output from their
own forward; every other planned module is observed through a temporary forward
hook that runs before any hook of the user's (so it sees the module's own output).
Modules that declare a sequence-first layout get a pre/post hook that tells the
calls inside them where their batch dimension is (:mod:`.layouts`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from ..errors import LayoutError
from ..layers import _TapMixin
from .layouts import FLAT, BatchDim, input_dims, is_sequence_first, output_dims, positional_first
from .leaves import flat_leaves, tensor_leaves


@dataclass
class Site:
    """One call of a planned module during one batch."""

    module: nn.Module
    args: tuple
    kwargs: dict
    outputs: list[Tensor]  # tensor leaves of the output
    in_dims: list[BatchDim]  # batch dim of each leaf of (args, kwargs): an int, FLAT ([B·T, ...]) or None (shared)
    out_dims: list[BatchDim]  # batch dim of each output leaf
    n: int  # samples in the batch
    versions: list[int] = field(default_factory=list)
    deltas: list[Tensor | None] = field(default_factory=list)
    live: dict[str, Tensor] | None = None  # parameter values used, when not the registered ones (FSDP2)
    activated: Tensor | None = None  # local mode with a user activation: act(y)
    row_mask: Tensor | None = None  # local mode with a mask: which rows of x.reshape(-1, x.shape[-1]) count
    padded: bool = False  # local mode: the batch has padding positions (its mask is not all True)
    targets: list[Tensor] = field(default_factory=list)  # global mode: what the rest of the model reads (Δ's targets)
    path: str = ""  # the module's qualified name in the model (for messages)
    layout: tuple = ()  # (id(module), in_dims, out_dims) as captured: what the self-check's layouts compare

    @property
    def x(self) -> Tensor:
        """The first positional input (Linear, Conv and Embedding rules read this)."""
        return self.args[0]

    @property
    def x_dim(self) -> BatchDim:
        return self.in_dims[0] if self.in_dims else None

    @property
    def batched(self) -> bool:
        """Whether some input carries the batch (otherwise the call is shared by all samples)."""
        return any(d is not None for d in self.in_dims)

    @property
    def delta(self) -> Tensor | None:
        """Δ of the first output: ∂loss/∂y (global) or y, resp. ∂(½‖act(y)‖²)/∂y (local)."""
        return self.deltas[0] if self.deltas else None

    @property
    def judged_output(self) -> Tensor:
        """The output local hebbian pairs with the input: act(y) if an activation was given, else y."""
        return self.outputs[0] if self.activated is None else self.activated

    def batch_first(self, t: Tensor, dim: BatchDim) -> Tensor:
        """``t`` with its batch dimension moved to the front (a view when it already is).

        Flattened tokens ``[B·T, ...]`` come back as ``[B, T, ...]``.
        """
        if dim == FLAT:
            return t.reshape(self.n, -1, *t.shape[1:])
        if dim is None and self.n == 1:  # one sample: every row of every call is its own
            return t.unsqueeze(0)
        if dim is None:
            raise LayoutError(
                f"module '{self.path}' ({type(self.module).__name__}) got a tensor of shape {tuple(t.shape)} "
                "without the batch dimension; "
                "per-sample estimators need one (use estimator='batch')"
            )
        return t if dim == 0 else t.movedim(dim, 0)

    def changed_parts(self) -> set[str]:
        """Which captured tensors the model changed in place after the call: ``{"inputs", "outputs"}`` or part."""
        now_in = [t._version for t in tensor_leaves((self.args, self.kwargs))]
        now_out = [t._version for t in self.outputs]
        parts = set()
        if now_in != self.versions[: len(now_in)]:
            parts.add("inputs")
        if now_out != self.versions[len(now_in) :]:
            parts.add("outputs")
        return parts


def replicated(site: Site, n: int) -> Site:
    """A call shared by the batch as n identical calls, one per sample (its first input and output repeated)."""

    def rep(t):
        if not isinstance(t, Tensor):
            return t
        return t.expand(n, *t.shape[1:]) if t.dim() >= 1 and t.shape[0] == 1 else t.unsqueeze(0).expand(n, *t.shape)

    args = (rep(site.args[0]),) + tuple(site.args[1:]) if site.args else site.args
    copy = Site(site.module, args, site.kwargs, [rep(site.outputs[0])] + site.outputs[1:], [0], [0], n)
    copy.activated = None if site.activated is None else rep(site.activated)
    copy.path = site.path
    return copy


def _copies(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """A call's arguments with its top-level tensors copied (nested ones are left to the version check)."""
    return (
        tuple(a.clone() if isinstance(a, Tensor) else a for a in args),
        {k: (v.clone() if isinstance(v, Tensor) else v) for k, v in kwargs.items()},
    )


class Capture:
    """Context manager: while active, calls of ``modules`` are recorded as :class:`Site` objects.

    ``clone_modules`` holds ``(id(module), part)`` pairs for models that modify captured tensors in
    place: for ``"inputs"`` the inputs are recorded as copies, for ``"outputs"`` the model continues
    with copies of the outputs. ``alias`` (global
    mode) hands the rest of the
    model fresh aliases of the outputs (``site.targets``), so that Δ holds only the gradient that
    flows back from outside the module. ``on_site`` is called
    with each new site (FSDP2 gathers parameter values there); ``consume(site)`` returning ``True`` means
    the site was reduced already and is not kept (local mode streaming).
    """

    def __init__(
        self,
        model: nn.Module,
        modules: list[nn.Module],
        n: int,
        *,
        positions: int | None = None,
        clone_modules: set[tuple[int, str]] | None = None,
        alias: bool = False,
        shared_leaves: dict[int, set[int]] | None = None,
        expand: set[int] | None = None,
        layout_modules: list[nn.Module] = (),
        on_site: Callable[[Site], None] | None = None,
        names: dict[int, str] | None = None,
        consume: Callable[[Site], bool] | None = None,
    ) -> None:
        self.model, self.modules, self.n = model, modules, n
        self.flat_rows = n * positions if positions is not None and positions > 1 else None
        self.clone_modules, self.alias, self.on_site = clone_modules or set(), alias, on_site
        self.shared_leaves = shared_leaves if shared_leaves is not None else {}  # may be a probe's live table
        self.expand = expand or set()
        self.layout_modules = layout_modules
        self.sites: list[Site] = []
        self.track_writes = False  # True: remember which sites hold which tensors, for copy_on_write
        self.copied: set[tuple[int, str]] = set()  # (id(module), part) copied by copy_on_write
        self._held: dict[int, list[tuple[Site, str]]] = {}  # id(tensor) -> sites and parts holding it
        self._seq_first = 0
        self._handles: list = []
        self._wanted = {id(m) for m in modules}
        self.names = names or {}
        self.consume = consume  # streaming: True when it reduced the site, which is then not kept
        self._consuming = False  # inside consume: a rule that runs a module again makes no new call

    def _record(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        if id(module) not in self._wanted or self._consuming:
            return output
        args, kwargs = positional_first(module, args, kwargs)
        expand = id(module) in self.expand
        clone_in, clone_out = (
            (id(module), "inputs") in self.clone_modules,
            (id(module), "outputs") in self.clone_modules,
        )
        # the output's structure is needed only to hand the model something other than its own output
        if type(output) is Tensor:
            leaves, spec = [output], None
        elif self.alias or expand or clone_out:
            leaves, spec = tree_flatten(output)
        else:
            leaves, spec = flat_leaves(output), None

        def rebuilt(new_leaves: list) -> Any:
            return new_leaves[0] if spec is None else tree_unflatten(new_leaves, spec)

        if expand:
            args, kwargs, leaves = self._expanded(args, kwargs, leaves)
            output = rebuilt(leaves)
        if self.alias:
            # Δ is taken w.r.t. fresh aliases that only the rest of the model reads: an output computed from
            # another output inside the module (a router's scores from its logits) must not count twice.
            targets = [t.view_as(t) if isinstance(t, Tensor) and t.requires_grad else t for t in leaves]
        else:
            targets = leaves
        if clone_in:  # the model keeps its inputs (and changes them later); the site keeps copies
            args, kwargs = _copies(args, kwargs)
        if clone_out:  # the site keeps the outputs; the model continues with copies
            output = rebuilt([t.clone() if isinstance(t, Tensor) else t for t in targets])
        elif self.alias:
            output = rebuilt(targets)
        outputs = [t for t in leaves if isinstance(t, Tensor)]
        inner_seq_first = self._seq_first - (1 if is_sequence_first(module) else 0) > 0
        in_leaves = flat_leaves((args, kwargs))
        site = Site(
            module,
            args,
            kwargs,
            outputs,
            input_dims(module, args, kwargs, self.n, inner_seq_first, self.flat_rows, in_leaves),
            output_dims(module, outputs, self.n, inner_seq_first, self.flat_rows),
            self.n,
        )
        for i in self.shared_leaves.get(id(module), ()):
            if i < len(site.in_dims):
                site.in_dims[i] = None
        site.layout = (id(module), tuple(site.in_dims), tuple(site.out_dims))
        site.targets = [t for t in targets if isinstance(t, Tensor)]
        site.path = self.names.get(id(module), type(module).__name__)
        site.versions = [t._version for t in in_leaves if isinstance(t, Tensor)] + [t._version for t in outputs]
        if self.track_writes:
            for t in in_leaves:
                if isinstance(t, Tensor):
                    self._held.setdefault(id(t), []).append((site, "inputs"))
            for t in outputs:
                self._held.setdefault(id(t), []).append((site, "outputs"))
        if self.on_site is not None:
            self.on_site(site)
        if self.consume is not None:
            self._consuming = True
            try:
                taken = self.consume(site)
            finally:
                self._consuming = False
            if taken:
                return output
        self.sites.append(site)
        return output

    def copy_on_write(self, t: Tensor) -> None:
        """``t`` is about to be changed in place: sites holding it (or the tensor it is a view of) keep a copy.

        Local mode only (in global mode the rest of the model holds aliases of the outputs). The site's
        part is copied as it is now, so the statistics see the values the module saw.
        """
        for key in (id(t), id(t._base) if t._base is not None else None):
            for site, part in self._held.pop(key, ()) if key is not None else ():
                if part == "inputs":
                    old = flat_leaves((site.args, site.kwargs))
                    site.args, site.kwargs = _copies(site.args, site.kwargs)
                else:
                    old = list(site.outputs)
                    site.outputs = [o.clone() for o in site.outputs]
                    site.targets = list(site.outputs)
                for o in old:  # this site holds copies now, not the originals
                    holders = self._held.get(id(o)) if isinstance(o, Tensor) else None
                    if holders:
                        holders[:] = [(s, p) for s, p in holders if not (s is site and p == part)]
                in_now = tensor_leaves((site.args, site.kwargs))
                site.versions = [a._version for a in in_now] + [o._version for o in site.outputs]
                self.copied.add((id(site.module), part))

    def _expanded(self, args: tuple, kwargs: dict, leaves: list) -> tuple[tuple, dict, list]:
        """A call shared by the batch, as if each sample had made it: ``[1, ...]`` inputs and outputs expanded to B."""
        in_leaves, in_spec = tree_flatten((args, kwargs))
        if any(isinstance(t, Tensor) and t.dim() >= 1 and t.shape[0] == self.n for t in in_leaves):
            return args, kwargs, leaves  # this call carries the batch after all

        def grow(t):
            if isinstance(t, Tensor) and not isinstance(t, nn.Parameter) and t.dim() >= 1 and t.shape[0] == 1:
                return t.expand(self.n, *t.shape[1:])
            return t

        args, kwargs = tree_unflatten([grow(t) for t in in_leaves], in_spec)
        return args, kwargs, [grow(t) for t in leaves]

    def _enter_layout(self, module, args, kwargs):
        self._seq_first += 1

    def _leave_layout(self, module, args, kwargs, output):
        self._seq_first -= 1

    def __enter__(self) -> Capture:
        for module in self.layout_modules:
            self._handles.append(module.register_forward_pre_hook(self._enter_layout, with_kwargs=True))
            self._handles.append(module.register_forward_hook(self._leave_layout, with_kwargs=True, always_call=True))
        for module in self.modules:
            # a module is what calling it returns: after the user's forward hooks (such a module takes the
            # generic rule, which re-runs it with them); otherwise its own output, before anything else sees it
            hooked = bool(module._forward_hooks)
            if isinstance(module, _TapMixin) and not hooked:
                module._mas_tap = self._record
            else:
                self._handles.append(module.register_forward_hook(self._record, with_kwargs=True, prepend=not hooked))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        for module in self.modules:
            if isinstance(module, _TapMixin):
                module.__dict__.pop("_mas_tap", None)
