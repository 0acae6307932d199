"""Conditional DETR (Meng et al., ICCV 2021) on the single-scale base (``codetr.models.single_scale_detr``),
as the reference implementation (Atten4Vis/ConditionalDETR) and transformers' ``ConditionalDetrForObjectDetection``.

Queries: ``num_queries`` learned positions p_q (``query_embedding``) with zero content. Each query's
reference point s = sigmoid(MLP(p_q)) (``ref_point_head``) is fixed through the decoder; the spatial
query of a layer is T * PE(s), with PE the sine embedding of the point and T = 1 in the first layer,
``query_scale``(content) after it. Every layer predicts class logits and a box whose centre is
relative to the reference point: box = sigmoid(delta + (logit(s), 0)).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from codetr.models.deformable_detr import EncoderOutput, QuerySet, refine
from codetr.models.single_scale_detr import SingleScaleDETR, zeros_query
from codetr.models.transformer.mlp import mlp
from codetr.models.transformer.position import box_sine_embed
from codetr.structures import DetrOutput


class ConditionalDETR(SingleScaleDETR):
    """Conditional DETR: learned query positions, fixed 2-d reference points, conditional spatial queries."""

    def build_query_parts(self) -> None:
        t = self.cfg.transformer
        self.query_embedding = nn.Embedding(t.num_queries, t.d_model)
        self.ref_point_head = mlp(t.d_model, t.d_model, 2, 2)

    def transformer_parts(self) -> list[nn.Module]:
        return super().transformer_parts() + [self.ref_point_head]

    def select_queries(self, enc: EncoderOutput) -> QuerySet:
        """Zero content, the learned positions (B, Q, d) and their reference points (B, Q, 2) xy normalised."""
        batch = enc.memory.shape[0]
        query_pos = self.query_embedding.weight.unsqueeze(0).expand(batch, -1, -1)
        query = zeros_query(batch, query_pos.shape[1], query_pos.shape[2], enc.memory)
        return QuerySet(query, query_pos, self.ref_point_head(query_pos).sigmoid())

    def decode(self, enc: EncoderOutput, query: Tensor, query_pos: Tensor | None, reference: Tensor,
               self_attn_mask: Tensor | None = None) -> DetrOutput:
        """The decoder from query, query_pos (B, Q, d) and reference points (B, Q, 2) xy, or boxes
        (B, Q, 4) cxcywh whose centres are the points, normalised; self_attn_mask (Q, Q) or
        (B * heads, Q, Q), True = blocked."""
        if query_pos is None:
            raise ValueError("Conditional DETR's decoder needs the query position")
        center = reference[..., :2]
        spatial = box_sine_embed(center, self.cfg.transformer.d_model // 2)
        memory, memory_pos = self.decoder_inputs(enc)
        hidden = query
        logits, boxes = [], []
        for i, layer in enumerate(self.decoder_layers):
            scale = 1.0 if i == 0 else self.query_scale(hidden)
            hidden = layer(hidden, query_pos, spatial * scale, memory, memory_pos, enc.padding_mask, self_attn_mask)
            normed = self.decoder_norm(hidden)
            logits.append(self.class_branches[0](normed))
            boxes.append(refine(self.box_branches[0](normed), center))
        return DetrOutput(torch.stack(logits), torch.stack(boxes))
