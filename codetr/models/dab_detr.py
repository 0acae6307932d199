"""DAB-DETR (Liu et al., ICLR 2022) on the single-scale base (``codetr.models.single_scale_detr``), as
the reference implementation (IDEA-Research/DAB-DETR, detrex) and transformers' ``DabDetrForObjectDetection``.

Queries: ``num_queries`` learned anchor boxes (``query_embedding``, cxcywh logits) with zero content.
In each layer, from the layer's anchor A = (x, y, w, h):

- the query position is MLP(PE(A)) (``ref_point_head``; PE: sine embedding of the four coordinates);
- the spatial query is T * PE(x, y) (T = 1 in the first layer, ``query_scale``(content) after it),
  its x part scaled by w_ref / w and its y part by h_ref / h, with (w_ref, h_ref) =
  sigmoid(MLP(content)) (``ref_anchor_head``): the width- and height-modulated attention;
- the layer's box is sigmoid(delta + logit(A)) with the shared box branch; it becomes the next
  layer's anchor (detached, while the box predicted from it still trains this layer's branch).

The encoder scales its positions by an MLP of each layer's input; the FFNs use PReLU.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from codetr.models.deformable_detr import EncoderOutput, QuerySet, refine
from codetr.models.single_scale_detr import SingleScaleDETR, zeros_query
from codetr.models.transformer.mlp import mlp
from codetr.models.transformer.position import box_sine_embed
from codetr.ops.boxes import inverse_sigmoid
from codetr.structures import DetrOutput

# The anchors' width and height divide the modulation; a zero-padded positive query (0 wide) stays finite.
MIN_ANCHOR_SIZE = 1e-6


class DABDETR(SingleScaleDETR):
    """DAB-DETR: learned 4-d anchor boxes as queries, updated layer by layer, modulated cross-attention."""

    activation = nn.PReLU
    scale_encoder_positions = True

    def build_query_parts(self) -> None:
        t = self.cfg.transformer
        self.query_embedding = nn.Embedding(t.num_queries, 4)
        self.ref_point_head = mlp(2 * t.d_model, t.d_model, t.d_model, 2)
        self.ref_anchor_head = mlp(t.d_model, t.d_model, 2, 2)

    def transformer_parts(self) -> list[nn.Module]:
        return super().transformer_parts() + [self.ref_point_head, self.ref_anchor_head]

    def reset_parameters(self) -> None:
        """As detrex's R50 config (``random_refpoints_xy``): anchor centres uniform in the image."""
        super().reset_parameters()
        with torch.no_grad():
            self.query_embedding.weight[:, :2].uniform_(0, 1)
            self.query_embedding.weight[:, :2] = inverse_sigmoid(self.query_embedding.weight[:, :2])

    def select_queries(self, enc: EncoderOutput) -> QuerySet:
        """Zero content (B, Q, d) and the learned anchors (B, Q, 4) cxcywh normalised; no query position."""
        batch = enc.memory.shape[0]
        anchors = self.query_embedding.weight.sigmoid().unsqueeze(0).expand(batch, -1, -1)
        return QuerySet(zeros_query(batch, anchors.shape[1], self.cfg.transformer.d_model, enc.memory), None, anchors)

    def decode(self, enc: EncoderOutput, query: Tensor, query_pos: Tensor | None, reference: Tensor,
               self_attn_mask: Tensor | None = None) -> DetrOutput:
        """The decoder from query (B, Q, d) and anchor boxes (B, Q, 4) cxcywh normalised; ``query_pos``
        must be None (built per layer from the anchor); self_attn_mask (Q, Q) or (B * heads, Q, Q),
        True = blocked."""
        if query_pos is not None:
            raise ValueError("DAB-DETR's decoder builds the query position from the anchor box")
        d = self.cfg.transformer.d_model
        memory, memory_pos = self.decoder_inputs(enc)
        anchor = head_ref = reference
        hidden = query
        logits, boxes = [], []
        for i, layer in enumerate(self.decoder_layers):
            embed = box_sine_embed(anchor, d // 2)  # (B, Q, 2d): y, x, w, h
            query_pos = self.ref_point_head(embed)
            spatial = embed[..., :d] * (1.0 if i == 0 else self.query_scale(hidden))
            size_ref = self.ref_anchor_head(hidden).sigmoid()  # (w_ref, h_ref)
            size = anchor[..., 2:].clamp(min=MIN_ANCHOR_SIZE)
            spatial = torch.cat([spatial[..., : d // 2] * (size_ref[..., 1] / size[..., 1]).unsqueeze(-1),
                                 spatial[..., d // 2:] * (size_ref[..., 0] / size[..., 0]).unsqueeze(-1)], -1)
            hidden = layer(hidden, query_pos, spatial, memory, memory_pos, enc.padding_mask, self_attn_mask)
            normed = self.decoder_norm(hidden)
            logits.append(self.class_branches[0](normed))
            boxes.append(refine(self.box_branches[0](normed), head_ref))
            head_ref = refine(self.box_branches[0](hidden), anchor)
            anchor = head_ref.detach()
        return DetrOutput(torch.stack(logits), torch.stack(boxes))
