"""Deformable transformer decoder layer: self-attention, deformable cross-attention, FFN."""

from __future__ import annotations

from torch import Tensor, nn

from codetr.models.transformer.deformable_attention import MSDeformAttn
from codetr.models.transformer.encoder import feed_forward


class DeformableDecoderLayer(nn.Module):
    """Post-norm decoder layer. The query position is added to queries and keys of the
    self-attention and to the query of the cross-attention."""

    def __init__(self, d_model: int, ffn_dim: int, n_levels: int, n_heads: int, n_points: int,
                 dropout: float = 0.0) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, n_heads, dropout=dropout, batch_first=True)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.cross_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.dropout2 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)
        self.ffn = feed_forward(d_model, ffn_dim, dropout)
        self.norm3 = nn.LayerNorm(d_model)

    def forward(self, tgt: Tensor, query_pos: Tensor, reference_points: Tensor, memory: Tensor,
                spatial_shapes: list[tuple[int, int]], padding_mask: Tensor,
                self_attn_mask: Tensor | None = None) -> Tensor:
        """tgt, query_pos (B, Q, d); reference_points (B, Q, levels, 2 or 4); memory (B, S, d);
        padding_mask (B, S) True on padding; self_attn_mask (Q, Q) or (B * heads, Q, Q), True = blocked."""
        q = k = tgt + query_pos
        attn = self.self_attn(q, k, tgt, attn_mask=self_attn_mask, need_weights=False)[0]
        tgt = self.norm1(tgt + self.dropout1(attn))
        attn = self.cross_attn(tgt + query_pos, reference_points, memory, spatial_shapes, padding_mask)
        tgt = self.norm2(tgt + self.dropout2(attn))
        return self.norm3(tgt + self.ffn(tgt))
