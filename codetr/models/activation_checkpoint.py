"""Activation checkpointing (``with_cp`` of the backbones, the encoder and the decoder)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint


def maybe_checkpoint(fn: Callable[..., Any], *args: Any, enabled: bool, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)``; when ``enabled`` and gradients are on, under activation
    checkpointing: the activations inside ``fn`` are not stored but recomputed in the backward
    pass (non-reentrant, RNG state preserved: dropout draws the same masks again)."""
    if enabled and torch.is_grad_enabled():
        return checkpoint(fn, *args, use_reentrant=False, **kwargs)
    return fn(*args, **kwargs)
