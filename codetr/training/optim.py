"""The optimizer (AdamW over parameter groups) and the learning-rate schedule."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from codetr.config import TrainConfig
from codetr.training.layer_decay import layer_decay_param_groups


def param_groups(model: nn.Module, cfg: TrainConfig) -> list[dict[str, Any]]:
    """AdamW parameter groups: the first ``cfg.lr_mult`` key contained in a parameter's name
    sets its learning rate to ``cfg.lr * multiplier``; frozen parameters are left out.

    Each group has ``name`` (the matching key, or "default"), ``lr_mult`` and ``lr``.
    """
    grouped: dict[str, list[nn.Parameter]] = {key: [] for key in [*cfg.lr_mult, "default"]}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        key = next((k for k in cfg.lr_mult if k in name), "default")
        grouped[key].append(param)
    return [
        {"params": params, "name": key, "lr_mult": float(cfg.lr_mult.get(key, 1.0)),
         "lr": cfg.lr * float(cfg.lr_mult.get(key, 1.0))}
        for key, params in grouped.items() if params
    ]


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups`, or over the layer-wise decay groups when ``cfg.layer_decay.rate`` is set."""
    if cfg.layer_decay.rate is not None:
        groups = layer_decay_param_groups(model, cfg.lr, cfg.weight_decay, cfg.layer_decay.rate, cfg.layer_decay.num_layers)
    else:
        groups = param_groups(model, cfg)
    if not groups:
        raise ValueError("the model has no trainable parameters")
    for group in groups:
        group["initial_lr"] = group["lr"]  # the base of the schedule (LrSchedule), as torch's schedulers
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


@dataclass
class LrSchedule:
    """mmcv's ``policy='step'`` with ``warmup='linear'``: the multiplier of each group's
    ``initial_lr`` at a step, from the completed ``epoch`` and ``iteration`` before it:
    ``gamma ** (number of steps <= epoch)``, times ``1 - (1 - iteration / warmup_iters) * (1 - warmup_ratio)``
    during the first ``warmup_iters`` iterations (from ``warmup_ratio`` up towards 1).
    """

    steps: Sequence[int]
    warmup_iters: int = 0
    warmup_ratio: float = 0.1
    gamma: float = 0.1

    def __post_init__(self) -> None:
        if self.warmup_iters < 0:
            raise ValueError(f"train.warmup_iters must be >= 0, got {self.warmup_iters}")
        if not 0.0 < self.warmup_ratio <= 1.0:
            raise ValueError(f"train.warmup_ratio must be in (0, 1], got {self.warmup_ratio}")

    def factor(self, epoch: int, iteration: int) -> float:
        factor = self.gamma ** sum(epoch >= step for step in self.steps)
        if iteration < self.warmup_iters:
            factor *= 1 - (1 - iteration / self.warmup_iters) * (1 - self.warmup_ratio)
        return factor
