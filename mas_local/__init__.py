"""mas-local: Memory Aware Synapses (global and local/Hebbian) for PyTorch."""

from . import backend, ops, reference
from .backend import BackendUnavailableError, available_backends

__all__ = ["backend", "ops", "reference", "BackendUnavailableError", "available_backends"]
__version__ = "0.1.0"
