"""The library's own exceptions (one place, so every layer can raise them without importing the others)."""

from __future__ import annotations


class ImportanceError(RuntimeError):
    """The data or model cannot be estimated as asked; the model and its buffers are left unchanged."""


class LayoutError(ImportanceError):
    """A module call whose samples the engine cannot tell apart (no batch dimension it can follow).

    The pass then computes the batch one sample at a time; with one sample it is raised to the user.
    """
