"""What the per-layer rules see of a pass: a narrow accumulator (``docs/rules.md``).

Rules turn one captured call into sums and counts; they need the batch size, the sums kept
for their parameters, a way to bound their scratch memory, and the fused ops' settings, not
the pass that runs the model. The reduction (:mod:`.reduction`) uses the same object.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import Tensor

from ..config import ImportanceConfig
from ..ops.backend import resolve
from .statistics import Statistics

log = logging.getLogger("mas_local")


class Accumulator:
    """``batch_samples``, ``sum_of``, ``add_sum``, ``add_count``, ``chunks``, ``per_sample_scratch``,
    ``backend``, ``precision`` and ``notice_once``: everything a rule may use."""

    def __init__(self, config: ImportanceConfig, stats: Statistics) -> None:
        self.config = config
        self.stats = stats
        self.batch_samples = 0  # samples in the batch (or piece of it) being reduced
        self.closed_form_checked: dict[int, bool] = {}  # norm rules: a module computes the closed form (per pass)
        self._scratch_backend: dict[tuple, str] = {}
        self._notices: set = set()

    backend = property(lambda self: self.config.backend)
    precision = property(lambda self: self.config.precision)
    chunk_bytes = property(lambda self: self.config.chunk_bytes)
    estimator = property(lambda self: self.config.estimator)
    mode = property(lambda self: self.config.mode)
    params = property(lambda self: self.stats.params)
    names = property(lambda self: self.stats.names)

    def sum_of(self, p: Tensor) -> Tensor:
        return self.stats.sum_of(p)

    def add_sum(self, p: Tensor, value: Tensor) -> None:
        self.stats.add_sum(p, value)

    def add_count(self, p: Tensor, count: int) -> None:
        self.stats.add_count(p, count)

    def per_sample_scratch(self, out_features: int, in_features: int, device: torch.device) -> int:
        """Bytes per sample the per-sample op needs beyond its operands on ``device``.

        The torch reference materialises each sample's ``[out, in]`` product in fp32; the fused
        kernels (ext, triton) keep Ω's tiles in registers and need none (``docs/rules.md``).
        """
        key = (device.type, device.index)
        name = self._scratch_backend.get(key)
        if name is None:
            name = self._scratch_backend[key] = resolve("per_sample_abs_acc", device, self.backend)[0]
        return 4 * out_features * in_features if name == "torch" else 0

    def chunks(self, n: int, bytes_per_sample: int) -> list[slice]:
        step = max(1, self.chunk_bytes // max(1, bytes_per_sample))
        return [slice(i, min(n, i + step)) for i in range(0, n, step)]

    def notice_once(self, key: Any, msg: str, *args: Any) -> None:
        if key not in self._notices:
            self._notices.add(key)
            log.info("mas_local: " + msg, *args)
