"""The fused Triton kernel of multi-scale deformable attention, forward and backward, for GPUs.

One program takes a block of queries of one (image, head) and all of its head's channels: for
every level and point it loads the location and attention weight, the four neighbouring value
rows (zero outside the map) and accumulates the weighted bilinear sample in float32 registers;
only the output is written. The backward recomputes the samples from the inputs (nothing sampled
is stored between the passes): the location and weight gradients come from dot products with
the output gradient, the value gradient is scatter-added with atomic adds into a float32 buffer.

Inputs may be float32, bfloat16 or float16 (each of its own dtype); arithmetic is float32, the
output has the value's dtype and every gradient its input's dtype. The kernels are registered as
the torch custom operators ``codetr::ms_deform_attn_triton`` and ``ms_deform_attn_triton_backward``
with an autograd formula and fake kernels, so they train and work under ``torch.compile``.

Triton compiles the kernels for CUDA tensors. With ``TRITON_INTERPRET=1`` in the environment
before triton is first imported (``torch._dynamo`` imports it too), they run in Triton's
interpreter on CPU tensors instead (:data:`INTERPRETED`): slow, and how the tests check them
without a GPU.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch import Tensor

from codetr.ops.deform_attn_op import backward_fake, register_autograd

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
BLOCK_Q = 64


@triton.jit
def _corners(x_norm, y_norm, width, height):
    """Pixel coordinates (centres at integers, as grid_sample with align_corners=False) of
    normalised (x, y) (BLOCK_Q,): the top-left neighbour (x0, y0) as int32 and the fractions."""
    x = ((x_norm * 2 - 1 + 1) * width - 1) * 0.5
    y = ((y_norm * 2 - 1 + 1) * height - 1) * 0.5
    # beyond one pixel outside the map every neighbour is outside: clamping there changes no
    # sample and keeps the int32 conversion in range
    x = tl.minimum(tl.maximum(x, -2.0), width + 1.0)
    y = tl.minimum(tl.maximum(y, -2.0), height + 1.0)
    x0 = tl.floor(x)
    y0 = tl.floor(y)
    return x0.to(tl.int32), y0.to(tl.int32), x - x0, y - y0


@triton.jit
def _sample_point(loc_ptr, weight_ptr, sample, valid, width, height):
    """Of each query's sampling point ``sample`` (BLOCK_Q,): its attention weight, the top-left
    neighbour (x0, y0) and the fractions (fx, fy), in float32."""
    lx = tl.load(loc_ptr + 2 * sample, mask=valid, other=0.0).to(tl.float32)
    ly = tl.load(loc_ptr + 2 * sample + 1, mask=valid, other=0.0).to(tl.float32)
    attn = tl.load(weight_ptr + sample, mask=valid, other=0.0).to(tl.float32)
    x0, y0, fx, fy = _corners(lx, ly, width, height)
    return attn, x0, y0, fx, fy


@triton.jit
def _neighbour(value_base, start, x, y, width, height, row_stride, channels, valid, channel_mask):
    """The value rows (BLOCK_Q, BLOCK_D) at pixel (x, y) of a level in float32 (zero outside the
    map), their int64 offsets from ``value_base`` and the mask of rows inside."""
    inside = valid & (x >= 0) & (x < width) & (y >= 0) & (y < height)
    token = (start + tl.where(inside, y * width + x, 0)).to(tl.int64)
    offsets = token[:, None] * row_stride + channels[None, :]
    mask = inside[:, None] & channel_mask[None, :]
    return tl.load(value_base + offsets, mask=mask, other=0.0).to(tl.float32), offsets, mask


@triton.jit
def _round_to_bfloat16(x):
    """float32 -> bfloat16 rounded to the nearest even, in integer arithmetic: what GPUs do, and
    what Triton 3.8's interpreter does not (it truncates)."""
    bits = x.to(tl.uint32, bitcast=True)
    bits += 0x7FFF + ((bits >> 16) & 1)
    rounded = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return tl.where(x == x, rounded, x.to(tl.bfloat16))  # NaN stays NaN


@triton.jit
def _forward_kernel(value_ptr, levels_ptr, loc_ptr, weight_ptr, out_ptr,
                    tokens, queries, heads, levels, points, head_dim,
                    BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr, BFLOAT16: tl.constexpr):
    batch_head = tl.program_id(1)
    b = (batch_head // heads).to(tl.int64)
    h = batch_head % heads
    q = tl.program_id(0) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    channels = tl.arange(0, BLOCK_D)
    valid = q < queries
    channel_mask = channels < head_dim
    row = (b * queries + q) * heads + h  # (BLOCK_Q,) int64 index of (b, q, h)
    value_base = value_ptr + (b * tokens * heads + h) * head_dim
    row_stride = heads * head_dim
    acc = tl.zeros((BLOCK_Q, BLOCK_D), dtype=tl.float32)
    for level in range(levels):
        height = tl.load(levels_ptr + 3 * level)
        width = tl.load(levels_ptr + 3 * level + 1)
        start = tl.load(levels_ptr + 3 * level + 2)
        for point in range(points):
            sample = (row * levels + level) * points + point
            attn, x0, y0, fx, fy = _sample_point(loc_ptr, weight_ptr, sample, valid, width, height)
            v00, _, _ = _neighbour(value_base, start, x0, y0, width, height, row_stride, channels, valid, channel_mask)
            v01, _, _ = _neighbour(value_base, start, x0 + 1, y0, width, height, row_stride, channels, valid, channel_mask)
            v10, _, _ = _neighbour(value_base, start, x0, y0 + 1, width, height, row_stride, channels, valid, channel_mask)
            v11, _, _ = _neighbour(value_base, start, x0 + 1, y0 + 1, width, height, row_stride, channels, valid,
                                   channel_mask)
            top = v00 * (1 - fx)[:, None] + v01 * fx[:, None]
            bottom = v10 * (1 - fx)[:, None] + v11 * fx[:, None]
            acc += (top * (1 - fy)[:, None] + bottom * fy[:, None]) * attn[:, None]
    out = out_ptr + row[:, None] * head_dim + channels[None, :]
    if BFLOAT16:
        tl.store(out, _round_to_bfloat16(acc), mask=valid[:, None] & channel_mask[None, :])
    else:
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=valid[:, None] & channel_mask[None, :])


@triton.jit
def _backward_kernel(grad_out_ptr, value_ptr, levels_ptr, loc_ptr, weight_ptr,
                     grad_value_ptr, grad_loc_ptr, grad_weight_ptr,
                     tokens, queries, heads, levels, points, head_dim,
                     BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr):
    batch_head = tl.program_id(1)
    b = (batch_head // heads).to(tl.int64)
    h = batch_head % heads
    q = tl.program_id(0) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    channels = tl.arange(0, BLOCK_D)
    valid = q < queries
    channel_mask = channels < head_dim
    row = (b * queries + q) * heads + h
    value_offset = (b * tokens * heads + h) * head_dim
    value_base = value_ptr + value_offset
    grad_value_base = grad_value_ptr + value_offset
    row_stride = heads * head_dim
    rows = row[:, None] * head_dim + channels[None, :]
    grad = tl.load(grad_out_ptr + rows, mask=valid[:, None] & channel_mask[None, :], other=0.0).to(tl.float32)
    for level in range(levels):
        height = tl.load(levels_ptr + 3 * level)
        width = tl.load(levels_ptr + 3 * level + 1)
        start = tl.load(levels_ptr + 3 * level + 2)
        for point in range(points):
            sample = (row * levels + level) * points + point
            attn, x0, y0, fx, fy = _sample_point(loc_ptr, weight_ptr, sample, valid, width, height)
            v00, o00, m00 = _neighbour(value_base, start, x0, y0, width, height, row_stride, channels, valid,
                                       channel_mask)
            v01, o01, m01 = _neighbour(value_base, start, x0 + 1, y0, width, height, row_stride, channels, valid,
                                       channel_mask)
            v10, o10, m10 = _neighbour(value_base, start, x0, y0 + 1, width, height, row_stride, channels, valid,
                                       channel_mask)
            v11, o11, m11 = _neighbour(value_base, start, x0 + 1, y0 + 1, width, height, row_stride, channels, valid,
                                       channel_mask)
            gx = (1 - fx)[:, None]
            fx2 = fx[:, None]
            gy = (1 - fy)[:, None]
            fy2 = fy[:, None]
            sampled = (v00 * gx + v01 * fx2) * gy + (v10 * gx + v11 * fx2) * fy2
            tl.store(grad_weight_ptr + sample, tl.sum(grad * sampled, axis=1), mask=valid)
            # d sample / d x and d y in pixel units; x = location * width - 0.5
            d_x = (v01 - v00) * gy + (v11 - v10) * fy2
            d_y = (v10 - v00) * gx + (v11 - v01) * fx2
            tl.store(grad_loc_ptr + 2 * sample, attn * width * tl.sum(grad * d_x, axis=1), mask=valid)
            tl.store(grad_loc_ptr + 2 * sample + 1, attn * height * tl.sum(grad * d_y, axis=1), mask=valid)
            # relaxed: the adds need no ordering among themselves, only completion by the kernel's end
            weighted = grad * attn[:, None]
            tl.atomic_add(grad_value_base + o00, weighted * (gx * gy), mask=m00, sem="relaxed")
            tl.atomic_add(grad_value_base + o01, weighted * (fx2 * gy), mask=m01, sem="relaxed")
            tl.atomic_add(grad_value_base + o10, weighted * (gx * fy2), mask=m10, sem="relaxed")
            tl.atomic_add(grad_value_base + o11, weighted * (fx2 * fy2), mask=m11, sem="relaxed")


# whether Triton defined the kernels above for its interpreter (it reads TRITON_INTERPRET once, when
# first imported: setting it after anything imported triton has no effect)
INTERPRETED = not isinstance(_forward_kernel, triton.runtime.jit.JITFunction)


def _check(value: Tensor, spatial_shapes: list[int], locations: Tensor, weights: Tensor) -> None:
    """The shapes and dtypes the kernels assume, with errors that name what differs."""
    if len(spatial_shapes) % 2:
        raise ValueError(f"spatial_shapes must hold (H, W) pairs, got {spatial_shapes}")
    if value.dim() != 4 or locations.dim() != 6 or weights.dim() != 5:
        raise ValueError("value must be (B, S, heads, D), locations (B, Q, heads, levels, points, 2) and weights "
                         f"(B, Q, heads, levels, points); got {tuple(value.shape)}, {tuple(locations.shape)}, "
                         f"{tuple(weights.shape)}")
    batch, tokens, heads, _ = value.shape
    levels = len(spatial_shapes) // 2
    covered = sum(spatial_shapes[i] * spatial_shapes[i + 1] for i in range(0, len(spatial_shapes), 2))
    if covered != tokens:
        raise ValueError(f"spatial_shapes cover {covered} tokens but value has {tokens}")
    if (locations.shape[0] != batch or locations.shape[2] != heads or locations.shape[3] != levels
            or locations.shape[5] != 2 or weights.shape != locations.shape[:5]):
        raise ValueError(f"locations {tuple(locations.shape)} and weights {tuple(weights.shape)} do not match value "
                         f"{tuple(value.shape)} with {levels} levels")
    for t in (value, locations, weights):
        if t.dtype not in DTYPES or t.device != value.device:
            raise ValueError(f"the Triton kernel takes float32, bfloat16 or float16 tensors on one device, got "
                             f"{[(str(x.device), x.dtype) for x in (value, locations, weights)]}")


@functools.lru_cache(maxsize=64)
def _level_table(spatial_shapes: tuple[int, ...], device: torch.device) -> Tensor:
    """(levels, 3) int32 rows (H, W, index of the level's first token in S) on ``device``; cached,
    so that a model's dozen calls per image copy it to the device once."""
    rows, start = [], 0
    for i in range(0, len(spatial_shapes), 2):
        rows.append((spatial_shapes[i], spatial_shapes[i + 1], start))
        start += spatial_shapes[i] * spatial_shapes[i + 1]
    return torch.tensor(rows, dtype=torch.int32, device=device)


def _grid(batch: int, queries: int, heads: int) -> tuple[int, int]:
    return triton.cdiv(queries, BLOCK_Q), batch * heads


@torch.library.custom_op("codetr::ms_deform_attn_triton", mutates_args=())
def ms_deform_attn_triton(value: Tensor, spatial_shapes: list[int], locations: Tensor, weights: Tensor) -> Tensor:
    """value (B, S, heads, D), spatial_shapes [H_0, W_0, H_1, ...], locations (B, Q, heads, levels,
    points, 2) normalised (x, y), weights (B, Q, heads, levels, points) -> (B, Q, heads, D) in the
    value's dtype."""
    _check(value, spatial_shapes, locations, weights)
    value, locations, weights = value.contiguous(), locations.contiguous(), weights.contiguous()
    batch, tokens, heads, head_dim = value.shape
    queries, levels, points = locations.shape[1], locations.shape[3], locations.shape[4]
    if batch * queries * heads * head_dim == 0 or levels * points == 0:
        return value.new_zeros(batch, queries, heads, head_dim)
    out = value.new_empty(batch, queries, heads, head_dim)  # every element is written
    _forward_kernel[_grid(batch, queries, heads)](
        value, _level_table(tuple(spatial_shapes), value.device), locations, weights, out,
        tokens, queries, heads, levels, points, head_dim, BLOCK_Q=BLOCK_Q, BLOCK_D=triton.next_power_of_2(head_dim),
        BFLOAT16=value.dtype == torch.bfloat16)
    return out


@ms_deform_attn_triton.register_fake
def _forward_fake(value: Tensor, spatial_shapes: list[int], locations: Tensor, weights: Tensor) -> Tensor:
    return value.new_empty(locations.shape[0], locations.shape[1], value.shape[2], value.shape[3])


@torch.library.custom_op("codetr::ms_deform_attn_triton_backward", mutates_args=())
def ms_deform_attn_triton_backward(grad_output: Tensor, value: Tensor, spatial_shapes: list[int], locations: Tensor,
                                   weights: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """grad_output (B, Q, heads, D) -> the gradients of value, locations and weights, each in its
    input's dtype (accumulated in float32)."""
    grad_output = grad_output.contiguous()
    value, locations, weights = value.contiguous(), locations.contiguous(), weights.contiguous()
    batch, tokens, heads, head_dim = value.shape
    queries, levels, points = locations.shape[1], locations.shape[3], locations.shape[4]
    launch = grad_output.numel() > 0 and levels * points > 0
    grad_value = torch.zeros(value.shape, dtype=torch.float32, device=value.device)  # atomic adds into it
    # every element is written when the kernel runs
    grad_locations = (torch.empty if launch else torch.zeros)(locations.shape, dtype=torch.float32, device=value.device)
    grad_weights = (torch.empty if launch else torch.zeros)(weights.shape, dtype=torch.float32, device=value.device)
    if launch:
        _backward_kernel[_grid(batch, queries, heads)](
            grad_output, value, _level_table(tuple(spatial_shapes), value.device), locations, weights,
            grad_value, grad_locations, grad_weights, tokens, queries, heads, levels, points, head_dim,
            BLOCK_Q=BLOCK_Q, BLOCK_D=triton.next_power_of_2(head_dim))
    return grad_value.to(value.dtype), grad_locations.to(locations.dtype), grad_weights.to(weights.dtype)


ms_deform_attn_triton_backward.register_fake(backward_fake)
register_autograd(ms_deform_attn_triton, ms_deform_attn_triton_backward)


def triton_deformable_attn(value: Tensor, spatial_shapes: list[tuple[int, int]], locations: Tensor,
                           weights: Tensor) -> Tensor:
    """Same contract as :func:`codetr.ops.multi_scale_deformable_attn` (value (B, S, heads, D),
    locations (B, Q, heads, levels, points, 2) normalised (x, y), weights (B, Q, heads, levels,
    points); returns (B, Q, heads * D) in the value's dtype), for CUDA tensors (CPU tensors when
    :data:`INTERPRETED`)."""
    batch, queries = locations.shape[:2]
    shapes = [int(size) for hw in spatial_shapes for size in hw]
    return ms_deform_attn_triton(value, shapes, locations, weights).view(batch, queries, value.shape[2] * value.shape[3])
