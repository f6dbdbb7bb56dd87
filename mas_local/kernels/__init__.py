"""Triton backend of mas-local: ``mas_local.kernels``.

The kernels' sources live in the repository's top-level ``kernels/`` folder, one file per op; a wheel
carries them inside this package (``setup.py`` copies them here), and in a source checkout (an editable
install, or the repository on ``sys.path``) this package's path takes in that folder. The folder itself has
no ``__init__.py`` on purpose: from the repository root, ``import kernels`` must not find a package, because
``kernels`` is the name of Hugging Face's hub-kernels package, which ``transformers`` probes for on import.

One file per op, each with its ``@triton.jit`` kernels and launcher:
:mod:`.abs_gemm` (``Ω += α|A|ᵀ|B|``), :mod:`.per_sample_abs` (``Ω += α Σ_b |A_bᵀB_b|``),
:mod:`.penalty` (``grad += 2λΩ(θ−θ*)`` and ``λΣΩ(θ−θ*)²``), with :mod:`.fp8` (the abs-GEMM's
fp8 pre-pass) and :mod:`.launch` (interpreter switch, device guard, CUDA-graph checks,
tuned launches). The functions have the signatures of :mod:`mas_local.ops.reference`;
:mod:`mas_local.ops.backend` dispatches to them, and each makes its tensors' CUDA
device current while it launches.

Importing needs ``triton`` (an ``ImportError`` otherwise, which the dispatcher
reports as "absent"). The kernels run on CUDA tensors, and on CPU tensors only
when ``TRITON_INTERPRET=1`` was set before ``triton`` was first imported (and
then not on CUDA tensors).
"""

from __future__ import annotations

from pathlib import Path

_SOURCES = Path(__file__).resolve().parents[2] / "kernels"
if (_SOURCES / "launch.py").is_file() and (_SOURCES.parent / "setup.py").is_file():  # a source checkout
    __path__.append(str(_SOURCES))

import triton  # noqa: E402, F401  (ImportError here means: no Triton backend)

from .abs_gemm import abs_gemm_acc_  # noqa: E402
from .launch import INTERPRET, INTERPRET_TOO_LATE  # noqa: E402
from .penalty import penalty_grad_  # noqa: E402
from .per_sample_abs import per_sample_abs_acc_  # noqa: E402

__all__ = ["abs_gemm_acc_", "per_sample_abs_acc_", "penalty_grad_", "supports", "INTERPRET"]


def supports(device) -> str | None:
    """``None`` if the kernels can run on tensors of ``device``, else the reason they cannot."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return "CUDA is not available to torch"
        if INTERPRET or INTERPRET_TOO_LATE:
            # Interpreted kernels would copy each CUDA tensor to the host; the penalty's
            # multi-tensor addressing relies on real device addresses.
            return "TRITON_INTERPRET=1 is set: the kernels are defined for the interpreter, not for the GPU"
        return None
    if device.type == "cpu":
        if INTERPRET:
            return None
        if INTERPRET_TOO_LATE:
            return "TRITON_INTERPRET=1 was set after triton had been imported; set it before importing triton"
        return "Triton runs on CPU tensors only under TRITON_INTERPRET=1, set before triton is first imported"
    return f"Triton kernels do not support device type {device.type!r}"
