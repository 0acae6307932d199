"""Assigners and samplers: which prediction learns from which ground truth.

- HungarianMatcher: one-to-one matching of DETR queries (scipy linear_sum_assignment).
- ATSSAssigner, MaxIoUAssigner, RandomSampler: one-to-many assignment of the auxiliary heads.
"""

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor
from torchvision.ops import box_convert, generalized_box_iou

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
            rows, cols = linear_sum_assignment(cost.numpy())
            matches.append((torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)))
        return matches


# ---- one-to-many: ATSS, max-IoU, random sampler ------------------------------------------
