"""The mask IoU head (Mask Scoring R-CNN's ``MaskIoUHead``, as Co-DINO-Inst configures it): predicts
the IoU of a RoI's mask with its object's whole ground-truth mask; at inference a detection's mask
score is its box score times the predicted IoU of its class."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from codetr.models.mask.layers import ConvBlock


class MaskIoUHead(nn.Module):
    """RoI features (R, C, s, s) and mask logits (R, 2s, 2s) -> IoU per class (R, num_classes).

    The mask's sigmoid, max-pooled x2, is appended to the features; ``num_convs`` 3x3 convs
    (LayerNorm2d, ReLU; the last with stride 2), ``num_fcs`` FCs (ReLU), a linear layer per class,
    a sigmoid (released: 2 convs, 1 FC of 1024, s = 14)."""

    class_layers = ("fc_mask_iou",)

    def __init__(self, num_classes: int, channels: int = 256, roi_size: int = 14, num_convs: int = 2,
                 num_fcs: int = 1, fc_dim: int = 1024) -> None:
        super().__init__()
        self.convs = nn.ModuleList(
            ConvBlock(channels + 1 if i == 0 else channels, channels, 3, stride=2 if i == num_convs - 1 else 1,
                      padding=1, norm=True) for i in range(num_convs))
        pooled = (roi_size // 2) ** 2
        self.fcs = nn.ModuleList(nn.Linear(channels * pooled if i == 0 else fc_dim, fc_dim) for i in range(num_fcs))
        self.fc_mask_iou = nn.Linear(fc_dim, num_classes)
        for fc in self.fcs:  # Caffe2Xavier: kaiming-uniform (fan_in, a=1), zero bias
            nn.init.kaiming_uniform_(fc.weight, a=1)
            nn.init.zeros_(fc.bias)
        nn.init.normal_(self.fc_mask_iou.weight, std=0.01)
        nn.init.zeros_(self.fc_mask_iou.bias)

    def forward(self, feats: Tensor, mask_logits: Tensor) -> Tensor:
        x = torch.cat([feats, F.max_pool2d(mask_logits.sigmoid()[:, None], 2)], 1)
        for conv in self.convs:
            x = conv(x)
        x = x.flatten(1)
        for fc in self.fcs:
            x = F.relu(fc(x))
        return self.fc_mask_iou(x).sigmoid()


def mask_iou_targets(mask_logits: Tensor, mask_targets: Tensor, area_ratios: Tensor, threshold: float) -> Tensor:
    """IoU of each predicted mask with its object's whole mask (R,), from mask logits (R, s, s), the
    target mask inside the RoI (R, s, s) and the fraction of the object's area inside the RoI (R,): the
    whole object's area at this resolution is the area inside divided by that fraction."""
    pred = (mask_logits.detach().sigmoid() > threshold).float()
    overlap = (pred * mask_targets).sum((-1, -2))
    full_area = mask_targets.sum((-1, -2)) / (area_ratios + 1e-7)
    return overlap / (pred.sum((-1, -2)) + full_area - overlap)


def area_ratios(boxes: Tensor, gt_index: Tensor, gt_masks: Tensor) -> Tensor:
    """Fraction of each assigned object's mask area (gt_masks (N, h, w) bool) inside its RoI box (R, 4)
    xyxy pixels, the box's corners truncated to integers and clipped to the mask, at least 1 pixel wide
    and high (the release's ``BitmapMasks.crop``)."""
    if not len(boxes):
        return boxes.new_zeros(0)
    h, w = gt_masks.shape[-2:]
    corners = boxes.detach().to(torch.int32)  # numpy's astype(int32): towards zero
    x1, x2 = corners[:, 0].clamp(0, w), corners[:, 2].clamp(0, w)
    y1, y2 = corners[:, 1].clamp(0, h), corners[:, 3].clamp(0, h)
    x2, y2 = (x1 + (x2 - x1).clamp(min=1)).clamp(max=w), (y1 + (y2 - y1).clamp(min=1)).clamp(max=h)
    # pixels of each mask inside [y1, y2) x [x1, x2), from the masks' summed-area tables
    table = F.pad(gt_masks.to(torch.float64).cumsum(1).cumsum(2), (1, 0, 1, 0))
    x1, x2, y1, y2, gt = x1.long(), x2.long(), y1.long(), y2.long(), gt_index
    inside = table[gt, y2, x2] - table[gt, y1, x2] - table[gt, y2, x1] + table[gt, y1, x1]
    total = gt_masks.flatten(1).sum(1).to(torch.float64)[gt_index]
    return (inside / (total + 1e-7)).to(boxes.dtype)
