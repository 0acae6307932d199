"""The fused CPU kernel of multi-scale deformable attention: a C++ extension compiled on first use.

``csrc/ms_deform_attn.cpp`` accumulates the attention-weighted bilinear samples of every level
and point straight into the output (no per-level split, stack or (…, levels * points) sampled
intermediate), parallel over queries; its backward recomputes the samples from the inputs and
scatter-adds the value gradient without atomics. It registers the operators
``torch.ops.codetr.ms_deform_attn`` and ``ms_deform_attn_backward``; this module builds and loads
it, and gives the first an autograd formula and a fake (meta) implementation, so it trains and
works under ``torch.compile``.

The build needs a C++ compiler and ninja (``pip install ninja``); it takes about 15-30 s of one
core, once: the library is cached in torch's extension directory (``TORCH_EXTENSIONS_DIR``,
default ``~/.cache/torch_extensions``) and rebuilt only when the source or torch changes. Where
it cannot be built, :func:`kernel_available` says False (with one warning) and
:func:`codetr.ops.multi_scale_deformable_attn` uses the pure-PyTorch path.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import torch
from torch import Tensor

from codetr.ops.deform_attn_op import backward_fake, register_autograd

SOURCE = Path(__file__).parent / "csrc" / "ms_deform_attn.cpp"
EXTENSION_NAME = "codetr_ms_deform_attn"
DTYPES = (torch.float32, torch.float64)
_available: bool | None = None


def _build() -> None:
    """Compile (or load from the cache) the extension and register autograd and fake kernels."""
    cpp_logger = logging.getLogger("torch.utils.cpp_extension")
    level = cpp_logger.level
    cpp_logger.setLevel(logging.ERROR)  # "No CUDA runtime is found": true, and irrelevant to a CPU build
    try:
        from torch.utils.cpp_extension import load
    finally:
        cpp_logger.setLevel(level)
    # -fopenmp: at::parallel_for is inlined into the extension; torch's OpenMP runtime runs it.
    # -ffp-contract=off: no fused multiply-adds where the reference rounds twice.
    load(EXTENSION_NAME, [str(SOURCE)], extra_cflags=["-O3", "-fopenmp", "-ffp-contract=off"],
         extra_ldflags=["-fopenmp"], is_python_module=False)
    torch.library.register_fake("codetr::ms_deform_attn")(_forward_fake)
    torch.library.register_fake("codetr::ms_deform_attn_backward")(backward_fake)
    register_autograd("codetr::ms_deform_attn", torch.ops.codetr.ms_deform_attn_backward)


def kernel_available() -> bool:
    """Whether the fused kernel is usable; builds or loads it on the first call. A failed build
    warns once and is not retried in this process."""
    global _available
    if _available is None:
        try:
            _build()
            _available = True
        except Exception as err:  # no compiler, no ninja, read-only cache, ...: fall back
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            warnings.warn(f"codetr: the fused CPU deformable-attention kernel could not be built ({reason}); "
                          "using the pure-PyTorch path (grid_sample)", RuntimeWarning, stacklevel=2)
            _available = False
    return _available


def fused_deformable_attn(value: Tensor, spatial_shapes: list[tuple[int, int]], locations: Tensor,
                          weights: Tensor) -> Tensor:
    """Same contract as :func:`codetr.ops.multi_scale_deformable_attn` (value (B, S, heads, D),
    locations (B, Q, heads, levels, points, 2) normalised (x, y), weights (B, Q, heads, levels,
    points); returns (B, Q, heads * D)), for float32 / float64 CPU tensors, once
    :func:`kernel_available` is True."""
    batch, queries, heads = locations.shape[:3]
    shapes = [int(size) for hw in spatial_shapes for size in hw]
    return torch.ops.codetr.ms_deform_attn(value, shapes, locations, weights).view(batch, queries, -1)


def _forward_fake(value: Tensor, shapes: list[int], locations: Tensor, weights: Tensor) -> Tensor:
    return value.new_empty(locations.shape[0], locations.shape[1], value.shape[2], value.shape[3])


