"""mas-local: Memory Aware Synapses (global and local/Hebbian) for PyTorch.

>>> import mas_local as ml
>>> mas = ml.MAS(model, lam=1.0, mode="local")
>>> mas.consolidate(task1_loader)
>>> loss = task_loss + mas.penalty()
"""

from . import ops
from .config import ImportanceConfig
from .errors import ImportanceError
from .importance import Estimator, Rule, compute_importance, register_rule, unregister_rule
from .layers import MASConv2d, MASLinear, convert, revert
from .ops import backend, reference
from .ops.backend import BackendUnavailableError, available_backends
from .regularizer import MAS

__all__ = [
    "MAS",
    "BackendUnavailableError",
    "Estimator",
    "ImportanceConfig",
    "ImportanceError",
    "MASConv1D",
    "MASConv2d",
    "MASLinear",
    "Rule",
    "available_backends",
    "backend",
    "compute_importance",
    "convert",
    "ops",
    "reference",
    "register_rule",
    "revert",
    "unregister_rule",
]
__version__ = "0.1.0"


def __getattr__(name: str):
    # MASConv1D swaps in for transformers' Conv1D; created on first use so that importing
    # mas_local never imports transformers
    if name == "MASConv1D":
        from .layers import mas_conv1d_class

        return mas_conv1d_class(load=True)
    raise AttributeError(f"module 'mas_local' has no attribute {name!r}")
