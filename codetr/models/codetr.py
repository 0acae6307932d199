"""The collaborative detector: Deformable-DETR trained with Co-DETR's hybrid assignments.

Training step (the paper's Fig. 3, as released):

1. backbone -> neck -> encoder -> decoder -> one-to-one DETR losses (the plain detector);
2. the encoder memory becomes a feature pyramid (plus one stride-2 level) for the auxiliary
   one-to-many heads (Faster R-CNN, ATSS), whose losses, scaled by ``dec_layers * lambda2``,
   flow back into the encoder and backbone;
3. each auxiliary head's assigned boxes become a group of customized positive queries that run
   through the shared decoder once per head, with the DETR losses (times ``lambda1``) against
   the auxiliary assignment.

At inference only the plain detector runs (or one auxiliary head, with ``eval_head``); the saved
inference weights are those of the plain model.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from codetr.config import ModelConfig
from codetr.models.aux.atss import ATSSHead
from codetr.models.aux.roi import FasterRCNNAux
from codetr.models.deformable_detr import DeformableDETR, EncoderOutput
from codetr.models.neck import PyramidAdapter
from codetr.models.positive_queries import PositiveQueryEmbedding, select_positive_queries
from codetr.structures import Batch, Detections

AUX_HEADS = ("rcnn", "atss")


def build_aux_head(name: str, cfg: ModelConfig, strides: list[int], loss_scale: float) -> nn.Module:
    d, co = cfg.transformer.d_model, cfg.co
    if name == "atss":
        return ATSSHead(cfg.num_classes, d, strides=strides, loss_scale=loss_scale, stacked_convs=co.atss_stacked_convs)
    if name == "rcnn":
        return FasterRCNNAux(cfg.num_classes, d, strides=strides, loss_scale=loss_scale, rpn_pre_nms=co.rpn_pre_nms,
                             rpn_proposals=co.rpn_proposals, roi_samples=co.roi_samples, roi_fc_dim=co.roi_fc_dim)
    raise ValueError(f"unknown auxiliary head {name!r} in model.co.aux_heads; choose from {AUX_HEADS}")


class CoDeformableDETR(DeformableDETR):
    """Deformable-DETR with auxiliary one-to-many heads and customized positive queries.

    Parameters shared with the plain model keep the plain model's names; the training-only
    parts live under ``adapter``, ``aux_heads`` and ``positive_queries``.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        co = cfg.co
        if co.eval_head != "detr" and co.eval_head not in co.aux_heads:
            raise ValueError(f"model.co.eval_head={co.eval_head!r} is not among model.co.aux_heads={co.aux_heads}")
        t = cfg.transformer
        self.co = co
        strides = [8 * 2**i for i in range(t.num_feature_levels + 1)]
        loss_scale = t.dec_layers * co.lambda2
        self.adapter = PyramidAdapter(t.d_model)
        self.aux_heads = nn.ModuleDict({name: build_aux_head(name, cfg, strides, loss_scale) for name in co.aux_heads})
        self.positive_queries = (
            PositiveQueryEmbedding(t.d_model, len(co.aux_heads)) if co.positive_queries and co.aux_heads else None
        )

    def inference_state_dict(self) -> dict[str, Tensor]:
        """The plain detector's weights (plus the evaluated auxiliary head, if not "detr")."""
        training_only = ("adapter.", "aux_heads.", "positive_queries.")
        keep = () if self.co.eval_head == "detr" else ("adapter.", f"aux_heads.{self.co.eval_head}.")
        return {k: v for k, v in self.state_dict().items()
                if not k.startswith(training_only) or k.startswith(keep)}

    def aux_pyramid(self, enc: EncoderOutput) -> list[Tensor]:
        """Encoder memory as per-level maps (B, d, H_l, W_l) plus one stride-2 level."""
        return self.adapter(enc.memory, enc.spatial_shapes)

    def loss(self, batch: Batch) -> dict[str, Tensor]:
        output, enc = self(batch.images, batch.masks)
        losses = self.criterion(output, batch.targets, batch.image_sizes)
        if not self.aux_heads:
            return losses
        pyramid = self.aux_pyramid(enc)
        for index, (name, head) in enumerate(self.aux_heads.items()):
            head_losses, positive_sets = head.forward_train(pyramid, batch.image_sizes, batch.targets)
            losses.update(head_losses)
            if self.positive_queries is None:
                continue
            group = select_positive_queries(
                positive_sets, batch.image_sizes, self.cfg.num_classes,
                max_queries=self.co.max_pos_queries, min_queries=self.co.min_pos_queries,
                zero_padding=self.co.zero_padding,
            )
            query, query_pos = self.positive_queries(index, group.reference, group.feats)
            mask = group.self_attn_mask
            if mask is not None:  # (B, G, G) -> (B * heads, G, G)
                mask = mask.repeat_interleave(self.cfg.transformer.n_heads, dim=0)
            aux_out = self.decode(enc, query, query_pos, group.reference, self_attn_mask=mask)
            aux_losses = self.criterion.assigned_loss(
                aux_out.logits, aux_out.boxes, group.labels, group.target_boxes,
                group.label_weights, group.box_weights, suffix=f"_pos_{name}",
            )
            losses.update({k: v * self.co.lambda1 for k, v in aux_losses.items()})
        return losses

    @torch.no_grad()
    def predict(self, batch: Batch) -> list[Detections]:
        if self.co.eval_head == "detr":
            return super().predict(batch)
        enc = self.encode(*self.extract_features(batch.images, batch.masks))
        return self.aux_heads[self.co.eval_head].predict(self.aux_pyramid(enc), batch.image_sizes)
