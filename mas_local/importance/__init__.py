"""Importance estimation: global MAS and local (Hebbian) MAS (definitions in ``docs/math.md``).

compute_importance   one pass over the data -> {parameter name: Ω}
Estimator            the pass, batch by batch (``update``, ``result``, checkpoints)
register_rule, Rule  the open registry of per-layer rules (``docs/rules.md``)
"""

from ..errors import ImportanceError
from .estimator import Estimator
from .passes import compute_importance, make_estimator, run_pass
from .rules import Rule, register_rule, registered_rules, rule_for, unregister_rule

__all__ = [
    "Estimator",
    "ImportanceError",
    "Rule",
    "compute_importance",
    "make_estimator",
    "register_rule",
    "registered_rules",
    "rule_for",
    "run_pass",
    "unregister_rule",
]
