"""DINO (Zhang et al., 2022) as the base detector of Co-DINO, following the released
``CoDINOHead`` / ``CoDinoTransformer`` / ``DinoTransformerDecoder``.

What differs from Deformable-DETR (each one overridden step):

- ``select_queries``: mixed query selection: the top-k encoder proposals by their best class
  score give the reference boxes, learned content queries the content; the query position is
  not made here.
- ``decode``: DINO's decoder: each layer's query position comes from its reference box (sine
  embedding through ``ref_point_head``); a final LayerNorm on every layer's output for the heads;
  the reference is refined from the un-normalised output (detached), while each layer's box
  prediction refines the previous layer's undetached reference (look-forward-twice).
- ``detr_loss``: contrastive denoising queries run in front of the matching queries, kept apart
  by the attention mask; quality focal loss everywhere, encoder loss on the selected top-k with
  class targets.
- ``postprocess``: top ``num_queries`` (query, class) pairs, class-wise Soft-NMS, keep
  ``max_detections``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from codetr.config import ModelConfig
from codetr.models.activation_checkpoint import maybe_checkpoint
from codetr.models.deformable_detr import DeformableDETR, EncoderOutput, QuerySet
from codetr.models.losses.detr_loss import DetrCriterion, normalised_targets
from codetr.models.transformer.denoising import ContrastiveDenoising, DenoisingGroups
from codetr.models.transformer.mlp import mlp
from codetr.models.transformer.position import box_sine_embed
from codetr.ops.boxes import inverse_sigmoid
from codetr.ops.soft_nms import batched_soft_nms
from codetr.structures import Batch, Detections, DetrOutput

# DINO's decoder and head take the logit of a reference box with eps 1e-3 (1e-5 elsewhere).
REFERENCE_EPS = 1e-3


class DINO(DeformableDETR):
    """Backbone + channel mapper + deformable encoder + DINO decoder + denoising + heads."""

    def __init__(self, cfg: ModelConfig) -> None:
        t = cfg.transformer
        if not (t.two_stage and t.box_refine):
            raise ValueError("DINO needs model.transformer.two_stage and box_refine")
        super().__init__(cfg)
        self.criterion = DetrCriterion(cfg.num_classes, cfg.loss, class_agnostic_proposals=False)

    def build_query_parts(self) -> None:
        t, dino = self.cfg.transformer, self.cfg.dino
        self.enc_output = nn.Linear(t.d_model, t.d_model)
        self.enc_output_norm = nn.LayerNorm(t.d_model)
        self.query_embedding = nn.Embedding(t.num_queries, t.d_model)
        self.ref_point_head = mlp(2 * t.d_model, t.d_model, t.d_model, 2)
        self.decoder_norm = nn.LayerNorm(t.d_model)
        self.denoising = ContrastiveDenoising(self.cfg.num_classes, t.d_model, dino.num_dn_queries,
                                              dino.label_noise, dino.box_noise)

    def transformer_parts(self) -> list[nn.Module]:
        return [self.encoder, self.decoder_layers, self.enc_output, self.ref_point_head]

    def reset_parameters(self) -> None:
        super().reset_parameters()
        nn.init.normal_(self.query_embedding.weight)

    def select_queries(self, enc: EncoderOutput) -> QuerySet:
        """Top ``num_queries`` proposals by their best class logit: their boxes (detached) are the
        references, the learned embedding the content. enc_logits / enc_boxes hold the selected
        proposals' logits (B, K, C) and boxes (B, K, 4) for the encoder loss."""
        memory, proposals = self.encoder_proposals(enc)
        enc_logits = self.class_branches[-1](memory)
        enc_coords = self.box_branches[-1](memory) + proposals
        k = min(self.cfg.transformer.num_queries, enc_logits.shape[1])
        top = torch.topk(enc_logits.max(-1)[0], k, dim=1)[1]
        top_logits = torch.gather(enc_logits, 1, top.unsqueeze(-1).expand(-1, -1, enc_logits.shape[-1]))
        top_coords = torch.gather(enc_coords, 1, top.unsqueeze(-1).expand(-1, -1, 4))
        query = self.query_embedding.weight[:k].unsqueeze(0).expand(enc.memory.shape[0], -1, -1)
        return QuerySet(query, None, top_coords.detach().sigmoid(), top_logits, top_coords.sigmoid())

    def decode(self, enc: EncoderOutput, query: Tensor, query_pos: Tensor | None, reference: Tensor,
               self_attn_mask: Tensor | None = None) -> DetrOutput:
        """DINO's decoder from query (B, Q, d) and reference boxes (B, Q, 4) cxcywh normalised;
        ``query_pos`` must be None (built per layer from the reference); self_attn_mask (Q, Q) or
        (B * heads, Q, Q), True = blocked."""
        if query_pos is not None:
            raise ValueError("DINO's decoder builds the query position from the reference box")
        d = self.cfg.transformer.d_model
        ratios = torch.cat([enc.valid_ratios, enc.valid_ratios], -1)[:, None]
        sample_ref = head_ref = reference
        hidden = query
        logits, boxes = [], []
        for i, layer in enumerate(self.decoder_layers):
            ref_input = sample_ref[:, :, None] * ratios
            query_pos = self.ref_point_head(box_sine_embed(ref_input[:, :, 0], d // 2))
            hidden = maybe_checkpoint(layer, hidden, query_pos, ref_input, enc.memory, enc.spatial_shapes,
                                      enc.padding_mask, self_attn_mask, enabled=i < self.cfg.transformer.dec_with_cp)
            normed = self.decoder_norm(hidden)
            logits.append(self.class_branches[i](normed))
            boxes.append((self.box_branches[i](normed) + inverse_sigmoid(head_ref, REFERENCE_EPS)).sigmoid())
            head_ref = (self.box_branches[i](hidden) + inverse_sigmoid(sample_ref, REFERENCE_EPS)).sigmoid()
            sample_ref = head_ref.detach()
        return DetrOutput(torch.stack(logits), torch.stack(boxes))

    # ---- training ---------------------------------------------------------------------------

    def detr_loss(self, batch: Batch) -> tuple[dict[str, Tensor], EncoderOutput, DetrOutput]:
        """Matching, encoder and denoising losses of a training batch, the encoder output and the
        decoder's predictions (denoising queries first, as released)."""
        enc = self.encode_images(batch.images, batch.masks)
        queries = self.select_queries(enc)
        labels = [t.labels for t in batch.targets]
        dn = self.denoising(labels, normalised_targets(batch.targets, batch.image_sizes), queries.query.shape[1])
        if dn is None:
            out = self.decode(enc, queries.query, None, queries.reference)
        else:
            query = torch.cat([dn.query, queries.query], 1)
            reference = torch.cat([dn.reference, queries.reference], 1)
            out = self.decode(enc, query, None, reference, dn.attn_mask)
        num_dn = 0 if dn is None else dn.query.shape[1]
        matching = DetrOutput(out.logits[:, :, num_dn:], out.boxes[:, :, num_dn:], queries.enc_logits,
                              queries.enc_boxes)
        losses = self.criterion(matching, batch.targets, batch.image_sizes)
        losses.update(self.denoising_loss(out, dn))
        return losses, enc, out

    def denoising_loss(self, out: DetrOutput, dn: DenoisingGroups | None) -> dict[str, Tensor]:
        """Losses of the denoising queries (the first ones of ``out``) against the copies' targets.
        Without ground truth there are no denoising queries: zero losses under the same keys,
        which still reach the label embedding (every parameter gets a gradient, as released:
        distributed training needs it)."""
        if dn is not None:
            num_dn = dn.query.shape[1]
            return self.criterion.assigned_loss(out.logits[:, :, :num_dn], out.boxes[:, :, :num_dn], dn.labels,
                                                dn.target_boxes, dn.label_weights, dn.box_weights, prefix="dn.")
        batch = out.logits.shape[1]
        labels = torch.zeros((batch, 0), dtype=torch.int64, device=out.logits.device)
        weights = torch.zeros((batch, 0), device=out.logits.device)
        losses = self.criterion.assigned_loss(out.logits[:, :, :0], out.boxes[:, :, :0], labels, out.boxes[0, :, :0],
                                              weights, weights, prefix="dn.")
        losses["dn.loss_cls"] = losses["dn.loss_cls"] + self.denoising.label_embedding.weight.sum() * 0.0
        return losses

    # ---- inference ----------------------------------------------------------------------------

    def postprocess(self, logits: Tensor, boxes: Tensor, image_sizes: Tensor,
                    top_k: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """The tensor part of the released inference: the top ``num_queries`` (query, class)
        pairs by sigmoid score before Soft-NMS (``model.dino.soft_nms_candidates`` when set;
        ``max_detections`` with ``model.dino.soft_nms`` off), boxes xyxy in pixels of image_sizes,
        clipped. Soft-NMS follows in ``predict`` (``apply_soft_nms``), outside the exported graph."""
        if top_k is None and self.cfg.dino.soft_nms:
            top_k = self.cfg.dino.soft_nms_candidates or self.cfg.transformer.num_queries
        return super().postprocess(logits, boxes, image_sizes, top_k)

    def finish(self, det: Detections) -> Detections:
        """Of the top ``num_queries`` pairs: class-wise Soft-NMS, the best ``max_detections`` (as
        released); boxes xyxy in pixels of each unpadded input image."""
        return apply_soft_nms(det, self.cfg)

    def inference_state_dict(self) -> dict[str, Tensor]:
        """Everything but the denoising label embedding (used in training only)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("denoising.")}


def apply_soft_nms(det: Detections, cfg: ModelConfig) -> Detections:
    """DINO's released last inference step on one image's top-k (boxes xyxy pixels): class-wise
    Soft-NMS at ``cfg.dino.soft_nms_iou``, then the best ``cfg.max_detections``. Unchanged when
    ``cfg.dino.soft_nms`` is off."""
    if not cfg.dino.soft_nms:
        return det
    keep, scores = soft_nms_keep(det, cfg)
    return Detections(det.boxes[keep], scores, det.labels[keep])


def soft_nms_keep(det: Detections, cfg: ModelConfig) -> tuple[Tensor, Tensor]:
    """:func:`apply_soft_nms`'s choice: the indices into ``det`` it keeps (K,) and their decayed scores (K,)."""
    keep, scores = batched_soft_nms(det.boxes, det.scores, det.labels, cfg.dino.soft_nms_iou)
    return keep[: cfg.max_detections], scores[: cfg.max_detections]
