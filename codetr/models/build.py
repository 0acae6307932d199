"""Config -> model, with plain imports: the base detector and the Co- parts chosen separately."""

from __future__ import annotations

from torch import nn

from codetr.config import ModelConfig
from codetr.models.deformable_detr import DeformableDETR
from codetr.models.dino import DINO

ARCHS = {"deformable_detr": DeformableDETR, "dino": DINO}


def build_model(cfg: ModelConfig) -> nn.Module:
    """The base detector of ``cfg.arch``; wrapped in Co-DETR training when ``cfg.co.aux_heads``
    names auxiliary heads (Co-Deformable-DETR, Co-DINO)."""
    if cfg.arch not in ARCHS:
        raise ValueError(f"unknown model.arch {cfg.arch!r}; available: {', '.join(ARCHS)}")
    detector = ARCHS[cfg.arch](cfg)
    if not cfg.co.aux_heads:
        return detector
    from codetr.models.codetr import CoDETR
    from codetr.models.positive_queries import DinoPositiveQueryEmbedding, PositiveQueryEmbedding

    queries = None
    if cfg.co.positive_queries:
        # Co-DINO's positive queries carry no content feature and leave the position to DINO's decoder
        embedding = DinoPositiveQueryEmbedding if cfg.arch == "dino" else PositiveQueryEmbedding
        queries = embedding(cfg.transformer.d_model, len(cfg.co.aux_heads))
    return CoDETR(detector, cfg, queries)
