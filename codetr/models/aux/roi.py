"""Faster R-CNN auxiliary head (one-to-many): RPN proposals, then a RoI box head, as Co-DETR's
``CoStandardRoIHead`` with ``Shared2FCBBoxHead``. It exports its sampled proposals (ground
truth added as proposals included) with their assignment and mean-pooled RoI features, per image as many
as the image with the fewest samples has."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import batched_nms, generalized_box_iou_loss

from codetr.errors import UserError
from codetr.models.assigners import MaxIoUAssigner, RandomSampler, Sample
from codetr.models.aux.base import DeltaXYWHCoder, PositiveSet
from codetr.models.aux.rpn import RPNHead
from codetr.models.mask.fcn_head import FCNMaskHead, fcn_mask_loss
from codetr.models.mask.paste import crop_masks
from codetr.ops.roi_align import roi_align
from codetr.structures import Detections, Target


def roi_levels(boxes: Tensor, finest_scale: float, num_levels: int) -> Tensor:
    """mmdet's level of each RoI (N, 4): floor(log2(sqrt(area) / finest_scale + 1e-6)), clamped."""
    scale = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).clamp(min=0).sqrt()
    return torch.floor(torch.log2(scale / finest_scale + 1e-6)).clamp(0, num_levels - 1).long()


def rois_of(boxes: list[Tensor]) -> Tensor:
    """Boxes (N_i, 4) of each image -> (sum N_i, 5) RoI rows (image index, x1, y1, x2, y2)."""
    index = [torch.full((len(b), 1), i, dtype=b.dtype, device=b.device) for i, b in enumerate(boxes)]
    return torch.cat([torch.cat(index), torch.cat(boxes)], 1)


def multilevel_roi_align(feats: list[Tensor], strides: list[int], rois: Tensor, finest_scale: float,
                         size: int) -> Tensor:
    """mmdet's ``SingleRoIExtractor``: each RoI (R, 5) (image index, xyxy pixels) pooled from the map of
    its level (:func:`roi_levels` over ``feats`` (B, C, H_l, W_l) of ``strides``) by aligned RoIAlign
    with adaptive sampling -> (R, C, size, size)."""
    levels = roi_levels(rois[:, 1:], finest_scale, len(strides))
    if torch.onnx.is_in_onnx_export():  # a graph without data-dependent shapes: every level pooled, one kept
        out = rois.new_zeros((rois.shape[0], feats[0].shape[1], size, size))
        for level, stride in enumerate(strides):
            pooled = roi_align(feats[level], rois, size, spatial_scale=1.0 / stride, sampling_ratio=0, aligned=True)
            out = torch.where((levels == level)[:, None, None, None], pooled, out)
        return out
    out = rois.new_zeros((rois.shape[0], feats[0].shape[1], size, size))
    for level, stride in enumerate(strides):
        sel = torch.nonzero(levels == level).squeeze(1)
        if sel.numel():
            out[sel] = roi_align(feats[level], rois[sel], size, spatial_scale=1.0 / stride, sampling_ratio=0,
                                 aligned=True)
    return out


# Weight of the RoI head's GIoU loss relative to its classification loss (both also times loss_scale).
ROI_GIOU_WEIGHT = 10.0
# The FCN mask head's RoIAlign size and mask size (the released Co-Deformable-DETR mask config).
MASK_ROI_SIZE, MASK_SIZE = 14, 28


def shared_convs(channels: int, num_convs: int) -> nn.Sequential:
    """mmdet ``ConvModule`` x num_convs: 3x3 conv (no bias: a norm follows), GroupNorm(32), ReLU; conv
    weights kaiming-normal (fan_out, relu) as mmcv initialises them."""
    layers: list[nn.Module] = []
    for _ in range(num_convs):
        conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
        layers += [conv, nn.GroupNorm(32, channels), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


class RoIHead(nn.Module):
    """RoIAlign 7x7 on the encoder levels of the pyramid (``roi_strides``: all but the extra
    downsampled level, as the released extractors), then mmdet's ``ConvFCBBoxHead`` with shared
    layers only: ``num_convs`` 3x3 convs (``channels`` wide, GroupNorm, ReLU) and ``num_fcs`` FCs of
    ``fc_dim`` (ReLU); class scores (num_classes + 1, softmax) and box deltas, class-specific or (with
    ``class_agnostic``) one per RoI, decoded with ``target_stds``. Released: Shared2FCBBoxHead (0 convs,
    2 FCs, class-specific, stds 0.1, 0.1, 0.2, 0.2); Co-DINO ViT-L COCO: 4 convs, 1 FC, class-agnostic,
    stds 0.05, 0.05, 0.1, 0.1. CE and GIoU (``ROI_GIOU_WEIGHT``) on decoded boxes, both times ``loss_scale``.
    ``with_mask``: also Mask R-CNN's FCN mask head on the positive samples (RoIAlign 14 on the same levels,
    28x28 targets, cross-entropy times ``loss_scale``), the released Co-Deformable-DETR mask config."""

    def __init__(self, num_classes: int, channels: int = 256, roi_strides: list[int] | None = None,
                 loss_scale: float = 1.0, finest_scale: float = 112.0, roi_size: int = 7, fc_dim: int = 1024,
                 num_samples: int = 512, num_convs: int = 0, num_fcs: int = 2, class_agnostic: bool = False,
                 target_stds: tuple[float, float, float, float] = (0.1, 0.1, 0.2, 0.2), with_mask: bool = False) -> None:
        super().__init__()
        if num_fcs < 1:
            raise ValueError(f"the RoI head needs at least one shared FC (model.co.roi_fcs), got {num_fcs}")
        self.num_classes, self.loss_scale, self.finest_scale, self.roi_size = num_classes, loss_scale, finest_scale, roi_size
        self.strides = roi_strides or [8, 16, 32, 64]
        self.shared_convs = shared_convs(channels, num_convs)
        fcs: list[nn.Module] = []
        for i in range(num_fcs):
            fcs += [nn.Linear(channels * roi_size * roi_size if i == 0 else fc_dim, fc_dim), nn.ReLU(inplace=True)]
        self.shared_fcs = nn.Sequential(*fcs)
        self.reg_classes = 1 if class_agnostic else num_classes
        self.fc_cls = nn.Linear(fc_dim, num_classes + 1)
        self.fc_reg = nn.Linear(fc_dim, 4 * self.reg_classes)
        nn.init.normal_(self.fc_cls.weight, std=0.01)
        nn.init.normal_(self.fc_reg.weight, std=0.001)
        nn.init.zeros_(self.fc_cls.bias)
        nn.init.zeros_(self.fc_reg.bias)
        for m in self.shared_fcs:
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        self.coder = DeltaXYWHCoder(tuple(target_stds))
        self.assigner = MaxIoUAssigner(0.5, 0.5, 0.5, match_low_quality=False)
        self.sampler = RandomSampler(num_samples, 0.25, add_gt_as_proposals=True)
        self.mask_head = FCNMaskHead(num_classes, channels) if with_mask else None

    def roi_features(self, feats: list[Tensor], rois: list[Tensor]) -> Tensor:
        """(R, C, 7, 7) RoIAlign features of the boxes of every image (xyxy pixels), each from its level."""
        return multilevel_roi_align(feats[:len(self.strides)], self.strides, rois_of(rois), self.finest_scale,
                                    self.roi_size)

    def forward(self, roi_feats: Tensor) -> tuple[Tensor, Tensor]:
        """(R, C, 7, 7) -> class logits (R, num_classes + 1), deltas (R, num_classes, 4) (class-agnostic:
        the RoI's one delta repeated for every class)."""
        h = self.shared_fcs(self.shared_convs(roi_feats).flatten(1))
        deltas = self.fc_reg(h).view(-1, self.reg_classes, 4)
        return self.fc_cls(h), deltas.expand(-1, self.num_classes, -1)

    def forward_train(self, feats: list[Tensor], proposals: list[Tensor], image_sizes: Tensor,
                      targets: list[Target]) -> tuple[dict[str, Tensor], list[PositiveSet]]:
        samples = []
        for props, target in zip(proposals, targets):
            samples.append(self.sampler(props, self.assigner(props, target.boxes), target.boxes))
        rois = [s.boxes for s in samples]
        roi_feats = self.roi_features(feats, rois)
        logits, deltas = self(roi_feats)
        labels = torch.cat([s.labels(t.labels, self.num_classes) for s, t in zip(samples, targets)])
        gt_boxes = torch.cat([s.target_boxes(t.boxes) for s, t in zip(samples, targets)])
        boxes = torch.cat(rois)
        num_rois = max(boxes.shape[0], 1)
        loss_cls = F.cross_entropy(logits, labels, reduction="sum") / num_rois
        pos = labels < self.num_classes
        pos_deltas = deltas[pos, labels[pos]]
        decoded = self.coder.decode(boxes[pos], pos_deltas)
        loss_bbox = generalized_box_iou_loss(decoded, gt_boxes[pos], reduction="sum") / num_rois
        losses = {"rcnn.loss_cls": loss_cls * self.loss_scale, "rcnn.loss_bbox": loss_bbox * ROI_GIOU_WEIGHT * self.loss_scale}
        if self.mask_head is not None:
            losses["rcnn.loss_mask"] = self.mask_loss(feats, samples, targets) * self.loss_scale
        pooled = roi_feats.mean((2, 3))
        # as released: each image exports its first samples (positives first), as many as the image with the
        # fewest samples has
        keep = min(len(r) for r in rois)
        exports, start = [], 0
        for r in rois:
            end = start + keep
            exports.append(PositiveSet(r[:keep], labels[start:end], gt_boxes[start:end], pooled[start:end]))
            start += len(r)
        return losses, exports

    def mask_loss(self, feats: list[Tensor], samples: list[Sample], targets: list[Target]) -> Tensor:
        """The FCN mask head's loss on the positive samples, whose targets' masks (N, h, w) it crops."""
        if any(t.masks is None for t in targets):
            raise UserError("the Faster R-CNN head's mask head (model.co.roi_mask) needs instance masks in the "
                            "training data (a target without masks): train it on annotations with segmentations")
        boxes = [s.boxes[s.gt >= 0] for s in samples]
        gt = [s.gt[s.gt >= 0] for s in samples]
        logits = self.mask_head(multilevel_roi_align(feats[:len(self.strides)], self.strides, rois_of(boxes),
                                                     self.finest_scale, MASK_ROI_SIZE))
        labels = torch.cat([t.labels[g] for t, g in zip(targets, gt)])
        mask_targets = torch.cat([crop_masks(t.masks, b, g, MASK_SIZE) for t, b, g in zip(targets, boxes, gt)])
        return fcn_mask_loss(logits, labels, mask_targets)

    @torch.no_grad()
    def predict(self, feats: list[Tensor], proposals: list[Tensor], image_sizes: Tensor, iou_thr: float = 0.5,
                max_per_image: int = 100) -> list[Detections]:
        logits, deltas = self(self.roi_features(feats, proposals))
        scores = logits.softmax(-1)[:, :-1]
        results, start = [], 0
        for props, size in zip(proposals, image_sizes.tolist()):
            end = start + len(props)
            boxes = self.coder.decode(props[:, None].expand(-1, self.num_classes, -1), deltas[start:end], tuple(size))
            s = scores[start:end]
            labels = torch.arange(self.num_classes, device=s.device).expand_as(s)
            boxes, s, labels = boxes.reshape(-1, 4), s.reshape(-1), labels.reshape(-1)
            keep = batched_nms(boxes, s, labels, iou_thr)[:max_per_image]
            results.append(Detections(boxes[keep], s[keep], labels[keep]))
            start = end
        return results


class FasterRCNNAux(nn.Module):
    """The "rcnn" auxiliary head: RPN (on every pyramid level) + RoI head (all levels but the
    last, extra one).

    rpn_pre_nms: proposals per level before NMS in training (1000 at test); rpn_proposals:
    per image after NMS; roi_samples / roi_fc_dim: sampled RoIs per image and FC width;
    roi_finest_scale: see ``roi_levels``; roi_convs, roi_fcs, roi_class_agnostic, roi_target_stds:
    the box head's layers and deltas (``RoIHead``); roi_mask: the RoI head's FCN mask head (training only)."""

    float32_methods = ("forward_train",)  # run in float32 under mixed precision (codetr.models.base)
    class_layers = ("roi.fc_cls", "roi.fc_reg")  # follow the number of classes (codetr.models.base), as the
    # mask head's conv_logits (its own class_layers)

    def __init__(self, num_classes: int, channels: int = 256, strides: list[int] | None = None,
                 loss_scale: float = 1.0, rpn_pre_nms: int = 4000, rpn_proposals: int = 1000,
                 roi_samples: int = 512, roi_fc_dim: int = 1024, roi_finest_scale: float = 112.0, roi_convs: int = 0,
                 roi_fcs: int = 2, roi_class_agnostic: bool = False,
                 roi_target_stds: tuple[float, float, float, float] = (0.1, 0.1, 0.2, 0.2), roi_mask: bool = False) -> None:
        super().__init__()
        strides = strides or [8, 16, 32, 64, 128]
        self.rpn_pre_nms, self.rpn_proposals = rpn_pre_nms, rpn_proposals
        self.rpn = RPNHead(channels, strides, loss_scale)
        self.roi = RoIHead(num_classes, channels, strides[:-1], loss_scale, finest_scale=roi_finest_scale,
                           fc_dim=roi_fc_dim, num_samples=roi_samples, num_convs=roi_convs, num_fcs=roi_fcs,
                           class_agnostic=roi_class_agnostic, target_stds=roi_target_stds, with_mask=roi_mask)

    def forward_train(self, feats: list[Tensor], image_sizes: Tensor,
                      targets: list[Target]) -> tuple[dict[str, Tensor], list[PositiveSet]]:
        logits, deltas, anchors, counts = self.rpn(feats)
        losses = self.rpn.loss(logits, deltas, anchors, feats, image_sizes, targets)
        proposals = self.rpn.proposals(logits, deltas, anchors, counts, image_sizes, self.rpn_pre_nms,
                                        self.rpn_proposals)
        roi_losses, exports = self.roi.forward_train(feats, proposals, image_sizes, targets)
        return {**losses, **roi_losses}, exports

    @torch.no_grad()
    def predict(self, feats: list[Tensor], image_sizes: Tensor) -> list[Detections]:
        logits, deltas, anchors, counts = self.rpn(feats)
        proposals = self.rpn.proposals(logits, deltas, anchors, counts, image_sizes, min(1000, self.rpn_pre_nms),
                                        self.rpn_proposals)
        return self.roi.predict(feats, proposals, image_sizes)

