"""The library's own exceptions (one place, so every layer can raise them without importing the others)."""

from __future__ import annotations


class ImportanceError(RuntimeError):
    """The data or model cannot be estimated as asked; the model and its buffers are left unchanged."""
