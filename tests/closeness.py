"""Comparisons of Ω dictionaries shared by the tests."""

from __future__ import annotations

import torch


def assert_close_model_wide(got: dict, want: dict, rtol=1e-5):
    """Per parameter rtol 1e-5; atol 1e-6 × the largest Ω of the model, since some parameters' exact Ω
    is 0 up to rounding (a key bias shifts every score of a softmax equally)."""
    assert set(got) == set(want)
    scale = max(w.abs().max().item() for w in want.values())
    for name, w in want.items():
        g = got[name]
        assert g.dtype in (torch.float32, torch.float64)  # float64 exactly for float64 parameters
        torch.testing.assert_close(
            g.double(), w.double(), rtol=rtol, atol=1e-6 * scale, msg=lambda m, n=name: f"{n}: {m}"
        )
