"""Quality focal loss (Generalized Focal Loss, Li et al. 2020), the classification loss of Co-DINO."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def quality_focal_loss(logits: Tensor, labels: Tensor, scores: Tensor, beta: float = 2.0) -> Tensor:
    """Per-sample sigmoid quality focal loss, summed over classes, before weighting and reduction.

    logits: (N, C) raw classification logits; labels: (N,) int64 in [0, C], C = background;
    scores: (N,) float quality targets in [0, 1] (for positives, the IoU of the predicted box with its target).
    Every class is a binary problem: the target is ``scores`` on a positive's own class and 0 everywhere
    else, and the binary cross-entropy is scaled by |target - sigmoid(logit)| ** beta. Returns (N,).
    """
    if logits.ndim != 2 or labels.shape != logits.shape[:1] or scores.shape != logits.shape[:1]:
        raise ValueError(f"quality_focal_loss: logits {tuple(logits.shape)}, labels {tuple(labels.shape)} and "
                         f"scores {tuple(scores.shape)} must be (N, C), (N,) and (N,)")
    num_classes = logits.shape[1]
    if labels.numel() and (labels.min() < 0 or labels.max() > num_classes):
        raise ValueError(f"quality_focal_loss: labels must lie in [0, {num_classes}] ({num_classes} = background)")
    prob = logits.sigmoid()
    loss = F.binary_cross_entropy_with_logits(logits, torch.zeros_like(logits), reduction="none") * prob.pow(beta)
    positive = (labels < num_classes).nonzero().squeeze(1)
    cls = labels[positive]
    pos_logits, pos_scores = logits[positive, cls], scores[positive].to(logits.dtype)
    pos_loss = F.binary_cross_entropy_with_logits(pos_logits, pos_scores, reduction="none")
    # the modulating factor is not detached, as in mmdet's QualityFocalLoss
    pos_loss = pos_loss * (pos_scores - prob[positive, cls]).abs().pow(beta)
    return loss.index_put((positive, cls), pos_loss).sum(1)
