"""Boundary-aware refinement of the multi-stage masks: the release's ``BARCrossEntropyLoss`` and the
stage merge of its inference (``generate_block_target``, ``simple_test_mask``).

The boundary of a binary mask, at width w: a pixel inside the mask with more than a tenth of its
(2w+1)^2 window outside it (the map's surroundings count as outside), or a pixel outside the mask with
more than a tenth of its window inside it. Stages up to ``start_stage`` learn every pixel (binary
cross-entropy); later stages learn only the boundary region of the previous stage's prediction and
target, and at inference only their boundary pixels replace the upsampled previous stage.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def mask_boundary(masks: Tensor, width: int) -> Tensor:
    """(N, h, w) binary masks (bool or 0/1) -> (N, h, w) bool boundary band of the given width."""
    inside = F.pad(masks.float()[:, None], (width,) * 4)
    size = 2 * width + 1
    ones = torch.ones(1, 1, size, size, dtype=inside.dtype, device=inside.device)
    count = F.conv2d(inside, ones)  # mask pixels in each window
    centre = inside[:, :, width:-width, width:-width]
    area = float(size * size)
    # a mask pixel whose window holds > 10% outside pixels; an outside pixel whose window holds > 10% mask pixels
    edge_in = (area * centre - count).clamp(min=0) / area > 0.1
    edge_out = (area * (1 - centre) - (area - count)).clamp(min=0) / area > 0.1
    return (edge_in | edge_out)[:, 0]


def resize_region(region: Tensor, size: tuple[int, int]) -> Tensor:
    """(N, h, w) bool region -> (N, H, W) bool: bilinear (align_corners) resize of its indicator, >= 0.5."""
    return F.interpolate(region[:, None].float(), size, mode="bilinear", align_corners=True)[:, 0] >= 0.5


def resize_logits(logits: Tensor, size: tuple[int, int]) -> Tensor:
    """(N, 1, h, w) -> (N, 1, H, W) bilinear with aligned corners."""
    return F.interpolate(logits, size, mode="bilinear", align_corners=True)


def boundary_aware_loss(stage_logits: list[Tensor], stage_targets: list[Tensor], stage_weights: list[float],
                        boundary_width: int = 2, start_stage: int = 1) -> Tensor:
    """The weighted sum over stages of the mask loss.

    stage_logits: (R, 1, s, s) per stage; stage_targets: (R, s, s) 0/1 floats per stage. Stages
    ``<= start_stage``: mean binary cross-entropy over all pixels. Later stages: cross-entropy summed
    over the boundary region (of the previous prediction, binarised at 0.5, and of the previous
    stage's target, at ``boundary_width``, resized) divided by its pixel count (at least 1). The
    previous prediction of a later stage is the previous stage's logits upsampled with this stage's
    logits on the previous prediction's width-1 boundary, as at inference."""
    if len(stage_weights) != len(stage_logits):
        raise ValueError(f"{len(stage_weights)} stage loss weights for {len(stage_logits)} stages")
    losses = []
    previous = None
    for i, (logits, target) in enumerate(zip(stage_logits, stage_targets)):
        pred = logits[:, 0]
        if i <= start_stage:
            losses.append(F.binary_cross_entropy_with_logits(pred, target))
            previous = pred.detach().sigmoid() >= 0.5
            continue
        size = pred.shape[-2:]
        region = mask_boundary(previous, boundary_width) | mask_boundary(stage_targets[i - 1], boundary_width)
        region = resize_region(region, size)
        pixel_loss = F.binary_cross_entropy_with_logits(pred, target, reduction="none")
        losses.append((pixel_loss * region).sum() / region.sum().clamp(min=1))
        with torch.no_grad():
            edge = resize_region(mask_boundary(previous, 1), size)
            merged = resize_logits(stage_logits[i - 1].detach(), size)[:, 0]
            previous = torch.where(edge, pred.detach(), merged).sigmoid() >= 0.5
    return sum(w * loss for w, loss in zip(stage_weights, losses))


def refine_stages(stage_logits: list[Tensor]) -> Tensor:
    """Inference merge of the stages' logits (R, 1, s, s), coarse to fine: each finer stage keeps its
    own logits on the width-1 boundary of the (merged) coarser mask and takes the upsampled coarser
    logits elsewhere. Returns the merged logits of the last stage (R, 1, S, S)."""
    merged = stage_logits[0]
    for finer in stage_logits[1:]:
        size = finer.shape[-2:]
        edge = resize_region(mask_boundary(merged[:, 0].sigmoid() >= 0.5, 1), size)[:, None]
        merged = torch.where(edge, finer, resize_logits(merged, size))
    return merged
