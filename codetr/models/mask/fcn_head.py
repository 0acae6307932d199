"""Mask R-CNN's FCN mask head, as the released Co-Deformable-DETR mask config puts it inside the Faster
R-CNN auxiliary head (``CoStandardRoIHead`` with ``FCNMaskHead``): an auxiliary training signal on the
head's positive proposals (the release evaluates the DETR head, without masks, by default)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from codetr.models.mask.layers import ConvBlock


class FCNMaskHead(nn.Module):
    """RoI features (R, C, s, s) -> class-specific mask logits (R, num_classes, 2s, 2s): ``num_convs``
    3x3 conv + ReLU, a 2x2 stride-2 transposed conv + ReLU, a 1x1 conv per class (released: 4 convs, 256
    channels, 14 -> 28)."""

    class_layers = ("conv_logits",)

    def __init__(self, num_classes: int, channels: int = 256, num_convs: int = 4) -> None:
        super().__init__()
        self.convs = nn.ModuleList(ConvBlock(channels, channels, 3, padding=1) for _ in range(num_convs))
        self.upsample = nn.ConvTranspose2d(channels, channels, 2, stride=2)
        self.conv_logits = nn.Conv2d(channels, num_classes, 1)
        for m in (self.upsample, self.conv_logits):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        for conv in self.convs:
            x = conv(x)
        return self.conv_logits(F.relu(self.upsample(x)))


def fcn_mask_loss(logits: Tensor, labels: Tensor, targets: Tensor) -> Tensor:
    """Mean binary cross-entropy of each RoI's logits of its class (R, C, S, S), labels (R,), against its
    target (R, S, S) 0/1; no RoI: a zero that keeps the logits in the graph."""
    if not len(logits):
        return logits.sum()
    return F.binary_cross_entropy_with_logits(logits[torch.arange(len(logits)), labels], targets)
