"""Config -> model, with plain imports."""

from __future__ import annotations

from torch import nn

from codetr.config import ModelConfig


def build_model(cfg: ModelConfig) -> nn.Module:
    """Deformable-DETR, or Co-Deformable-DETR when ``cfg.co.aux_heads`` names auxiliary heads."""
    if cfg.arch != "deformable_detr":
        raise ValueError(f"unknown model.arch {cfg.arch!r}; available: deformable_detr")
    if cfg.co.aux_heads:
        from codetr.models.codetr import CoDeformableDETR

        return CoDeformableDETR(cfg)
    from codetr.models.deformable_detr import DeformableDETR

    return DeformableDETR(cfg)
