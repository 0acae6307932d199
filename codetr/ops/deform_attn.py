"""Multi-scale deformable attention (Deformable-DETR) in pure PyTorch, via ``grid_sample``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def multi_scale_deformable_attn(
    value: Tensor,
    spatial_shapes: list[tuple[int, int]],
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """Weighted sum of bilinearly sampled values over levels and points.

    value:              (B, S, heads, head_dim), S = sum of H_l * W_l over the levels.
    spatial_shapes:     (H_l, W_l) of each level, in the order the levels are stacked in ``value``.
    sampling_locations: (B, Q, heads, levels, points, 2) normalised (x, y) in [0, 1]; outside
                        the map the value is zero.
    attention_weights:  (B, Q, heads, levels, points).
    Returns (B, Q, heads * head_dim).
    """
    batch, _, heads, head_dim = value.shape
    _, queries, _, levels, points, _ = sampling_locations.shape
    value_levels = value.split([h * w for h, w in spatial_shapes], dim=1)
    grids = 2 * sampling_locations - 1  # grid_sample works in [-1, 1]
    sampled = []
    for level, (h, w) in enumerate(spatial_shapes):
        # (B, H*W, heads, D) -> (B*heads, D, H, W)
        v = value_levels[level].flatten(2).transpose(1, 2).reshape(batch * heads, head_dim, h, w)
        # (B, Q, heads, points, 2) -> (B*heads, Q, points, 2)
        grid = grids[:, :, :, level].transpose(1, 2).flatten(0, 1)
        sampled.append(F.grid_sample(v, grid, mode="bilinear", padding_mode="zeros", align_corners=False))
    # (B*heads, D, Q, levels*points) weighted by (B*heads, 1, Q, levels*points)
    stacked = torch.stack(sampled, dim=-2).flatten(-2)
    weights = attention_weights.transpose(1, 2).reshape(batch * heads, 1, queries, levels * points)
    out = (stacked * weights).sum(-1).view(batch, heads * head_dim, queries)
    return out.transpose(1, 2).contiguous()
