"""Mixed precision training: ``torch.autocast`` over the training forward, with the parts that
need float32 run in float32.

Autocast runs matrix products and convolutions (backbone, transformer projections and FFNs) in
bfloat16 or float16. Kept in float32 at their module boundaries (floating inputs cast to float32,
autocast off inside):

- the multi-scale deformable attention (``MSDeformAttn``): its sampling locations are fractions
  of the feature map size, finer than bfloat16's 8-bit mantissa resolves;
- the DETR losses with the Hungarian matching (``DetrCriterion.forward`` and ``assigned_loss``):
  the matching cost handed to scipy, focal / quality focal losses, L1 and GIoU;
- the auxiliary heads' training step (``forward_train`` of the ATSS and Faster R-CNN heads):
  IoU assigners, RoIAlign into float32 buffers, box coding and losses.

Each of these modules declares those methods in its ``float32_methods`` (the model contract,
:mod:`codetr.models.base`); :func:`keep_float32` wraps them on the model's instances when
``train.amp`` is set, so the model code itself stays precision-agnostic.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from codetr.errors import UserError
from codetr.models.base import float32_regions

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
AUTOCAST_DEVICES = ("cpu", "cuda", "mps")


def amp_dtype(name: str | None) -> torch.dtype | None:
    """``train.amp`` ("bf16", "fp16" or None) -> the autocast dtype (None: full precision)."""
    if name is None:
        return None
    if name not in AMP_DTYPES:
        raise UserError(f"train.amp must be one of {sorted(AMP_DTYPES)} or null, got {name!r}")
    return AMP_DTYPES[name]


def to_float32(obj: Any) -> Any:
    """``obj`` with every bfloat16 / float16 tensor in it (also inside lists, tuples, dicts and
    dataclasses) cast to float32."""
    if isinstance(obj, torch.Tensor):
        return obj.float() if obj.dtype in (torch.bfloat16, torch.float16) else obj
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_float32(x) for x in obj)
    if isinstance(obj, dict):
        return {k: to_float32(v) for k, v in obj.items()}
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(obj, **{f.name: to_float32(getattr(obj, f.name))
                                           for f in dataclasses.fields(obj) if f.init})
    return obj


def in_float32(method: Callable[..., Any]) -> Callable[..., Any]:
    """``method`` run with autocast off and its floating inputs cast to float32."""
    @functools.wraps(method)
    def run(*args: Any, **kwargs: Any) -> Any:
        with contextlib.ExitStack() as stack:
            for device in AUTOCAST_DEVICES:
                if torch.is_autocast_enabled(device):
                    stack.enter_context(torch.autocast(device, enabled=False))
            return method(*to_float32(args), **to_float32(kwargs))
    return run


def keep_float32(model: nn.Module) -> int:
    """Make the methods that the submodules of ``model`` declare in ``float32_methods``
    (:func:`codetr.models.base.float32_regions`) run in float32 (each instance's method replaced by
    its :func:`in_float32` wrapper); returns the number of modules changed."""
    count = 0
    for module, methods in float32_regions(model):
        for name in methods:
            setattr(module, name, in_float32(getattr(module, name)))
        count += 1
    return count
