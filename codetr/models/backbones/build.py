"""Backbones: torchvision ResNets with frozen batch norm, timm Swin Transformers run as the
released detection backbone, and the plain EVA-02-style ViT of Co-DINO ViT-L (``codetr.models.backbones.vit``,
one stride-16 map). ResNet and Swin return the stages in ``out_indices``; each has ``out_channels``
(one per returned map).

ImageNet weights (``model.backbone.weights``):

- ``None``: random initialisation;
- ``"torchvision"`` (ResNet): torchvision's ImageNet **V1** weights (``IMAGENET1K_V1``, ResNet-50
  76.1% top-1), the file mmdet's ``torchvision://resnet50`` names, as in the released configs;
- ``"torchvision_v2"`` (ResNet-50/101): torchvision's newer ``IMAGENET1K_V2`` weights (80.9%);
- ``"timm"`` (Swin): timm's default pretrained weights for the model name;
- a file path: a state_dict in the library's own names (torchvision ResNet; Swin in timm names
  or the original Swin release's names, e.g. ``swin_large_patch4_window12_384_22k.pth``).

Downloads go through torchvision / timm (their caches); without network they fail with an error
naming the file to fetch by hand.
"""

from __future__ import annotations

from torch import nn

from codetr.config import BackboneConfig
from codetr.models.backbones.resnet import RESNETS, ResNetBackbone
from codetr.models.backbones.swin import SWINS, SwinBackbone
from codetr.models.backbones.vit import VITS, build_vit


def build_backbone(cfg: BackboneConfig) -> nn.Module:
    """The backbone of a config; it has ``out_channels`` (one per returned map)."""
    names = list(RESNETS) + list(SWINS) + list(VITS)
    if cfg.name not in names:
        raise ValueError(f"unknown backbone {cfg.name!r}; choose from {names}")
    if cfg.name in VITS:
        return build_vit(cfg)
    if cfg.name in SWINS:
        return SwinBackbone(cfg.name, cfg.weights, cfg.frozen_stages, tuple(cfg.out_indices), cfg.drop_path_rate,
                            cfg.with_cp, cfg.timm_args)
    if cfg.timm_args:
        raise ValueError(f"model.backbone.timm_args apply to timm (Swin) backbones, not {cfg.name}")
    return ResNetBackbone(cfg.name, cfg.weights, cfg.frozen_stages, cfg.norm, tuple(cfg.out_indices), cfg.with_cp)
