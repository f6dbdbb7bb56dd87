"""Callbacks that run MAS inside training frameworks (``docs/integrations.md``).

- :class:`MASTrainerCallback`: Hugging Face ``transformers.Trainer`` (``pip install 'mas-local[hf]'``).
- :class:`MASLightningCallback`: Lightning ``Trainer`` (``pip install 'mas-local[lightning]'``).
- :class:`MASAvalanchePlugin`: Avalanche strategies (``pip install 'mas-local[avalanche]'``).

Each is imported on first use, so ``import mas_local.integrations`` imports no framework;
using a callback whose framework is missing raises an ``ImportError`` naming the extra to install.
"""

from __future__ import annotations

from typing import Any

__all__ = ["MASAvalanchePlugin", "MASLightningCallback", "MASTrainerCallback"]

_WHERE = {
    "MASTrainerCallback": "hf_trainer",
    "MASLightningCallback": "lightning",
    "MASAvalanchePlugin": "avalanche_plugin",
}


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'mas_local.integrations' has no attribute {name!r}")
    from importlib import import_module

    return getattr(import_module(f"{__name__}.{module}"), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
