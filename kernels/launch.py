"""What every Triton launcher here shares: the interpreter switch, the device guard, CUDA-graph
capture checks, logged notices, and tuned launches with bucketed autotune keys.

Device: Triton launches on the *current* CUDA device and stream. :func:`on_device`
makes the tensors' device current for the duration of one op call, so a model on
``cuda:1`` is computed on ``cuda:1`` (on the current stream of that device).

Autotuning (:class:`TunedKernel`): the kernels accumulate into Ω in place, so each
timed trial restores Ω (``restore_value``), and a new tuning key costs a compile per
config plus a clone of Ω. Ragged sizes (the rows of an abs-GEMM, the sequence length
of the per-sample op) enter the key only through :func:`size_bucket` (the next power
of two), so a new sequence length does not re-tune. ``MAS_LOCAL_TRITON_AUTOTUNE=0``
(read at import) launches the first config that fits in shared memory, no timing.
"""

from __future__ import annotations

import contextlib
import logging
import os

import torch
import triton
import triton.language as tl

log = logging.getLogger("mas_local")
_noticed: set[tuple] = set()

#: ``MAS_LOCAL_TRITON_AUTOTUNE=0`` (read at import): the first config that fits, no tuning.
AUTOTUNE = os.environ.get("MAS_LOCAL_TRITON_AUTOTUNE", "1") != "0"
#: Shared memory a config may plan for (H100/H200 allow 227 KiB per block; margin for the epilogue).
SMEM_LIMIT = 220 * 1024


def _interpreting() -> bool:
    """True when Triton itself (its standard library included) was set up for the interpreter.

    ``TRITON_INTERPRET=1`` only counts if it was set before ``triton`` was first
    imported; set later, the kernels here would be interpreted but Triton's own
    ``@jit`` helpers (``tl.cdiv``, …) not, and nothing could run on CPU tensors.
    """
    if not triton.knobs.runtime.interpret:
        return False
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(tl.standard.cdiv, InterpretedFunction)


#: Kernels run under the Triton interpreter (CPU tensors); see :func:`_interpreting`.
INTERPRET = _interpreting()
#: TRITON_INTERPRET=1 was set only after triton had been imported (nothing runs on CPU then).
INTERPRET_TOO_LATE = bool(triton.knobs.runtime.interpret) and not INTERPRET
#: Operand dtypes the kernels take; others (float64) run the torch reference.
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def notice(key: tuple, message: str, *args, level: int = logging.INFO) -> None:
    """Log ``message`` once per process for ``key`` through the ``mas_local`` logger."""
    if key not in _noticed:
        _noticed.add(key)
        log.log(level, "mas_local.kernels: " + message, *args)


def notice_reference(op: str, why: str) -> None:
    """Log once per (op, reason) that a call ran the torch reference instead of a kernel."""
    notice((op, "reference", why), "%s runs the torch reference for %s", op, why)


def on_device(device: torch.device):
    """Context that makes ``device`` the current CUDA device (a no-op for CPU tensors)."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def capturing(device: torch.device) -> bool:
    """Whether the current stream of ``device`` is capturing a CUDA graph."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def refuse_capture(device: torch.device, what: str, why: str) -> None:
    """Raise a clear error if ``what`` would run inside a CUDA-graph capture where it cannot."""
    if capturing(device):
        raise RuntimeError(
            f"{what} cannot run inside a CUDA-graph capture: {why}. "
            "Run the same call once before capturing (a warm-up outside the graph), then capture."
        )


def size_bucket(n: int) -> int:
    """The autotune bucket of a ragged size: the next power of two, at least 16."""
    return max(16, 1 << max(0, int(n) - 1).bit_length())


def fitting_configs(configs, elem_size: int):
    """The configs whose operand stages fit in :data:`SMEM_LIMIT` for this operand size; never empty."""

    def footprint(c):
        k = c.kwargs
        return c.num_stages * (k["BLOCK_M"] * k["BLOCK_K"] + k["BLOCK_K"] * k["BLOCK_N"]) * elem_size

    return [c for c in configs if footprint(c) <= SMEM_LIMIT] or [min(configs, key=footprint)]


class TunedKernel:
    """A ``@triton.jit`` GEMM-like kernel with its configs and autotune key.

    ``key`` names kernel arguments (ragged sizes must be passed already bucketed, see
    :func:`size_bucket`); ``restore`` names the output argument restored between
    trials; ``elem_arg`` names the operand whose element size decides which configs
    fit in shared memory. Under the interpreter one ``interpret_config`` is used.
    ``autotune``/``do_bench`` override :data:`AUTOTUNE` and Triton's timer (tests pass
    a CPU timer to run the real autotuner under the interpreter).
    """

    def __init__(self, kernel, configs, key, restore, elem_arg, interpret_config, *, autotune=None, do_bench=None):
        self.kernel = kernel
        self.configs = list(configs)
        self.key = list(key)
        self.elem_arg = elem_arg
        self.interpret_config = interpret_config
        self.autotune = (AUTOTUNE and not INTERPRET) if autotune is None else autotune
        self.tuner = None
        if self.autotune:
            elem = elem_arg

            def prune(configs, named_args, **kwargs):
                return fitting_configs(configs, named_args[elem].element_size())

            self.tuner = triton.autotune(
                configs=self.configs,
                key=self.key,
                restore_value=list(restore),
                prune_configs_by={"early_config_prune": prune},
                do_bench=do_bench,
            )(kernel)

    def first_config(self, elem_size: int):
        """The config launched without autotuning."""
        if INTERPRET and self.interpret_config is not None:
            return self.interpret_config
        return fitting_configs(self.configs, elem_size)[0]

    def tuned_config(self, args, meta):
        """The config the autotuner holds for these arguments, or ``None`` if it would have to tune."""
        if self.tuner is None or len(self.tuner.configs) <= 1:
            return None
        names = self.tuner.arg_names
        all_args = {**dict(zip(names, args)), **meta}
        present = {k: v for k, v in all_args.items() if k in names}
        key = [present[k] for k in self.key if k in present]
        key += [str(v.dtype) for v in present.values() if hasattr(v, "dtype")]
        return self.tuner.cache.get(tuple(key))

    def __call__(self, grid, args, meta, device: torch.device) -> None:
        """Launch on ``grid`` (a function of the config's kwargs) with positional ``args`` and constexpr ``meta``."""
        elem_size = args[self.kernel.arg_names.index(self.elem_arg)].element_size()
        if self.tuner is not None:
            if not capturing(device) or self.tuned_config(args, meta) is not None:
                self.tuner[grid](*args, **meta)
                return
            # Timing trials cannot run inside a CUDA-graph capture: launch the first fitting config.
            notice((self.kernel.__name__, "capture-untuned"),
                   "%s: not tuned for these sizes before the CUDA-graph capture; the graph uses the first config "
                   "that fits (run the call once before capturing to get the tuned one)", self.kernel.__name__)
        cfg = self.first_config(elem_size)
        self.kernel[grid](*args, **meta, **cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
