"""ATSS auxiliary head (one-to-many), as Co-DETR's ``CoATSSHead``.

One square anchor per location (side ``octave_base_scale * stride``), ATSS assignment, focal
classification, GIoU on decoded boxes weighted by the centerness target, and centerness BCE.
Besides its losses it exports all its anchors with their assignment for the positive queries.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import batched_nms, generalized_box_iou_loss, sigmoid_focal_loss

from codetr.models.assigners import ATSSAssigner
from codetr.models.aux.base import DeltaXYWHCoder, PositiveSet, base_anchors, grid_anchors, valid_locations
from codetr.models.losses.detr_loss import mean_across_processes
from codetr.structures import Detections, Target


def conv_tower(channels: int, depth: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.GroupNorm(32, channels),
                   nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


def centerness_target(anchors: Tensor, gt: Tensor) -> Tensor:
    """(P,) sqrt(min(l, r) / max(l, r) * min(t, b) / max(t, b)) of the anchor centres in their boxes."""
    cx, cy = (anchors[:, 0] + anchors[:, 2]) / 2, (anchors[:, 1] + anchors[:, 3]) / 2
    l, t, r, b = cx - gt[:, 0], cy - gt[:, 1], gt[:, 2] - cx, gt[:, 3] - cy
    lr, tb = torch.stack([l, r], 1), torch.stack([t, b], 1)
    return torch.sqrt(lr.min(1).values / lr.max(1).values * tb.min(1).values / tb.max(1).values)


class ATSSHead(nn.Module):
    """ATSS on the auxiliary pyramid. Loss weights (focal 1, GIoU 2, centerness 1) are
    multiplied by ``loss_scale`` (Co-DETR: decoder layers x lambda2)."""

    class_layers = ("atss_cls",)  # follow the number of classes (codetr.models.base)
    float32_methods = ("forward_train",)  # run in float32 under mixed precision (codetr.models.base)

    def __init__(self, num_classes: int, channels: int = 256, strides: list[int] | None = None,
                 loss_scale: float = 1.0, stacked_convs: int = 1, octave_base_scale: float = 8.0,
                 topk: int = 9, alpha: float = 0.25, gamma: float = 2.0) -> None:
        super().__init__()
        self.num_classes, self.strides = num_classes, strides or [8, 16, 32, 64, 128]
        self.loss_scale, self.alpha, self.gamma = loss_scale, alpha, gamma
        self.cls_convs = conv_tower(channels, stacked_convs)
        self.reg_convs = conv_tower(channels, stacked_convs)
        self.atss_cls = nn.Conv2d(channels, num_classes, 3, padding=1)
        self.atss_reg = nn.Conv2d(channels, 4, 3, padding=1)
        self.atss_centerness = nn.Conv2d(channels, 1, 3, padding=1)
        self.scales = nn.Parameter(torch.ones(len(self.strides)))
        self.assigner = ATSSAssigner(topk)
        self.coder = DeltaXYWHCoder((0.1, 0.1, 0.2, 0.2))
        self.register_buffer("_base", torch.stack([base_anchors(s, octave_base_scale, 1, [1.0])[0]
                                                   for s in self.strides]), persistent=False)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.constant_(self.atss_cls.bias, -4.595)  # prior probability 0.01

    def forward(self, feats: list[Tensor]) -> tuple[Tensor, Tensor, Tensor, Tensor, list[int]]:
        """feats: per level (B, C, H, W) -> over all locations (levels concatenated, row-major):
        class logits (B, A, num_classes), box deltas (B, A, 4), centerness logits (B, A),
        anchors (A, 4) xyxy, and anchors per level."""
        logits, deltas, centerness, anchors, counts = [], [], [], [], []
        for level, x in enumerate(feats):
            cls_feat, reg_feat = self.cls_convs(x), self.reg_convs(x)
            logits.append(self.atss_cls(cls_feat).flatten(2).transpose(1, 2))
            deltas.append((self.atss_reg(reg_feat) * self.scales[level]).flatten(2).transpose(1, 2))
            centerness.append(self.atss_centerness(reg_feat).flatten(1))
            h, w = x.shape[-2:]
            anchors.append(grid_anchors(self._base[level:level + 1], self.strides[level], h, w))
            counts.append(h * w)
        return torch.cat(logits, 1), torch.cat(deltas, 1), torch.cat(centerness, 1), torch.cat(anchors), counts

    def _valid(self, feats: list[Tensor], image_size: tuple[int, int]) -> Tensor:
        return torch.cat([valid_locations(x.shape[-2], x.shape[-1], s, image_size, 1, x.device)
                          for x, s in zip(feats, self.strides)])

    def forward_train(self, feats: list[Tensor], image_sizes: Tensor,
                      targets: list[Target]) -> tuple[dict[str, Tensor], list[PositiveSet]]:
        """Losses ``atss.loss_cls``, ``atss.loss_bbox``, ``atss.loss_centerness`` and, per image,
        every anchor with its assignment (feats: the pyramid feature at the anchor). Anchors at
        locations outside the unpadded image are exported as zero boxes, background, zero target."""
        logits, deltas, centerness, anchors, counts = self(feats)
        batch = logits.shape[0]
        pyramid = torch.cat([x.flatten(2) for x in feats], 2).transpose(1, 2)  # (B, A, C)
        labels = torch.full(logits.shape[:2], self.num_classes, dtype=torch.int64, device=logits.device)
        target_boxes = torch.zeros_like(deltas)
        label_weights = torch.zeros(logits.shape[:2], device=logits.device)
        exports = []
        for b in range(batch):
            size = tuple(image_sizes[b].tolist())
            valid = self._valid(feats, size)
            valid_counts = [int(v.sum()) for v in valid.split(counts)]
            assignment = self.assigner(anchors[valid], valid_counts, targets[b].boxes)
            idx = torch.nonzero(valid).squeeze(1)
            pos = assignment.gt >= 0
            labels[b, idx] = assignment.labels(targets[b].labels, self.num_classes)
            target_boxes[b, idx[pos]] = targets[b].boxes[assignment.gt[pos]]
            label_weights[b, idx] = 1.0
            # as released (``unmap`` of the valid anchors): anchors of the padding region are zero boxes
            exports.append(PositiveSet(torch.where(valid[:, None], anchors, 0.0), labels[b], target_boxes[b],
                                       pyramid[b]))
        positive = labels < self.num_classes
        # as released (mmdet's anchor-head targets): an image without positives counts as one
        num_pos = mean_across_processes(float(positive.sum(1).clamp(min=1).sum()), logits.device)
        onehot = F.one_hot(labels, self.num_classes + 1)[..., :self.num_classes].to(logits.dtype)
        focal = sigmoid_focal_loss(logits, onehot, self.alpha, self.gamma, reduction="none")
        loss_cls = (focal * label_weights[..., None]).sum() / num_pos
        pos_anchors = anchors.expand(batch, -1, -1)[positive]
        pos_targets = target_boxes[positive]
        weights = centerness_target(pos_anchors, pos_targets)
        decoded = self.coder.decode(pos_anchors, deltas[positive])
        giou = generalized_box_iou_loss(decoded, pos_targets, reduction="none")
        loss_bbox = (giou * weights).sum() / mean_across_processes(float(weights.sum()), logits.device)
        loss_centerness = F.binary_cross_entropy_with_logits(centerness[positive], weights, reduction="sum") / num_pos
        losses = {
            "atss.loss_cls": loss_cls * self.loss_scale,
            "atss.loss_bbox": loss_bbox * 2.0 * self.loss_scale,
            "atss.loss_centerness": loss_centerness * self.loss_scale,
        }
        return losses, exports

    @torch.no_grad()
    def predict(self, feats: list[Tensor], image_sizes: Tensor, pre_nms: int = 1000, score_thr: float = 0.0,
                iou_thr: float = 0.6, max_per_image: int = 100) -> list[Detections]:
        """Detections of the head alone, as mmdet 2.25's dense-head inference with the released
        ``test_cfg`` (nms_pre 1000, score_thr 0, NMS IoU 0.6, max_per_img 100): per level, the
        (location, class) pairs with class score ``sigmoid(logit) > score_thr``, the top ``pre_nms``
        of them by that class score; their boxes decoded (xyxy, clipped to the unpadded image);
        the score then multiplied by the sigmoid centerness; class-wise NMS over all levels,
        keep ``max_per_image``."""
        logits, deltas, centerness, anchors, counts = self(feats)
        results = []
        for b in range(logits.shape[0]):
            size = tuple(image_sizes[b].tolist())
            boxes, kept_scores, labels = [], [], []
            for level_logits, level_deltas, level_centerness, level_anchors in zip(
                    logits[b].split(counts), deltas[b].split(counts), centerness[b].split(counts),
                    anchors.split(counts)):
                scores = level_logits.sigmoid()
                candidates = torch.nonzero(scores > score_thr)  # (K, 2): location, class
                top_scores, order = scores[candidates[:, 0], candidates[:, 1]].sort(descending=True)
                loc, label = candidates[order[:pre_nms]].unbind(1)
                boxes.append(self.coder.decode(level_anchors[loc], level_deltas[loc], size))
                kept_scores.append(top_scores[:pre_nms] * level_centerness[loc].sigmoid())
                labels.append(label)
            boxes, kept_scores, labels = torch.cat(boxes), torch.cat(kept_scores), torch.cat(labels)
            keep = batched_nms(boxes, kept_scores, labels, iou_thr)[:max_per_image]
            results.append(Detections(boxes[keep], kept_scores[keep], labels[keep]))
        return results
