"""Class-wise Soft-NMS (Bodla et al. 2017) as mmcv 1.5's ``batched_nms`` with ``type='soft_nms'`` runs it.

mmcv's CPU kernel repeatedly takes the box with the highest remaining score, then multiplies every
remaining score by a weight of its IoU with the taken box: ``naive`` 0 if IoU >= iou_threshold,
``linear`` 1 - IoU if IoU >= iou_threshold, ``gaussian`` exp(-IoU^2 / sigma) (no threshold); a
remaining box whose score falls below ``min_score`` is dropped. ``batched_nms`` makes it class-wise
by shifting each class's boxes apart.

Two boxes interact only when they share a label and their IoU reaches the threshold (is positive,
for ``gaussian``), so the connected components of that graph run independently. Here they all run
at once on a (components, boxes) padded layout, one taken box per component per step: the loop has
as many steps as the largest component has boxes, not as the whole input.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from torch import Tensor

METHODS = ("naive", "linear", "gaussian")
_ROW_CHUNK = 1024  # rows of the pairwise IoU computed at once (bounds memory to _ROW_CHUNK x N)


def _iou_with(chosen: Tensor, chosen_areas: Tensor, boxes: Tensor, areas: Tensor, offset: int) -> Tensor:
    """IoU as mmcv's kernel computes it, of (..., 4) chosen xyxy boxes with (..., 4) xyxy boxes (broadcast);
    chosen_areas / areas: their areas, widths and heights counted with ``offset`` added."""
    lt = torch.maximum(chosen[..., :2], boxes[..., :2])
    rb = torch.minimum(chosen[..., 2:], boxes[..., 2:])
    wh = (rb - lt + offset).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    return inter / (chosen_areas + areas - inter)


def _components(boxes: Tensor, areas: Tensor, labels: Tensor, iou_threshold: float, method: str,
                offset: int) -> Tensor:
    """(N,) component id of each box in the graph of same-label pairs that can change each other's score."""
    n = len(boxes)
    index = torch.arange(n, device=boxes.device)
    rows, cols = [], []
    for start in range(0, n, _ROW_CHUNK):
        chunk = index[start:start + _ROW_CHUNK]
        i, j = ((labels[chunk, None] == labels[None, :]) & (chunk[:, None] < index[None, :])).nonzero(as_tuple=True)
        i = i + start
        iou = _iou_with(boxes[i], areas[i], boxes[j], areas[j], offset)
        linked = iou > 0 if method == "gaussian" else iou >= iou_threshold
        rows.append(i[linked])
        cols.append(j[linked])
    i, j = torch.cat(rows).cpu().numpy(), torch.cat(cols).cpu().numpy()
    graph = coo_matrix((np.ones(len(i)), (i, j)), shape=(n, n))
    _, component = connected_components(graph, directed=False)
    return torch.as_tensor(component, device=boxes.device)


def _padded_layout(groups: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Row and column of each box in a (K, M) layout: one row per group, rows in decreasing number of
    boxes, columns in input order. Returns (row (N,), col (N,), boxes per row (K,))."""
    _, inverse, counts = torch.unique(groups, return_inverse=True, return_counts=True)
    by_size = torch.argsort(counts, descending=True, stable=True)
    row_of_group = torch.empty_like(by_size)
    row_of_group[by_size] = torch.arange(len(by_size), device=groups.device)
    row = row_of_group[inverse]
    row_counts = counts[by_size]
    perm = torch.argsort(row, stable=True)
    starts = torch.cumsum(row_counts, 0) - row_counts
    col = torch.empty_like(row)
    col[perm] = torch.arange(len(row), device=groups.device) - starts[row[perm]]
    return row, col, row_counts


def batched_soft_nms(boxes: Tensor, scores: Tensor, labels: Tensor, iou_threshold: float = 0.8,
                     sigma: float = 0.5, min_score: float = 1e-3, method: str = "linear",
                     offset: int = 0) -> tuple[Tensor, Tensor]:
    """Soft-NMS within each label.

    boxes: (N, 4) xyxy absolute; scores: (N,); labels: (N,) int64. Boxes of different labels never interact
    (also where negative coordinates would defeat mmcv's class shift).
    offset: 0 or 1, added to widths and heights in the IoU (mmcv's convention; the configs use 0).
    Returns (keep (K,) int64 indices into the input, new_scores (K,) the decayed scores), in the order
    mmcv returns them: decreasing decayed score. Exact ties go to the lower input index; mmcv's kernel
    breaks them by the positions its in-place swaps left, so where two overlapping boxes of one label
    have exactly equal scores the two may take different boxes first (identical duplicates aside).
    """
    if method not in METHODS:
        raise ValueError(f"soft-NMS method must be one of {METHODS}, got {method!r}")
    if offset not in (0, 1):
        raise ValueError(f"soft-NMS offset must be 0 or 1, got {offset}")
    if boxes.ndim != 2 or boxes.shape[1] != 4 or scores.shape != boxes.shape[:1] or labels.shape != boxes.shape[:1]:
        raise ValueError(f"soft-NMS: boxes {tuple(boxes.shape)}, scores {tuple(scores.shape)} and labels "
                         f"{tuple(labels.shape)} must be (N, 4), (N,) and (N,)")
    device = boxes.device
    if len(boxes) == 0:
        return torch.zeros(0, dtype=torch.long, device=device), scores.new_zeros(0)
    # mmcv computes the IoUs on boxes shifted by label * (max + 1); the shift rounds the float coordinates,
    # so it is reproduced here
    shifted = boxes + (labels.to(boxes) * (boxes.max() + 1))[:, None]
    areas = (shifted[:, 2] - shifted[:, 0] + offset) * (shifted[:, 3] - shifted[:, 1] + offset)
    row, col, row_counts = _padded_layout(_components(shifted, areas, labels, iou_threshold, method, offset))
    num_rows, width = len(row_counts), int(row_counts[0])
    index = torch.full((num_rows, width), -1, dtype=torch.long, device=device)
    index[row, col] = torch.arange(len(boxes), device=device)
    padded_boxes = shifted.new_zeros(num_rows, width, 4)
    padded_boxes[row, col] = shifted
    padded_areas = areas.new_zeros(num_rows, width)
    padded_areas[row, col] = areas
    current = scores.new_zeros(num_rows, width)
    current[row, col] = scores
    alive = torch.zeros(num_rows, width, dtype=torch.bool, device=device)
    # the kernel's first step drops every other box already below min_score, whatever its class; only the
    # overall best box (first in input order among equals) survives a score below min_score
    alive[row, col] = scores >= min_score
    first = int(scores.argmax())
    alive[row[first], col[first]] = True

    # rows with more than `step` boxes: the only ones that can still hold a box at that step
    active = (row_counts[None, :] > torch.arange(width, device=device)[:, None]).sum(1).tolist()
    all_rows = torch.arange(num_rows, device=device)
    taken_cols, taken_scores, taken = [], [], []
    for k in active:
        live = alive[:k]
        has_box = live.any(1)
        if not bool(has_box.any()):
            break
        best_score, best = current[:k].masked_fill(~live, float("-inf")).max(1)
        rows = all_rows[:k]
        taken_cols.append(best)
        taken_scores.append(best_score)
        taken.append(has_box)
        live[rows, best] = False
        chosen = padded_boxes[rows, best][:, None]
        iou = _iou_with(chosen, padded_areas[rows, best][:, None], padded_boxes[:k], padded_areas[:k], offset)
        if method == "gaussian":
            weight = torch.exp(-(iou * iou) / sigma)
        else:
            decayed = 1 - iou if method == "linear" else torch.zeros_like(iou)
            weight = torch.where(iou >= iou_threshold, decayed, torch.ones_like(iou))
        current[:k] *= weight
        live &= current[:k] >= min_score

    taken_mask = torch.cat(taken)
    taken_rows = torch.cat([all_rows[: len(mask)] for mask in taken])[taken_mask]
    keep = index[taken_rows, torch.cat(taken_cols)[taken_mask]]
    new_scores = torch.cat(taken_scores)[taken_mask]
    # mmcv's kernel takes the best remaining score over all classes at every step, and scores only decrease,
    # so its output is in decreasing score; stable sort of the index-sorted kept boxes gives its tie order
    by_index = torch.argsort(keep)
    keep, new_scores = keep[by_index], new_scores[by_index]
    order = torch.argsort(new_scores, descending=True, stable=True)
    return keep[order], new_scores[order]
