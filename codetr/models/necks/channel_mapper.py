"""Necks: the channel mapper before the encoder, and the pyramid adapters after it (Co-DETR)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from codetr.config import ModelConfig

NECKS = ("channel_mapper", "sfp")


def conv_gn(in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, bias: bool = True) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2, bias=bias),
        nn.GroupNorm(32, out_channels),
    )


class ChannelMapper(nn.Module):
    """1x1 conv + GroupNorm(32) per backbone level to ``out_channels``; extra levels by 3x3
    stride-2 conv + GroupNorm, the first on the raw last backbone map, the next on the previous
    extra level. As released (mmdet ``ChannelMapper``): the convolutions have no bias (a norm
    follows; ``bias=True`` for transformers' Deformable-DETR input projections) and
    xavier-uniform weights."""

    def __init__(self, in_channels: list[int], out_channels: int, num_levels: int, bias: bool = False) -> None:
        super().__init__()
        if num_levels < len(in_channels):
            raise ValueError(f"num_feature_levels {num_levels} < number of backbone outputs {len(in_channels)}")
        convs = [conv_gn(c, out_channels, 1, bias=bias) for c in in_channels]
        for i in range(num_levels - len(in_channels)):
            convs.append(conv_gn(in_channels[-1] if i == 0 else out_channels, out_channels, 3, stride=2, bias=bias))
        self.convs = nn.ModuleList(convs)
        self.num_inputs = len(in_channels)
        for conv in self.convs:
            nn.init.xavier_uniform_(conv[0].weight)
            if bias:
                nn.init.zeros_(conv[0].bias)

    def forward(self, feats: list[Tensor]) -> list[Tensor]:
        outs = [conv(f) for conv, f in zip(self.convs, feats)]
        for i, conv in enumerate(self.convs[self.num_inputs:]):
            outs.append(conv(feats[-1] if i == 0 else outs[-1]))
        return outs


class PyramidAdapter(nn.Module):
    """Co-DETR's multi-scale adapter: encoder memory (B, S, d) back to per-level maps, plus one
    extra level from a 3x3 stride-2 conv + GroupNorm(32) on the coarsest map (no activation)."""

    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.downsample = conv_gn(d_model, d_model, 3, stride=2)

    def forward(self, memory: Tensor, spatial_shapes: list[tuple[int, int]]) -> list[Tensor]:
        """memory (B, S, d) -> [(B, d, H_l, W_l) for each level] + [(B, d, ceil(H/2), ceil(W/2))]."""
        maps = memory_to_maps(memory, spatial_shapes)
        return maps + [self.downsample(maps[-1])]


def memory_to_maps(memory: Tensor, spatial_shapes: list[tuple[int, int]]) -> list[Tensor]:
    """Encoder memory (B, S, d), levels flattened row-major one after the other -> [(B, d, H_l, W_l)]."""
    batch, _, d = memory.shape
    return [level.transpose(1, 2).reshape(batch, d, h, w)
            for level, (h, w) in zip(memory.split([h * w for h, w in spatial_shapes], dim=1), spatial_shapes)]


class SingleScaleAdapter(nn.Module):
    """Co-DETR's multi-scale adapter for a single-scale encoder (paper Sec. 3.2, ViTDet-style): the one
    encoder map (stride s) becomes the pyramid s/4, s/2, s, 2s, 4s (8-128 for C5, the strides of
    Co-Deformable-DETR's auxiliary pyramid). Finer levels: 2x bilinear upsampling + 3x3 conv +
    GroupNorm(32), twice in a chain; coarser levels: 3x3 stride-2 conv + GroupNorm(32), twice in a
    chain (no activation, as ``PyramidAdapter``'s extra level)."""

    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.up = nn.ModuleList(conv_gn(d_model, d_model, 3) for _ in range(2))
        self.down = nn.ModuleList(conv_gn(d_model, d_model, 3, stride=2) for _ in range(2))

    @staticmethod
    def strides(stride: int) -> list[int]:
        """The pyramid's strides from the encoder map's."""
        return [stride // 4, stride // 2, stride, stride * 2, stride * 4]

    def forward(self, memory: Tensor, spatial_shapes: list[tuple[int, int]]) -> list[Tensor]:
        """memory (B, H * W, d) of one level -> [(B, d, 4H, 4W), (2H, 2W), (H, W), (ceil(H/2), ceil(W/2)),
        (ceil(H/4), ceil(W/4))]."""
        base, = memory_to_maps(memory, spatial_shapes)
        finer, coarser = [base], [base]
        for conv in self.up:
            finer.append(conv(F.interpolate(finer[-1], scale_factor=2.0, mode="bilinear", align_corners=False)))
        for conv in self.down:
            coarser.append(conv(coarser[-1]))
        return finer[:0:-1] + coarser


def build_neck(cfg: ModelConfig, in_channels: list[int]) -> nn.Module:
    """The neck of ``cfg.neck`` from the backbone maps of ``in_channels`` to ``num_feature_levels``
    maps of ``d_model`` channels: ``ChannelMapper``, or the ViT's ``SimpleFeaturePyramid`` (p2-p6)."""
    t = cfg.transformer
    if cfg.neck == "channel_mapper":
        return ChannelMapper(in_channels, t.d_model, t.num_feature_levels, cfg.neck_bias)
    if cfg.neck != "sfp":
        raise ValueError(f"unknown model.neck {cfg.neck!r}; choose from {NECKS}")
    from codetr.models.necks.sfp import SimpleFeaturePyramid

    if len(in_channels) != 1 or t.num_feature_levels != 5:
        raise ValueError(f"model.neck=sfp makes 5 levels (p2-p6) from one backbone map; got {len(in_channels)} backbone "
                         f"maps and model.transformer.num_feature_levels={t.num_feature_levels}")
    return SimpleFeaturePyramid(in_channels[0], t.d_model, use_p2=True)
