"""mas-local: Memory Aware Synapses (global and local/Hebbian) for PyTorch.

>>> import mas_local as ml
>>> mas = ml.MAS(model, lam=1.0, mode="local")
>>> mas.consolidate(task1_loader)
>>> loss = task_loss + mas.penalty()
"""

from . import ops
from .importance import Estimator, ImportanceError, compute_importance
from .layers import MASConv2d, MASLinear, convert, revert
from .ops import backend, reference
from .ops.backend import BackendUnavailableError, available_backends
from .regularizer import MAS

__all__ = [
    "MAS",
    "BackendUnavailableError",
    "Estimator",
    "ImportanceError",
    "MASConv2d",
    "MASLinear",
    "available_backends",
    "backend",
    "compute_importance",
    "convert",
    "ops",
    "reference",
    "revert",
]
__version__ = "0.1.0"
