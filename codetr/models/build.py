"""Config -> model, with plain imports: the base detector and the Co- parts chosen separately."""

from __future__ import annotations

from torch import nn

from codetr.config import ModelConfig
from codetr.models.aux.atss import ATSSHead
from codetr.models.aux.roi import FasterRCNNAux
from codetr.models.base import AuxHead
from codetr.models.conditional_detr import ConditionalDETR
from codetr.models.dab_detr import DABDETR
from codetr.models.deformable_detr import DeformableDETR
from codetr.models.dino import DINO

ARCHS = {"deformable_detr": DeformableDETR, "dino": DINO, "conditional_detr": ConditionalDETR, "dab_detr": DABDETR}
# Base detectors whose queries are anchor boxes with the position built in the decoder (the positive
# queries carry content only); the others take a content and a position query.
ANCHOR_QUERIES = ("dino", "dab_detr")
AUX_HEADS = ("rcnn", "atss")


def build_model(cfg: ModelConfig) -> nn.Module:
    """The base detector of ``cfg.arch``; wrapped in Co-DETR training when ``cfg.co.aux_heads``
    names auxiliary heads (Co-Deformable-DETR, Co-DINO, Co-Conditional-DETR, Co-DAB-DETR)."""
    if cfg.arch not in ARCHS:
        raise ValueError(f"unknown model.arch {cfg.arch!r}; available: {', '.join(ARCHS)}")
    detector = ARCHS[cfg.arch](cfg)
    if cfg.mask.enabled and not cfg.co.aux_heads:
        raise ValueError("model.mask needs the Co-DETR wrapper: name its auxiliary heads in model.co.aux_heads")
    if cfg.mask.enabled and len(detector.level_strides) == 1:
        raise ValueError(f"model.mask needs a multi-scale encoder (its RoIs pool the encoder levels); "
                         f"model.arch {cfg.arch!r} has one level")
    if not cfg.co.aux_heads:
        return detector
    from codetr.models.co_detr import CoDETR
    from codetr.models.positive_queries import DinoPositiveQueryEmbedding, PositiveQueryEmbedding

    queries = None
    if cfg.co.positive_queries:
        # Co-DINO's positive queries carry no content feature and leave the position to DINO's decoder
        embedding = DinoPositiveQueryEmbedding if cfg.arch in ANCHOR_QUERIES else PositiveQueryEmbedding
        queries = embedding(cfg.transformer.d_model, len(cfg.co.aux_heads))
    strides, loss_scale = CoDETR.aux_strides(detector), CoDETR.aux_loss_scale(cfg)
    heads = [build_aux_head(name, cfg, strides, loss_scale) for name in cfg.co.aux_heads]
    mask_branch = None
    if cfg.mask.enabled:
        from codetr.models.mask.branch import MaskBranch

        mask_branch = MaskBranch(cfg, detector.level_strides, loss_scale)
    return CoDETR(detector, cfg, heads, queries, mask_branch)


def build_aux_head(name: str, cfg: ModelConfig, strides: list[int], loss_scale: float) -> AuxHead:
    """One auxiliary head on the pyramid of the given strides (the encoder levels + one)."""
    d, co = cfg.transformer.d_model, cfg.co
    if name == "atss":
        return ATSSHead(cfg.num_classes, d, strides=strides, loss_scale=loss_scale, stacked_convs=co.atss_stacked_convs)
    if name == "rcnn":
        return FasterRCNNAux(cfg.num_classes, d, strides=strides, loss_scale=loss_scale, rpn_pre_nms=co.rpn_pre_nms,
                             rpn_proposals=co.rpn_proposals, roi_samples=co.roi_samples, roi_fc_dim=co.roi_fc_dim,
                             roi_finest_scale=co.roi_finest_scale, roi_convs=co.roi_convs, roi_fcs=co.roi_fcs,
                             roi_class_agnostic=co.roi_class_agnostic, roi_target_stds=tuple(co.roi_target_stds),
                             roi_mask=co.roi_mask)
    raise ValueError(f"unknown auxiliary head {name!r} in model.co.aux_heads; choose from {AUX_HEADS}")
