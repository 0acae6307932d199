"""Exponential moving average (EMA) of a model's weights, as mmdet's ``ExpMomentumEMAHook``
(``mmdet/core/hook/ema.py``), which the released Co-DINO ViT-L COCO config trains with
(``momentum=0.0001``, the default ``total_iter=2000`` and ``interval=1``)."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn


class ExpMomentumEMA:
    """An average of every floating-point entry of ``model.state_dict()``: the parameters (frozen
    ones included) and floating buffers such as batch-norm statistics, as mmdet's hook with
    ``skip_buffers=False``. Integer entries (``num_batches_tracked``) are not averaged.

    After optimizer step ``i`` (0-based), when ``(i + 1) % interval == 0``:
    ``average = (1 - m_i) * average + m_i * weights`` with
    ``m_i = (1 - momentum) * exp(-(1 + i) / total_iter) + momentum``: near 1 at first (the average
    follows the weights), then decaying to ``momentum`` over a few ``total_iter`` steps.
    The average starts as a copy of the weights.
    """

    def __init__(self, model: nn.Module, momentum: float = 1e-4, total_iter: int = 2000, interval: int = 1) -> None:
        if not 0.0 < momentum < 1.0:
            raise ValueError(f"train.ema_momentum must be in (0, 1), got {momentum}")
        if total_iter <= 0:
            raise ValueError(f"train.ema_total_iter must be positive, got {total_iter}")
        if interval <= 0:
            raise ValueError(f"train.ema_interval must be positive, got {interval}")
        self.momentum, self.total_iter, self.interval = momentum, total_iter, interval
        self.averages: dict[str, Tensor] = {}
        self.reset(model)

    def reset(self, model: nn.Module) -> None:
        """Start the average from the current weights of ``model``."""
        self.averages = {name: value.detach().clone() for name, value in model.state_dict().items()
                         if value.dtype.is_floating_point}

    def momentum_at(self, iteration: int) -> float:
        """The weight of the current weights in the update after step ``iteration`` (0-based)."""
        return (1 - self.momentum) * math.exp(-(1 + iteration) / self.total_iter) + self.momentum

    @torch.no_grad()
    def update(self, model: nn.Module, iteration: int) -> None:
        """Fold the weights of ``model`` after optimizer step ``iteration`` (0-based) into the average."""
        if (iteration + 1) % self.interval:
            return
        momentum = self.momentum_at(iteration)
        state = model.state_dict()
        for name, average in self.averages.items():
            average.mul_(1 - momentum).add_(state[name], alpha=momentum)

    @contextlib.contextmanager
    def applied(self, model: nn.Module) -> Iterator[None]:
        """Run a block with the averaged weights in ``model``; its own weights are put back after."""
        state = model.state_dict()
        own = {name: state[name].detach().clone() for name in self.averages}
        with torch.no_grad():
            for name, average in self.averages.items():
                state[name].copy_(average)
        try:
            yield
        finally:
            with torch.no_grad():
                for name, value in own.items():
                    state[name].copy_(value)

    def state_dict(self) -> dict[str, Any]:
        return {"averages": self.averages}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = state["averages"]
        if saved.keys() != self.averages.keys():
            missing, unexpected = sorted(self.averages.keys() - saved.keys()), sorted(saved.keys() - self.averages.keys())
            raise ValueError(f"the checkpoint's EMA does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
        for name, average in self.averages.items():
            average.copy_(saved[name])
