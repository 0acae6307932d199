"""Mixed precision: ``torch.autocast`` over the training forward, with the precision-sensitive
parts kept in float32.

Autocast runs matrix products and convolutions in bfloat16 or float16. Kept in float32, at
their module boundaries (floating inputs cast to float32, autocast off inside):

- the multi-scale deformable attention (``MSDeformAttn``): its sampling locations are
  fractions of the feature map size, which bfloat16's 8-bit mantissa cannot resolve;
- the DETR losses with the Hungarian matching (``DetrCriterion.forward`` and
  ``assigned_loss``): focal / quality focal losses, L1, GIoU and the matching cost;
- the auxiliary heads' training step (``forward_train`` of the ATSS and Faster R-CNN heads):
  their assigners (IoU), RoIAlign, box coding and losses.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def amp_dtype(name: str | None) -> torch.dtype | None:
    """``train.amp`` -> the autocast dtype (None: full precision)."""
    if name is None:
        return None
    if name not in AMP_DTYPES:
        raise ValueError(f"train.amp must be one of {sorted(AMP_DTYPES)} or null, got {name!r}")
    return AMP_DTYPES[name]


def to_float32(obj: Any) -> Any:
    """``obj`` with every bfloat16 / float16 tensor in it (lists, tuples, dicts, dataclasses) cast to float32."""
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


def float32_method(method: Callable[..., Any]) -> Callable[..., Any]:
    """``method`` run with autocast off and its floating inputs cast to float32."""
    @functools.wraps(method)
    def run(*args: Any, **kwargs: Any) -> Any:
        with torch.autocast("cuda", enabled=False), torch.autocast("cpu", enabled=False):
            return method(*to_float32(args), **to_float32(kwargs))
    return run


def float32_boundaries() -> dict[type, tuple[str, ...]]:
    """The module types and methods kept in float32 (see the module docstring)."""
    from codetr.models.aux.atss import ATSSHead
    from codetr.models.aux.roi import FasterRCNNAux
    from codetr.models.heads.detr_loss import DetrCriterion
    from codetr.models.transformer.deformable_attention import MSDeformAttn
    return {MSDeformAttn: ("forward",), DetrCriterion: ("forward", "assigned_loss"),
            ATSSHead: ("forward_train",), FasterRCNNAux: ("forward_train",)}


def keep_float32(model: nn.Module) -> int:
    """Wrap the float32 methods of every matching submodule of ``model`` (on the instances);
    returns how many modules were wrapped."""
    boundaries = float32_boundaries()
    count = 0
    for module in model.modules():
        for cls, methods in boundaries.items():
            if isinstance(module, cls):
                for name in methods:
                    setattr(module, name, float32_method(getattr(module, name)))
                count += 1
    return count
