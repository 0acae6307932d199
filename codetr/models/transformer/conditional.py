"""The transformer of the single-scale DETRs (Conditional DETR, DAB-DETR): a standard multi-head
attention encoder over one feature map, and decoder layers with conditional cross-attention.

Conditional cross-attention (Conditional DETR, Sec. 3.3): queries and keys are the concatenation,
per head, of a content part and a spatial part. The query's spatial part is the sine embedding of its
reference point (or anchor box), transformed by the decoder; the key's is the projected sine position
of the memory token. Content and spatial similarities thus add up inside one dot product, whose
scale is that of the doubled head width. Only the first layer also adds the query position to the
content query (and the key position to the content key), as the reference implementations do.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from codetr.models.transformer.encoder import feed_forward
from codetr.models.transformer.mlp import mlp


def attention(query: Tensor, key: Tensor, value: Tensor, num_heads: int, blocked: Tensor | None = None,
              dropout: float = 0.0) -> Tensor:
    """Scaled dot-product attention of ``num_heads`` heads.

    query (B, Q, H * Dq), key (B, S, H * Dq), value (B, S, H * Dv); blocked: bool, True where query i
    may not attend to key j, broadcastable to (B, H, Q, S). Returns (B, Q, H * Dv); scale Dq ** -0.5.
    """
    batch, num_queries, _ = query.shape
    q = query.view(batch, num_queries, num_heads, -1).transpose(1, 2)
    k = key.view(batch, key.shape[1], num_heads, -1).transpose(1, 2)
    v = value.view(batch, value.shape[1], num_heads, -1).transpose(1, 2)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=None if blocked is None else ~blocked, dropout_p=dropout)
    return out.transpose(1, 2).reshape(batch, num_queries, -1)


def heads_mask(mask: Tensor | None, num_heads: int) -> Tensor | None:
    """A self-attention mask (Q, Q) or (B * heads, Q, Q), True = blocked -> broadcastable to (B, heads, Q, Q)."""
    if mask is None or mask.dim() == 2:
        return mask
    return mask.view(-1, num_heads, *mask.shape[-2:])


class DetrEncoderLayer(nn.Module):
    """Post-norm layer: multi-head self-attention (position added to queries and keys), then a feed-forward network."""

    def __init__(self, d_model: int, ffn_dim: int, n_heads: int, dropout: float, activation: nn.Module) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, n_heads, dropout=dropout, batch_first=True)
        self.dropout = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.ffn = feed_forward(d_model, ffn_dim, dropout, activation)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(self, src: Tensor, pos: Tensor, padding_mask: Tensor) -> Tensor:
        """src, pos (B, S, d); padding_mask (B, S) True on padding -> (B, S, d)."""
        q = k = src + pos
        attn = self.self_attn(q, k, src, key_padding_mask=padding_mask, need_weights=False)[0]
        src = self.norm1(src + self.dropout(attn))
        return self.norm2(src + self.ffn(src))


class DetrEncoder(nn.Module):
    """``num_layers`` encoder layers. With ``scale_positions`` (DAB-DETR), each layer's position is the
    sine position times an MLP of the layer's input (``pos_scale``, shared by the layers)."""

    def __init__(self, num_layers: int, d_model: int, ffn_dim: int, n_heads: int, dropout: float,
                 activation: type[nn.Module], scale_positions: bool = False) -> None:
        super().__init__()
        self.layers = nn.ModuleList(DetrEncoderLayer(d_model, ffn_dim, n_heads, dropout, activation())
                                    for _ in range(num_layers))
        self.pos_scale = mlp(d_model, d_model, d_model, 2) if scale_positions else None

    def forward(self, src: Tensor, pos: Tensor, padding_mask: Tensor) -> Tensor:
        """src, pos (B, S, d); padding_mask (B, S) True on padding -> (B, S, d)."""
        for layer in self.layers:
            src = layer(src, pos if self.pos_scale is None else pos * self.pos_scale(src), padding_mask)
        return src


class ConditionalSelfAttention(nn.Module):
    """Decoder self-attention with separate content and position projections:
    q = Wq_c x + Wq_p p, k = Wk_c x + Wk_p p, v = Wv x."""

    def __init__(self, d_model: int, n_heads: int, dropout: float) -> None:
        super().__init__()
        self.n_heads, self.dropout = n_heads, dropout
        self.q_content, self.q_pos = nn.Linear(d_model, d_model), nn.Linear(d_model, d_model)
        self.k_content, self.k_pos = nn.Linear(d_model, d_model), nn.Linear(d_model, d_model)
        self.value = nn.Linear(d_model, d_model)
        self.out_proj = nn.Linear(d_model, d_model)

    def forward(self, x: Tensor, pos: Tensor, blocked: Tensor | None = None) -> Tensor:
        """x, pos (B, Q, d); blocked broadcastable to (B, heads, Q, Q), True = blocked -> (B, Q, d)."""
        q = self.q_content(x) + self.q_pos(pos)
        k = self.k_content(x) + self.k_pos(pos)
        out = attention(q, k, self.value(x), self.n_heads, blocked, self.dropout if self.training else 0.0)
        return self.out_proj(out)


class ConditionalCrossAttention(nn.Module):
    """Conditional cross-attention (module docstring). ``q_pos`` exists in the first layer only."""

    def __init__(self, d_model: int, n_heads: int, dropout: float, first: bool) -> None:
        super().__init__()
        self.n_heads, self.dropout = n_heads, dropout
        self.q_content = nn.Linear(d_model, d_model)
        self.q_pos = nn.Linear(d_model, d_model) if first else None
        self.q_spatial = nn.Linear(d_model, d_model)
        self.k_content, self.k_pos = nn.Linear(d_model, d_model), nn.Linear(d_model, d_model)
        self.value = nn.Linear(d_model, d_model)
        self.out_proj = nn.Linear(d_model, d_model)

    def forward(self, x: Tensor, query_pos: Tensor, query_spatial: Tensor, memory: Tensor, memory_pos: Tensor,
                padding_mask: Tensor) -> Tensor:
        """x, query_pos, query_spatial (B, Q, d); memory, memory_pos (B, S, d); padding_mask (B, S)
        True on padding -> (B, Q, d)."""
        batch, num_queries, d = x.shape
        q, k, k_pos = self.q_content(x), self.k_content(memory), self.k_pos(memory_pos)
        if self.q_pos is not None:
            q, k = q + self.q_pos(query_pos), k + k_pos
        q = torch.cat([q.view(batch, num_queries, self.n_heads, -1),
                       self.q_spatial(query_spatial).view(batch, num_queries, self.n_heads, -1)], -1)
        k = torch.cat([k.view(batch, k.shape[1], self.n_heads, -1), k_pos.view(batch, k.shape[1], self.n_heads, -1)], -1)
        out = attention(q.flatten(2), k.flatten(2), self.value(memory), self.n_heads, padding_mask[:, None, None, :],
                        self.dropout if self.training else 0.0)
        return self.out_proj(out)


class ConditionalDecoderLayer(nn.Module):
    """Post-norm decoder layer: conditional self-attention, conditional cross-attention, FFN."""

    def __init__(self, d_model: int, ffn_dim: int, n_heads: int, dropout: float, activation: nn.Module,
                 first: bool) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.self_attn = ConditionalSelfAttention(d_model, n_heads, dropout)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.cross_attn = ConditionalCrossAttention(d_model, n_heads, dropout, first)
        self.dropout2 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)
        self.ffn = feed_forward(d_model, ffn_dim, dropout, activation)
        self.norm3 = nn.LayerNorm(d_model)

    def forward(self, tgt: Tensor, query_pos: Tensor, query_spatial: Tensor, memory: Tensor, memory_pos: Tensor,
                padding_mask: Tensor, self_attn_mask: Tensor | None = None) -> Tensor:
        """tgt, query_pos, query_spatial (B, Q, d); memory, memory_pos (B, S, d); padding_mask (B, S)
        True on padding; self_attn_mask (Q, Q) or (B * heads, Q, Q), True = blocked -> (B, Q, d)."""
        attn = self.self_attn(tgt, query_pos, heads_mask(self_attn_mask, self.n_heads))
        tgt = self.norm1(tgt + self.dropout1(attn))
        attn = self.cross_attn(tgt, query_pos, query_spatial, memory, memory_pos, padding_mask)
        tgt = self.norm2(tgt + self.dropout2(attn))
        return self.norm3(tgt + self.ffn(tgt))
