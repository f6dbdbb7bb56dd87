"""Backend dispatch: which implementation of an op runs on which device.

Backends:
  ``torch``  the reference ops in :mod:`mas_local.ops.reference` (always present);
  ``triton`` the kernels in :mod:`mas_local.kernels` (CUDA tensors, or CPU tensors
             when ``TRITON_INTERPRET=1`` was set before import);
  ``ext``    the compiled extension ``mas_local._C`` (C++ kernels on CPU tensors,
             CUDA kernels on GPU tensors) through :mod:`mas_local.ops.ext`.

``backend="auto"`` walks :data:`AUTO_ORDER` for the op and device type and takes
the first backend that is present. A backend that ``auto`` wanted but could not
load is reported once through the ``mas_local`` logger. Forcing a backend that is
not present raises :class:`BackendUnavailableError`. The environment variable
``MAS_LOCAL_BACKEND`` forces a backend for every call that passes ``"auto"``.
"""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Callable

import torch

log = logging.getLogger("mas_local")

BACKENDS = ("torch", "triton", "ext")
OPS = ("abs_gemm_acc", "per_sample_abs_acc", "penalty_grad")

# Where each backend keeps each op: module path and function name. Every
# function has the reference signature (see mas_local.ops.reference).
_SITES: dict[str, str] = {
    "torch": "mas_local.ops.reference",
    "triton": "mas_local.kernels",
    "ext": "mas_local.ops.ext",
}

# Preference of ``auto`` per (op, device type). CPU: fastest measured first. CUDA: the
# intended order (kernels first), not yet measured on a GPU. The reference is always last
# and always present. Update together with the measurement that justifies it (bench/results/).
AUTO_ORDER: dict[tuple[str, str], tuple[str, ...]] = {
    ("abs_gemm_acc", "cpu"): ("torch",),
    # CPU, 2 cores, 2026-11-28 (bench/results/cpu_ext_2026-11-28.md): the C++ penalty is 5-19x the
    # reference; the C++ per-sample kernel is as fast (1.0-1.6x) with bounded scratch memory.
    ("per_sample_abs_acc", "cpu"): ("ext", "torch"),
    ("penalty_grad", "cpu"): ("ext", "torch"),
    ("abs_gemm_acc", "cuda"): ("triton", "ext", "torch"),
    ("per_sample_abs_acc", "cuda"): ("triton", "ext", "torch"),
    ("penalty_grad", "cuda"): ("triton", "ext", "torch"),
}


class BackendUnavailableError(RuntimeError):
    """A backend was forced (argument or ``MAS_LOCAL_BACKEND``) but cannot run here."""


_modules: dict[str, object] = {}
_load_errors: dict[str, str] = {}
_noticed: set[tuple[str, str, str]] = set()


def _load(backend: str) -> object | None:
    if backend in _modules:
        return _modules[backend]
    if backend in _load_errors:
        return None
    try:
        module = importlib.import_module(_SITES[backend])
    except Exception as exc:  # a missing build or a broken toolchain both mean "absent"
        _load_errors[backend] = f"{type(exc).__name__}: {exc}"
        return None
    _modules[backend] = module
    return module


def unavailable_reason(backend: str, device: torch.device | str) -> str | None:
    """Why ``backend`` cannot run on ``device`` here, or ``None`` if it can."""
    device = torch.device(device)
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS + ('auto',)}")
    if backend == "torch":
        return None
    module = _load(backend)
    if module is None:
        return f"could not import {_SITES[backend]} ({_load_errors[backend]})"
    supports = getattr(module, "supports", None)
    if supports is not None:
        return supports(device)
    return None


def requested_backend(backend: str = "auto") -> str:
    """The backend a call asks for after applying ``MAS_LOCAL_BACKEND`` to ``"auto"``."""
    if backend == "auto":
        backend = os.environ.get("MAS_LOCAL_BACKEND", "auto").strip().lower() or "auto"
        if backend not in BACKENDS + ("auto",):
            raise ValueError(f"MAS_LOCAL_BACKEND={backend!r} is not one of {BACKENDS + ('auto',)}")
    elif backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS + ('auto',)}")
    return backend


def resolve(op: str, device: torch.device | str, backend: str = "auto") -> tuple[str, Callable]:
    """Return ``(backend name, implementation)`` of ``op`` for tensors on ``device``."""
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}; expected one of {OPS}")
    device = torch.device(device)
    backend = requested_backend(backend)
    if backend != "auto":
        reason = unavailable_reason(backend, device)
        if reason is not None:
            raise BackendUnavailableError(
                f"backend {backend!r} was requested for {op} on {device.type} but is not available: {reason}"
            )
        return backend, getattr(_load(backend), op + "_")
    for name in AUTO_ORDER.get((op, device.type), ("torch",)):
        reason = unavailable_reason(name, device)
        if reason is None:
            return name, getattr(_load(name), op + "_")
        key = (op, device.type, name)
        if key not in _noticed:
            _noticed.add(key)
            log.info("mas_local: %s backend unavailable for %s on %s (%s); falling back", name, op, device.type, reason)
    return "torch", getattr(_load("torch"), op + "_")


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """Backends that can run on ``device`` in this process."""
    return [b for b in BACKENDS if unavailable_reason(b, device) is None]
