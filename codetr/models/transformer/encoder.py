"""Deformable transformer encoder: multi-scale deformable self-attention over all levels."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from codetr.models.activation_checkpoint import maybe_checkpoint
from codetr.models.transformer.deformable_attention import MSDeformAttn


def feed_forward(d_model: int, ffn_dim: int, dropout: float, activation: nn.Module | None = None) -> nn.Sequential:
    """Linear, activation (ReLU unless given), dropout, Linear, dropout."""
    return nn.Sequential(nn.Linear(d_model, ffn_dim), activation or nn.ReLU(inplace=True), nn.Dropout(dropout),
                         nn.Linear(ffn_dim, d_model), nn.Dropout(dropout))


class DeformableEncoderLayer(nn.Module):
    """Post-norm layer: deformable self-attention, then a ReLU feed-forward network."""

    def __init__(self, d_model: int, ffn_dim: int, n_levels: int, n_heads: int, n_points: int,
                 dropout: float = 0.0) -> None:
        super().__init__()
        self.self_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.dropout = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.ffn = feed_forward(d_model, ffn_dim, dropout)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(self, src: Tensor, pos: Tensor, reference_points: Tensor, spatial_shapes: list[tuple[int, int]],
                padding_mask: Tensor) -> Tensor:
        """src, pos (B, S, d); reference_points (B, S, levels, 2); padding_mask (B, S) -> (B, S, d)."""
        attn = self.self_attn(src + pos, reference_points, src, spatial_shapes, padding_mask)
        src = self.norm1(src + self.dropout(attn))
        return self.norm2(src + self.ffn(src))


def encoder_reference_points(spatial_shapes: list[tuple[int, int]], valid_ratios: Tensor) -> Tensor:
    """Pixel centres of every level, normalised by the valid extent of that level, as seen
    from every level: (B, S, levels, 2) in (x, y). valid_ratios (B, levels, 2) as (w, h)."""
    points = []
    dtype, device = valid_ratios.dtype, valid_ratios.device
    for level, (h, w) in enumerate(spatial_shapes):
        # arange + 0.5, not linspace: ONNX exports linspace with a step (end - start) / (h - 1),
        # NaN on a level of height or width 1
        ys, xs = torch.meshgrid(torch.arange(h, dtype=dtype, device=device) + 0.5,
                                torch.arange(w, dtype=dtype, device=device) + 0.5, indexing="ij")
        ys = ys.reshape(-1)[None] / (valid_ratios[:, None, level, 1] * h)
        xs = xs.reshape(-1)[None] / (valid_ratios[:, None, level, 0] * w)
        points.append(torch.stack((xs, ys), -1))
    return torch.cat(points, 1)[:, :, None] * valid_ratios[:, None]


class DeformableEncoder(nn.Module):
    """``num_layers`` encoder layers; the first ``with_cp`` of them (all when more) under activation checkpointing."""

    def __init__(self, num_layers: int, d_model: int, ffn_dim: int, n_levels: int, n_heads: int, n_points: int,
                 dropout: float = 0.0, with_cp: int = 0) -> None:
        super().__init__()
        check_with_cp("enc", with_cp)
        self.layers = nn.ModuleList(
            DeformableEncoderLayer(d_model, ffn_dim, n_levels, n_heads, n_points, dropout) for _ in range(num_layers))
        self.with_cp = with_cp

    def forward(self, src: Tensor, pos: Tensor, spatial_shapes: list[tuple[int, int]], valid_ratios: Tensor,
                padding_mask: Tensor) -> Tensor:
        """src, pos (B, S, d) flattened levels; valid_ratios (B, levels, 2); padding_mask (B, S) -> (B, S, d)."""
        reference_points = encoder_reference_points(spatial_shapes, valid_ratios)
        for i, layer in enumerate(self.layers):
            src = maybe_checkpoint(layer, src, pos, reference_points, spatial_shapes, padding_mask, enabled=i < self.with_cp)
        return src


def check_with_cp(part: str, with_cp: int) -> None:
    """``model.transformer.{part}_with_cp`` must be a number of layers (0: none; more than
    ``{part}_layers``: all, so a config with fewer layers keeps its value)."""
    if isinstance(with_cp, bool) or not isinstance(with_cp, int) or with_cp < 0:
        raise ValueError(f"model.transformer.{part}_with_cp must be a number of layers (0 or more), got {with_cp!r}")
