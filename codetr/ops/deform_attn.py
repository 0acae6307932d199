"""Multi-scale deformable attention (Deformable-DETR): pure PyTorch, a fused CPU kernel and a Triton kernel.

Interchangeable implementations with the same semantics (bilinear, ``align_corners=False``,
zero outside the map), selected by name (the ``sampler`` argument, or :func:`use_sampler` for a
block of code):

- ``grid_sample``: ``F.grid_sample`` per level (the reference; what GPUs and ONNX export run);
- ``gather``: one gather of the four neighbouring pixels per level, for ONNX runtimes without
  GridSample (``codetr export --no-grid-sample``);
- ``fused``: the C++ CPU kernel of :mod:`codetr.ops.deform_attn_cpu` (compiled on first use),
  several times faster forward and backward, without the large sampled intermediate;
- ``triton``: the Triton kernel of :mod:`codetr.ops.deform_attn_triton` for CUDA tensors
  (float32, bfloat16, float16), forward and backward without the sampled intermediate; CPU
  tensors run it in Triton's interpreter when ``TRITON_INTERPRET=1`` was set before triton was imported;
- ``auto`` (the default): ``fused`` for float32 / float64 CPU tensors when the kernel can be
  built, ``triton`` for CUDA tensors (Volta or later) when Triton is installed (neither while
  tracing for ONNX), else ``grid_sample``.
"""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from codetr.ops import deform_attn_cpu

SAMPLERS = ("auto", "fused", "triton", "grid_sample", "gather")
_sampler = "auto"
# found, not imported: importing triton takes a second, and fixes whether it interprets (TRITON_INTERPRET)
TRITON_FOUND = importlib.util.find_spec("triton") is not None


@contextlib.contextmanager
def use_sampler(name: str) -> Iterator[None]:
    """Make ``name`` (one of :data:`SAMPLERS`) the sampler of :func:`multi_scale_deformable_attn` in a block."""
    global _sampler
    if name not in SAMPLERS:
        raise ValueError(f"unknown bilinear sampler {name!r}; choose from {SAMPLERS}")
    previous, _sampler = _sampler, name
    try:
        yield
    finally:
        _sampler = previous


def _fused_applies(tensors: tuple[Tensor, ...]) -> bool:
    """Whether the fused CPU kernel takes these tensors (and no ONNX / TorchScript trace is running)."""
    if torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():
        return False
    dtype = tensors[0].dtype
    return dtype in deform_attn_cpu.DTYPES and all(t.device.type == "cpu" and t.dtype == dtype for t in tensors)


def _triton_applies(tensors: tuple[Tensor, ...]) -> bool:
    """Whether the Triton kernel takes these tensors: CUDA tensors (CPU tensors when it runs in the
    interpreter) of float32 / bfloat16 / float16, and no ONNX / TorchScript trace running."""
    if torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or not TRITON_FOUND:
        return False
    from codetr.ops import deform_attn_triton
    device = "cpu" if deform_attn_triton.INTERPRETED else "cuda"
    return all(t.device.type == device and t.dtype in deform_attn_triton.DTYPES for t in tensors)


@torch.compiler.assume_constant_result  # a constant to torch.compile, not a graph break
def _triton_compiles_for(device: torch.device) -> bool:
    """Whether Triton compiles for this CUDA device: Volta (compute capability 7.0) or later."""
    return torch.cuda.get_device_capability(device)[0] >= 7


def grid_sample_bilinear(value: Tensor, locations: Tensor) -> Tensor:
    """value (N, D, H, W), locations (N, Q, P, 2) normalised (x, y) in [0, 1] -> (N, D, Q, P)."""
    return F.grid_sample(value, 2 * locations - 1, mode="bilinear", padding_mode="zeros", align_corners=False)


def gather_bilinear(value: Tensor, locations: Tensor) -> Tensor:
    """Same as :func:`grid_sample_bilinear`, as one gather of the four neighbouring pixels.

    Pixel centres sit at (i + 0.5) / size; a neighbour outside the map contributes zero.
    """
    n, d, h, w = value.shape
    _, q, p, _ = locations.shape
    x = locations[..., 0] * w - 0.5  # (N, Q, P) in pixel units, pixel centres at integers
    y = locations[..., 1] * h - 0.5
    x0, y0 = x.floor(), y.floor()
    fx, fy = x - x0, y - y0
    # the four neighbours (N, Q, P, 4): top-left, top-right, bottom-left, bottom-right
    xs = torch.stack([x0, x0 + 1, x0, x0 + 1], -1)
    ys = torch.stack([y0, y0, y0 + 1, y0 + 1], -1)
    weights = torch.stack([(1 - fx) * (1 - fy), fx * (1 - fy), (1 - fx) * fy, fx * fy], -1)
    inside = (xs >= 0) & (xs <= w - 1) & (ys >= 0) & (ys <= h - 1)
    # outside neighbours read pixel 0 with weight 0 (no clamp: its bounds would be constants in
    # an ONNX trace, and the image size is dynamic there)
    index = torch.where(inside, ys * w + xs, 0).long().reshape(n, 1, q * p * 4)
    corners = value.flatten(2).gather(2, index.expand(n, d, q * p * 4)).view(n, d, q, p, 4)
    return (corners * (weights * inside.to(value.dtype)).unsqueeze(1)).sum(-1)


def multi_scale_deformable_attn(
    value: Tensor,
    spatial_shapes: list[tuple[int, int]],
    sampling_locations: Tensor,
    attention_weights: Tensor,
    sampler: str | None = None,
) -> Tensor:
    """Weighted sum of bilinearly sampled values over levels and points.

    value:              (B, S, heads, head_dim), S = sum of H_l * W_l over the levels.
    spatial_shapes:     (H_l, W_l) of each level, in the order the levels are stacked in ``value``.
    sampling_locations: (B, Q, heads, levels, points, 2) normalised (x, y) in [0, 1]; outside
                        the map the value is zero.
    attention_weights:  (B, Q, heads, levels, points).
    sampler:            one of :data:`SAMPLERS`; None: the one selected by :func:`use_sampler`.
    Returns (B, Q, heads * head_dim).
    """
    sampler = _sampler if sampler is None else sampler
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown bilinear sampler {sampler!r}; choose from {SAMPLERS}")
    tensors = (value, sampling_locations, attention_weights)
    if sampler == "auto":
        if _fused_applies(tensors) and deform_attn_cpu.kernel_available():
            sampler = "fused"
        elif value.device.type == "cuda" and _triton_applies(tensors) and _triton_compiles_for(value.device):
            sampler = "triton"
        else:
            sampler = "grid_sample"
    if sampler == "triton":
        if not TRITON_FOUND:
            raise RuntimeError("the triton sampler needs the triton package (it comes with torch's CUDA wheels)")
        if not _triton_applies(tensors):
            raise ValueError("the Triton deformable-attention kernel takes float32, bfloat16 or float16 CUDA tensors "
                             "(CPU tensors only under TRITON_INTERPRET=1, set before triton is "
                             f"imported), got {[(t.device.type, t.dtype) for t in tensors]}")
        from codetr.ops import deform_attn_triton
        return deform_attn_triton.triton_deformable_attn(value, spatial_shapes, sampling_locations, attention_weights)
    if sampler == "fused":
        if not _fused_applies(tensors):
            raise ValueError("the fused deformable-attention kernel takes float32 or float64 CPU tensors of one dtype, "
                             f"got {[(t.device.type, t.dtype) for t in tensors]}")
        if not deform_attn_cpu.kernel_available():
            raise RuntimeError("the fused deformable-attention kernel could not be built (see the warning above)")
        return deform_attn_cpu.fused_deformable_attn(value, spatial_shapes, sampling_locations, attention_weights)
    sample = grid_sample_bilinear if sampler == "grid_sample" else gather_bilinear
    batch, _, heads, head_dim = value.shape
    _, queries, _, levels, points, _ = sampling_locations.shape
    value_levels = value.split([h * w for h, w in spatial_shapes], dim=1)
    sampled = []
    for level, (h, w) in enumerate(spatial_shapes):
        # (B, H*W, heads, D) -> (B*heads, D, H, W)
        v = value_levels[level].flatten(2).transpose(1, 2).reshape(batch * heads, head_dim, h, w)
        # (B, Q, heads, points, 2) -> (B*heads, Q, points, 2)
        locations = sampling_locations[:, :, :, level].transpose(1, 2).flatten(0, 1)
        sampled.append(sample(v, locations))
    # (B*heads, D, Q, levels*points) weighted by (B*heads, 1, Q, levels*points)
    stacked = torch.stack(sampled, dim=-2).flatten(-2)
    weights = attention_weights.transpose(1, 2).reshape(batch * heads, 1, queries, levels * points)
    out = (stacked * weights).sum(-1).view(batch, heads * head_dim, queries)
    return out.transpose(1, 2).contiguous()
