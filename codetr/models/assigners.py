"""Assigners and samplers: which prediction learns from which ground truth.

- HungarianMatcher: one-to-one matching of DETR queries (scipy linear_sum_assignment).
- ATSSAssigner, MaxIoUAssigner, RandomSampler: one-to-many assignment of the auxiliary heads.
"""

from dataclasses import dataclass

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor
from torchvision.ops import box_convert, box_iou, generalized_box_iou

# ---- one-to-one: Hungarian matcher -------------------------------------------------------


class HungarianMatcher:
    """One-to-one matching of queries to ground truth with minimal total cost.

    cost = cls_weight * focal cost + l1_weight * L1(cxcywh) - giou_weight * GIoU(xyxy), as
    Deformable-DETR and Co-DETR (FocalLossCost 2, BBoxL1Cost 5, IoUCost giou 2).
    """

    def __init__(self, cls_weight: float = 2.0, l1_weight: float = 5.0, giou_weight: float = 2.0,
                 alpha: float = 0.25, gamma: float = 2.0) -> None:
        self.cls_weight, self.l1_weight, self.giou_weight = cls_weight, l1_weight, giou_weight
        self.alpha, self.gamma = alpha, gamma

    def cost(self, logits: Tensor, boxes: Tensor, labels: Tensor, target_boxes: Tensor) -> Tensor:
        """logits (Q, C), boxes (Q, 4) and target_boxes (N, 4) cxcywh normalised, labels (N,) -> (Q, N)."""
        prob = logits.float().sigmoid()[:, labels]
        eps = 1e-8
        pos = -(prob + eps).log() * self.alpha * (1 - prob) ** self.gamma
        neg = -(1 - prob + eps).log() * (1 - self.alpha) * prob**self.gamma
        l1 = torch.cdist(boxes.float(), target_boxes.float(), p=1)
        giou = generalized_box_iou(box_convert(boxes.float(), "cxcywh", "xyxy"),
                                   box_convert(target_boxes.float(), "cxcywh", "xyxy"))
        return self.cls_weight * (pos - neg) + self.l1_weight * l1 - self.giou_weight * giou

    @torch.no_grad()
    def __call__(self, logits: Tensor, boxes: Tensor, target_labels: list[Tensor],
                 target_boxes: list[Tensor]) -> list[tuple[Tensor, Tensor]]:
        """logits (B, Q, C), boxes (B, Q, 4) cxcywh normalised; per image labels (N_b,) and boxes
        (N_b, 4) cxcywh normalised -> per image (query indices, target indices), int64 on CPU."""
        matches = []
        for b, (labels, tboxes) in enumerate(zip(target_labels, target_boxes)):
            if labels.numel() == 0:
                empty = torch.empty(0, dtype=torch.int64)
                matches.append((empty, empty))
                continue
            cost = self.cost(logits[b], boxes[b], labels, tboxes).cpu()
            if not torch.isfinite(cost).all():
                raise FloatingPointError("the matching costs are not finite: the predicted logits or boxes are NaN "
                                         "or infinite")
            rows, cols = linear_sum_assignment(cost.numpy())
            matches.append((torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)))
        return matches


# ---- one-to-many: ATSS, max-IoU, random sampler ------------------------------------------


@dataclass
class Assignment:
    """Per candidate box: ``gt`` index of the assigned ground truth (-1 background, -2 ignored)
    and ``max_iou`` with any ground truth."""

    gt: Tensor
    max_iou: Tensor

    def labels(self, gt_labels: Tensor, num_classes: int) -> Tensor:
        """Class per candidate; ``num_classes`` for background and ignored ones."""
        out = torch.full_like(self.gt, num_classes)
        pos = self.gt >= 0
        out[pos] = gt_labels[self.gt[pos]]
        return out


def _empty_assignment(num: int, device: torch.device) -> Assignment:
    return Assignment(torch.full((num,), -1, dtype=torch.int64, device=device), torch.zeros(num, device=device))


class ATSSAssigner:
    """Adaptive training sample selection (Zhang et al., CVPR 2020).

    For each ground truth: the ``topk`` anchors per level closest to its centre are candidates;
    those with IoU >= mean + std of the candidates' IoUs and with their centre strictly inside
    the box (margin 0.01) are positive. An anchor positive for several boxes takes the one of
    highest IoU.
    """

    def __init__(self, topk: int = 9) -> None:
        self.topk = topk

    def __call__(self, anchors: Tensor, num_per_level: list[int], gt_boxes: Tensor) -> Assignment:
        """anchors (A, 4) xyxy, levels concatenated with ``num_per_level`` each; gt_boxes (N, 4) xyxy."""
        num_anchors, num_gt = anchors.shape[0], gt_boxes.shape[0]
        if num_gt == 0 or num_anchors == 0:
            return _empty_assignment(num_anchors, anchors.device)
        ious = box_iou(anchors, gt_boxes)  # (A, N)
        anchor_centres = (anchors[:, :2] + anchors[:, 2:]) / 2
        gt_centres = (gt_boxes[:, :2] + gt_boxes[:, 2:]) / 2
        distances = torch.cdist(anchor_centres, gt_centres)  # (A, N)
        candidates, start = [], 0
        for count in num_per_level:
            k = min(self.topk, count)
            candidates.append(distances[start:start + count].topk(k, dim=0, largest=False).indices + start)
            start += count
        candidates = torch.cat(candidates, 0)  # (K, N)
        cand_ious = ious.gather(0, candidates)
        threshold = cand_ious.mean(0) + cand_ious.std(0)
        centres = anchor_centres[candidates]  # (K, N, 2)
        inside = torch.stack([centres[..., 0] - gt_boxes[:, 0], centres[..., 1] - gt_boxes[:, 1],
                              gt_boxes[:, 2] - centres[..., 0], gt_boxes[:, 3] - centres[..., 1]],
                             -1).min(-1).values > 0.01
        positive = (cand_ious >= threshold) & inside
        masked = torch.full_like(ious, -float("inf"))
        cols = torch.arange(num_gt, device=anchors.device).expand_as(candidates)
        masked[candidates[positive], cols[positive]] = ious[candidates[positive], cols[positive]]
        best, best_gt = masked.max(1)
        gt = torch.where(best > -float("inf"), best_gt, torch.full_like(best_gt, -1))
        return Assignment(gt, ious.max(1).values)


class MaxIoUAssigner:
    """Max-IoU assignment (Faster R-CNN): IoU >= pos_thr positive, < neg_thr negative, in between
    ignored; with ``match_low_quality`` every ground truth also takes its best candidates (all
    those tied at its max IoU) when that max is >= min_pos_iou."""

    def __init__(self, pos_thr: float, neg_thr: float, min_pos_iou: float, match_low_quality: bool) -> None:
        self.pos_thr, self.neg_thr = pos_thr, neg_thr
        self.min_pos_iou, self.match_low_quality = min_pos_iou, match_low_quality

    def __call__(self, boxes: Tensor, gt_boxes: Tensor) -> Assignment:
        """boxes (A, 4) xyxy candidates, gt_boxes (N, 4) xyxy."""
        if gt_boxes.shape[0] == 0 or boxes.shape[0] == 0:
            return _empty_assignment(boxes.shape[0], boxes.device)
        ious = box_iou(boxes, gt_boxes)
        max_iou, argmax = ious.max(1)
        gt = torch.full_like(argmax, -2)
        gt[(max_iou >= 0) & (max_iou < self.neg_thr)] = -1
        positive = max_iou >= self.pos_thr
        gt[positive] = argmax[positive]
        if self.match_low_quality:
            gt_max = ious.max(0).values  # (N,)
            for j in range(gt_boxes.shape[0]):  # later boxes win ties, as in mmdet
                if gt_max[j] >= self.min_pos_iou:
                    gt[ious[:, j] == gt_max[j]] = j
        return Assignment(gt, max_iou)


@dataclass
class Sample:
    """Sampled candidates: ``boxes`` (P + M, 4) xyxy with the P positives first, ``gt`` (P + M,)
    assigned index (-1 for the M negatives), ``index`` (P + M,) position in the candidate list
    (which starts with the ground-truth boxes when they are added as proposals)."""

    boxes: Tensor
    gt: Tensor
    index: Tensor

    def labels(self, gt_labels: Tensor, num_classes: int) -> Tensor:
        """(P + M,) class of each sample; ``num_classes`` for negatives."""
        out = torch.full_like(self.gt, num_classes)
        out[self.gt >= 0] = gt_labels[self.gt[self.gt >= 0]]
        return out

    def target_boxes(self, gt_boxes: Tensor) -> Tensor:
        """(P + M, 4) assigned ground-truth box of each sample; zeros for negatives."""
        out = torch.zeros_like(self.boxes)
        out[self.gt >= 0] = gt_boxes[self.gt[self.gt >= 0]].to(out.dtype)
        return out


class RandomSampler:
    """Random subset of ``num`` candidates with at most ``pos_fraction`` positives, the rest
    negatives, each part in candidate order; optionally the ground-truth boxes are added as (positive)
    candidates first."""

    def __init__(self, num: int, pos_fraction: float, add_gt_as_proposals: bool) -> None:
        self.num, self.pos_fraction, self.add_gt = num, pos_fraction, add_gt_as_proposals

    def __call__(self, boxes: Tensor, assignment: Assignment, gt_boxes: Tensor,
                 generator: torch.Generator | None = None) -> Sample:
        gt = assignment.gt
        if self.add_gt and gt_boxes.shape[0]:
            boxes = torch.cat([gt_boxes, boxes])
            gt = torch.cat([torch.arange(gt_boxes.shape[0], device=gt.device), gt])
        pos = torch.nonzero(gt >= 0).squeeze(1)
        pos = pos[torch.randperm(pos.numel(), generator=generator)[: int(self.num * self.pos_fraction)].to(pos.device)]
        neg = torch.nonzero(gt == -1).squeeze(1)
        neg = neg[torch.randperm(neg.numel(), generator=generator)[: self.num - pos.numel()].to(neg.device)]
        # in candidate order, as mmdet's samplers (the positive-query padding draws by position in the samples)
        pos, neg = pos.sort().values, neg.sort().values
        keep = torch.cat([pos, neg])
        return Sample(boxes[keep], torch.cat([gt[pos], torch.full_like(neg, -1)]), keep)
