"""The RefineMask-style mask head of Co-DINO-Inst (the release's ``SimpleRefineMaskHead``).

An instance branch (14x14 RoI features) and a semantic branch (the finest encoder map of the whole
image) are fused stage by stage. At each stage the instance features give class-specific mask logits;
the stage concatenates the instance features, the RoI-aligned (transformed) semantic features and
the sigmoid of those logits, fuses them (1x1 conv, then three dilated 3x3 convs plus a global average,
summed, 1x1 conv), halves the channels, appends the logits' sigmoid again and upsamples x2. Released
sizes: 256 channels, stages at 14, 28, 56 with logits at 14, 28, 56 and the last (class-agnostic)
logits computed at 56 and upsampled to 112.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from codetr.models.mask.layers import ConvBlock, conv1x1
from codetr.ops.roi_align import roi_align


class MultiBranchFusion(nn.Module):
    """Three dilated 3x3 conv + ReLU branches and the global average of the input, summed, then a
    1x1 conv (no activation): the release's ``MultiBranchFusionAvg``."""

    def __init__(self, channels: int, dilations: tuple[int, ...] = (1, 3, 5)) -> None:
        super().__init__()
        for i, dilation in enumerate(dilations):
            self.add_module(f"dilation_conv_{i + 1}", ConvBlock(channels, channels, 3, padding=dilation,
                                                                dilation=dilation))
        self.num_branches = len(dilations)
        self.merge_conv = ConvBlock(channels, channels, 1, relu=False)

    def forward(self, x: Tensor) -> Tensor:
        total = x.mean((2, 3), keepdim=True)  # square RoI maps: the release's avg_pool2d(x, width)
        for i in range(self.num_branches):
            total = total + getattr(self, f"dilation_conv_{i + 1}")(x)
        return self.merge_conv(total)


class RefineStage(nn.Module):
    """One fusion stage (the release's ``SimpleSFMStage``): instance features (R, C, s, s) with their
    mask logits (R, 1, s, s) and the semantic map -> (R, C / 2, 2s, 2s) (or s x s without upsampling)."""

    def __init__(self, semantic_channels: int, channels: int, size: int, semantic_stride: int,
                 dilations: tuple[int, ...]) -> None:
        super().__init__()
        self.size, self.semantic_stride = size, semantic_stride
        self.semantic_transform_in = conv1x1(semantic_channels, channels)
        self.fuse_conv = nn.ModuleList([conv1x1(2 * channels + 1, channels), MultiBranchFusion(channels, dilations)])
        self.fuse_transform_out = conv1x1(channels, channels // 2 - 1)

    def forward(self, feats: Tensor, logits: Tensor, semantic: Tensor, rois: Tensor, upsample: bool) -> Tensor:
        """feats (R, C, s, s), logits (R, 1, s, s), semantic (B, C_sem, H, W) at ``semantic_stride``,
        rois (R, 5) rows (image index, x1, y1, x2, y2) in input pixels."""
        semantic = F.relu(self.semantic_transform_in(semantic))
        roi_semantic = roi_align(semantic, rois, self.size, 1.0 / self.semantic_stride, 0, aligned=True)
        probs = logits.sigmoid()
        x = torch.cat([feats, roi_semantic, probs], 1)
        for layer in self.fuse_conv:
            x = F.relu(layer(x))
        x = torch.cat([F.relu(self.fuse_transform_out(x)), probs], 1)
        return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False) if upsample else x


class RefineMaskHead(nn.Module):
    """The mask head: RoI features (R, C, 14, 14) and the semantic map -> mask logits of every stage.

    channels: the instance and semantic width (released 256; each stage halves the instance width);
    stage_sizes: the supervised sizes (released 14, 28, 56, 112; the last logits are computed at
    the size before and upsampled x2); stage_classes: the logit channels of each stage (released 80,
    80, 80, 1: the last stage class-agnostic); semantic_stride: the stride of the semantic map.
    """

    class_layers = ("stage_instance_logits",)

    def __init__(self, stage_classes: list[int], channels: int = 256, instance_convs: int = 1,
                 semantic_convs: int = 2, stage_sizes: tuple[int, ...] = (14, 28, 56, 112), semantic_stride: int = 4,
                 dilations: tuple[int, ...] = (1, 3, 5)) -> None:
        super().__init__()
        if len(stage_sizes) < 2 or len(stage_classes) != len(stage_sizes):
            raise ValueError(f"the mask head needs >= 2 stage sizes and one class count per stage, got "
                             f"{list(stage_sizes)} and {list(stage_classes)}")
        self.stage_sizes, self.stage_classes = tuple(stage_sizes), list(stage_classes)
        self.instance_convs = nn.ModuleList(ConvBlock(channels, channels, 3, padding=1, norm=True)
                                            for _ in range(instance_convs))
        self.semantic_convs = nn.ModuleList(ConvBlock(channels, channels, 3, padding=1, norm=True)
                                            for _ in range(semantic_convs))
        widths = [channels // 2**i for i in range(len(stage_sizes))]
        self.stages = nn.ModuleList(RefineStage(channels, widths[i], size, semantic_stride, tuple(dilations))
                                    for i, size in enumerate(stage_sizes[:-1]))
        self.stage_instance_logits = nn.ModuleList(conv1x1(w, n) for w, n in zip(widths, stage_classes))

    def forward(self, feats: Tensor, semantic: Tensor, rois: Tensor, labels: Tensor) -> list[Tensor]:
        """feats (R, C, s0, s0) RoI features; semantic (B, C, H, W) the finest map; rois (R, 5) rows
        (image index, x1, y1, x2, y2) in input pixels; labels (R,) the class whose logits each RoI
        takes. Returns the mask logits of each stage, (R, 1, size, size) for ``stage_sizes``."""
        for conv in self.instance_convs:
            feats = conv(feats)
        for conv in self.semantic_convs:
            semantic = conv(semantic)
        rows = torch.arange(len(rois), device=rois.device)
        logits = []
        for i, stage in enumerate(self.stages):
            stage_logits = self.stage_instance_logits[i](feats)[rows, labels][:, None]
            feats = stage(feats, stage_logits, semantic, rois, upsample=i < len(self.stages) - 1)
            logits.append(stage_logits)
        last = labels.clamp(max=0) if self.stage_classes[-1] == 1 else labels
        final = self.stage_instance_logits[-1](feats)[rows, last][:, None]
        logits.append(F.interpolate(final, scale_factor=2, mode="bilinear", align_corners=True))
        return logits
