"""The DETR set-prediction loss: sigmoid focal (Deformable-DETR) or quality focal (DINO)
classification, L1 and GIoU box losses.

Applied to every decoder layer (Hungarian matching per layer), to the two-stage encoder
proposals (Deformable-DETR: binary targets over all tokens; DINO: class targets over the
selected top-k), and — with a fixed assignment instead of matching — to DINO's denoising queries
and Co-DETR's customized positive queries.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import box_convert, generalized_box_iou_loss, sigmoid_focal_loss

from codetr.config import LossConfig
from codetr.models.assigners import HungarianMatcher
from codetr.models.losses.quality_focal import quality_focal_loss
from codetr.ops.boxes import aligned_box_iou
from codetr.structures import DetrOutput, Target

CLS_LOSSES = ("focal", "quality_focal")


def mean_across_processes(count: float, device: torch.device) -> float:
    """``count`` averaged over the processes of a distributed run, at least 1."""
    value = torch.tensor([float(count)], device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(value)
        value /= dist.get_world_size()
    return max(float(value), 1.0)


def normalised_targets(targets: list[Target], image_sizes: Tensor) -> list[Tensor]:
    """Target boxes, xyxy pixels -> cxcywh normalised by each image's (w, h)."""
    out = []
    for t, (h, w) in zip(targets, image_sizes.tolist()):
        scale = t.boxes.new_tensor([w, h, w, h])
        out.append(box_convert(t.boxes / scale, "xyxy", "cxcywh"))
    return out


class DetrCriterion(nn.Module):
    """Weighted DETR losses of every decoder layer (and the encoder proposals).

    ``class_agnostic_proposals``: the encoder proposals are trained as one "object" class
    (Deformable-DETR two-stage) rather than with the ground-truth classes (DINO).
    """

    float32_methods = ("forward", "assigned_loss")  # run in float32 under mixed precision (codetr.models.base)

    def __init__(self, num_classes: int, cfg: LossConfig, class_agnostic_proposals: bool = True) -> None:
        super().__init__()
        if cfg.cls_loss not in CLS_LOSSES:
            raise ValueError(f"unknown model.loss.cls_loss {cfg.cls_loss!r}; choose from {CLS_LOSSES}")
        self.num_classes = num_classes
        self.cfg = cfg
        self.class_agnostic_proposals = class_agnostic_proposals
        cls_cost = cfg.cls_weight if cfg.cls_cost is None else cfg.cls_cost
        self.matcher = HungarianMatcher(cls_cost, cfg.l1_weight, cfg.giou_weight, cfg.focal_alpha, cfg.focal_gamma)

    def classification_loss(self, logits: Tensor, boxes: Tensor, labels: Tensor, target_boxes: Tensor,
                            label_weights: Tensor) -> Tensor:
        """Summed (unnormalised) classification loss: logits (B, Q, C); boxes, target_boxes
        (B, Q, 4) cxcywh normalised; labels (B, Q) with C = background; label_weights (B, Q)."""
        if self.cfg.cls_loss == "focal":
            onehot = F.one_hot(labels, self.num_classes + 1)[..., : self.num_classes].to(logits.dtype)
            focal = sigmoid_focal_loss(logits, onehot, self.cfg.focal_alpha, self.cfg.focal_gamma, reduction="none")
            return (focal * label_weights.unsqueeze(-1)).sum()
        # quality focal: a positive's target score is the IoU of its (detached) box with its target
        labels, label_weights = labels.flatten(), label_weights.flatten()
        pos = labels < self.num_classes
        scores = torch.zeros(labels.shape, dtype=logits.dtype, device=logits.device)
        scores[pos] = aligned_box_iou(box_convert(boxes.flatten(0, 1)[pos].detach(), "cxcywh", "xyxy"),
                                      box_convert(target_boxes.flatten(0, 1)[pos], "cxcywh", "xyxy")).to(logits.dtype)
        loss = quality_focal_loss(logits.flatten(0, 1), labels, scores, self.cfg.qfl_beta)
        return (loss * label_weights).sum()

    def layer_loss(self, logits: Tensor, boxes: Tensor, labels: Tensor, target_boxes: Tensor,
                   label_weights: Tensor, box_weights: Tensor, num_boxes: float) -> dict[str, Tensor]:
        """Losses of one layer with a dense assignment.

        logits (B, Q, C); boxes, target_boxes (B, Q, 4) cxcywh normalised; labels (B, Q) with
        C = background; label_weights, box_weights (B, Q). Sums divided by ``num_boxes``.
        """
        loss_cls = self.classification_loss(logits, boxes, labels, target_boxes, label_weights) / num_boxes
        pos = box_weights > 0
        pred, target, weight = boxes[pos], target_boxes[pos], box_weights[pos]
        loss_bbox = ((pred - target).abs().sum(-1) * weight).sum() / num_boxes
        giou = generalized_box_iou_loss(box_convert(pred, "cxcywh", "xyxy"),
                                        box_convert(target, "cxcywh", "xyxy"), reduction="none")
        loss_giou = (giou * weight).sum() / num_boxes
        return {
            "loss_cls": loss_cls * self.cfg.cls_weight,
            "loss_bbox": loss_bbox * self.cfg.l1_weight,
            "loss_giou": loss_giou * self.cfg.giou_weight,
        }

    def matched_loss(self, logits: Tensor, boxes: Tensor, target_labels: list[Tensor],
                     target_boxes: list[Tensor], num_boxes: float) -> dict[str, Tensor]:
        """Hungarian-match one layer (logits (B, Q, C), boxes (B, Q, 4)) and compute its losses."""
        matches = self.matcher(logits, boxes, target_labels, target_boxes)
        labels = torch.full(logits.shape[:2], self.num_classes, dtype=torch.int64, device=logits.device)
        dense_boxes = torch.zeros_like(boxes)
        box_weights = torch.zeros(logits.shape[:2], device=logits.device)
        for b, (q, t) in enumerate(matches):
            q, t = q.to(logits.device), t.to(logits.device)
            labels[b, q] = target_labels[b][t]
            dense_boxes[b, q] = target_boxes[b][t].to(boxes.dtype)
            box_weights[b, q] = 1.0
        return self.layer_loss(logits, boxes, labels, dense_boxes, torch.ones_like(box_weights),
                               box_weights, num_boxes)

    def forward(self, output: DetrOutput, targets: list[Target], image_sizes: Tensor) -> dict[str, Tensor]:
        """Losses ``loss_*`` (last layer), ``d{i}.loss_*`` (earlier layers), ``enc.loss_*`` (proposals)."""
        labels = [t.labels for t in targets]
        boxes = normalised_targets(targets, image_sizes)
        num_boxes = mean_across_processes(sum(len(l) for l in labels), output.logits.device)
        num_layers = output.logits.shape[0]
        losses: dict[str, Tensor] = {}
        for i in range(num_layers):
            prefix = "" if i == num_layers - 1 else f"d{i}."
            layer = self.matched_loss(output.logits[i], output.boxes[i], labels, boxes, num_boxes)
            losses.update({prefix + k: v for k, v in layer.items()})
        if output.enc_logits is not None and output.enc_boxes is not None:
            enc_labels = [torch.zeros_like(l) for l in labels] if self.class_agnostic_proposals else labels
            layer = self.matched_loss(output.enc_logits, output.enc_boxes, enc_labels, boxes, num_boxes)
            losses.update({"enc." + k: v for k, v in layer.items()})
        return losses

    def assigned_loss(self, logits: Tensor, boxes: Tensor, labels: Tensor, target_boxes: Tensor,
                      label_weights: Tensor, box_weights: Tensor, suffix: str = "", prefix: str = "") -> dict[str, Tensor]:
        """Losses of every layer with a fixed assignment (no matching).

        logits (L, B, Q, C), boxes (L, B, Q, 4) cxcywh normalised; labels (B, Q) int64 with
        C = background; target_boxes (B, Q, 4) cxcywh normalised; label_weights, box_weights
        (B, Q). Normalised by the number of positives. Keys ``{prefix}loss_*{suffix}`` (last
        layer) and ``d{i}.{prefix}loss_*{suffix}``.
        """
        num_pos = mean_across_processes(float((box_weights > 0).sum()), logits.device)
        num_layers = logits.shape[0]
        losses: dict[str, Tensor] = {}
        for i in range(num_layers):
            layer_prefix = ("" if i == num_layers - 1 else f"d{i}.") + prefix
            layer = self.layer_loss(logits[i], boxes[i], labels, target_boxes, label_weights, box_weights, num_pos)
            losses.update({layer_prefix + k + suffix: v for k, v in layer.items()})
        return losses
