"""The open registry of per-layer importance rules.

A rule serves a module only when the module runs the ``forward`` the rule was
written for: its registered type, or a subclass that overrides none of the methods
the rule relies on (``Rule.relies_on``, ``("forward",)`` by default). Every other
module — a subclass with its own ``forward``, a type nobody registered — takes the
generic rule, which re-runs the module's own forward per sample (exact, slower).
The built-in rules are registered below exactly as users register theirs with
:func:`register_rule`; ``docs/rules.md`` documents the interface with an example.
"""

from __future__ import annotations

from torch import nn

from ...layers import MASConv2d, MASLinear
from .base import Rule
from .conv import ConvRule
from .embedding import EmbeddingRule
from .generic import GenericRule, mixes_samples
from .linear import LinearRule
from .norms import (
    BatchNormRule,
    GroupNormRule,
    InstanceNormRule,
    LayerNormRule,
    RMSNormRule,
    looks_like_rms_norm,
)

GENERIC = GenericRule()
_REGISTRY: dict[type, Rule] = {}


def register_rule(module_type: type, rule: Rule) -> None:
    """Use ``rule`` for modules of ``module_type`` (and subclasses that keep the methods it relies on).

    Registering a type again replaces its rule. Subclasses of a registered type that
    are registered themselves take their own rule.
    """
    if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise TypeError(f"module_type must be an nn.Module subclass, got {module_type!r}")
    if not isinstance(rule, Rule):
        raise TypeError(f"rule must be an instance of mas_local.importance.Rule, got {type(rule).__name__}")
    if type(rule).per_sample_grads is Rule.per_sample_grads:
        raise TypeError(f"{type(rule).__name__} must implement per_sample_grads (see docs/rules.md)")
    if rule.hebbian and type(rule).add_hebbian is Rule.add_hebbian:
        raise TypeError(f"{type(rule).__name__} sets hebbian=True but does not implement add_hebbian")
    for name in rule.relies_on:
        if not hasattr(module_type, name):
            raise TypeError(f"{module_type.__name__} has no method {name!r} listed in {type(rule).__name__}.relies_on")
    _REGISTRY[module_type] = rule


def unregister_rule(module_type: type) -> None:
    """Remove a registered rule (modules of that type then take the generic rule)."""
    _REGISTRY.pop(module_type, None)


def user_forward_hooks(module: nn.Module) -> bool:
    """Whether ``module`` has forward hooks other than FSDP2's (which leave the output's values as they are)."""
    return any(
        not getattr(hook, "__module__", "").startswith("torch.distributed.fsdp")
        for hook in module._forward_hooks.values()
    )


def rule_for(module: nn.Module) -> Rule:
    """The rule for ``module``: the nearest registered type in its MRO, if the module still runs its forward.

    A module with forward hooks of the user's returns what they make of its output: the generic rule, which
    re-runs the module with them.
    """
    if user_forward_hooks(module):
        return GENERIC
    _register_conv1d()
    cls = type(module)
    for base in cls.__mro__:
        rule = _REGISTRY.get(base)
        if rule is None:
            continue
        if all(getattr(cls, name, None) is getattr(base, name, None) for name in rule.relies_on):
            return rule
        return GENERIC
    if looks_like_rms_norm(module):  # other libraries' RMSNorm classes, checked against what they compute
        return _RMS_RECOGNISED
    return GENERIC


def registered_rules() -> dict[type, Rule]:
    _register_conv1d()
    return dict(_REGISTRY)


_LINEAR, _CONV, _EMBEDDING = LinearRule(), ConvRule(), EmbeddingRule()
for _type, _rule in (
    (nn.Linear, _LINEAR),
    (MASLinear, _LINEAR),
    (nn.Conv1d, _CONV),
    (nn.Conv2d, _CONV),
    (MASConv2d, _CONV),
    (nn.Embedding, _EMBEDDING),
    (nn.LayerNorm, LayerNormRule()),
    (nn.modules.batchnorm._BatchNorm, BatchNormRule()),
    (nn.GroupNorm, GroupNormRule()),
    (nn.modules.instancenorm._InstanceNorm, InstanceNormRule()),
):
    register_rule(_type, _rule)
if hasattr(nn, "RMSNorm"):  # torch >= 2.4
    register_rule(nn.RMSNorm, RMSNormRule())
_RMS_RECOGNISED = RMSNormRule(recognise=True)

# Hugging Face Conv1D / MASConv1D: registered on the first lookup after transformers.pytorch_utils is loaded
# (never imported from here)
from .conv1d import Conv1DRule, PendingRegistration  # noqa: E402


def _register_default(module_type: type, rule: Rule) -> None:
    if module_type not in _REGISTRY:  # a rule the user registered first stays
        register_rule(module_type, rule)


_register_conv1d = PendingRegistration(_register_default, Conv1DRule())

__all__ = [
    "GENERIC",
    "BatchNormRule",
    "GroupNormRule",
    "InstanceNormRule",
    "LayerNormRule",
    "RMSNormRule",
    "ConvRule",
    "EmbeddingRule",
    "GenericRule",
    "LinearRule",
    "Rule",
    "mixes_samples",
    "register_rule",
    "registered_rules",
    "rule_for",
    "unregister_rule",
]
