"""Class-wise Soft-NMS against a plain Python loop of mmcv's algorithm, and against a step-by-step
float32 replay of mmcv's CPU kernel (its in-place swaps and class shift included)."""

import numpy as np
import pytest
import torch

from codetr.ops import batched_soft_nms


def iou(a, b, offset):
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]) + offset)
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]) + offset)
    area_a = (a[2] - a[0] + offset) * (a[3] - a[1] + offset)
    area_b = (b[2] - b[0] + offset) * (b[3] - b[1] + offset)
    return w * h / (area_a + area_b - w * h)


def naive_soft_nms(boxes, scores, labels, iou_threshold, sigma, min_score, method, offset=0):
    """mmcv's description: repeatedly take the best remaining box; decay the remaining boxes of its class by
    their IoU with it (naive: x0 at IoU >= threshold, linear: x(1 - IoU) at IoU >= threshold, gaussian:
    x exp(-IoU^2 / sigma)); then drop every remaining box whose score is below min_score.
    Returns (taken indices, their scores, the smallest distance of a decisive quantity to its threshold)."""
    boxes, labels = boxes.double().tolist(), labels.tolist()
    current = scores.double().tolist()
    remaining = list(range(len(boxes)))
    taken, taken_scores, margin = [], [], float("inf")
    while remaining:
        best = max(remaining, key=lambda i: current[i])
        taken.append(best)
        taken_scores.append(current[best])
        remaining.remove(best)
        for i in remaining:
            if labels[i] != labels[best]:
                continue
            overlap = iou(boxes[best], boxes[i], offset)
            if method == "gaussian":
                current[i] *= torch.exp(torch.tensor(-overlap * overlap / sigma, dtype=torch.float64)).item()
            else:
                margin = min(margin, abs(overlap - iou_threshold))
                if overlap >= iou_threshold:
                    current[i] *= (1 - overlap) if method == "linear" else 0.0
        for i in remaining:
            if current[i] > 0:
                margin = min(margin, abs(current[i] - min_score) / min_score)
        remaining = [i for i in remaining if current[i] >= min_score]
    return taken, taken_scores, margin


def mmcv_kernel_batched_soft_nms(boxes, scores, labels, iou_threshold=0.8, sigma=0.5, min_score=1e-3,
                                 method="linear"):
    """mmcv's ``batched_nms(..., dict(type='soft_nms'))`` replayed in float32 one operation at a time, as its
    CPU kernel runs: the boxes shifted apart by ``label * (max + 1)``, then per step the first best score at or
    after position i is swapped into position i and taken; every later box is decayed by its IoU with it and,
    below ``min_score``, overwritten by the last box (which is then examined in its place). Returns (kept input
    indices, their decayed scores) in the kernel's output order."""
    f32 = np.float32
    shifted = (boxes + (labels.to(boxes) * (boxes.max() + 1))[:, None]).numpy()
    x1, y1, x2, y2 = (shifted[:, k].astype(f32).copy() for k in range(4))
    score = scores.numpy().astype(f32).copy()
    area = (x2 - x1) * (y2 - y1)
    index = np.arange(len(score))
    columns = (x1, y1, x2, y2, score, area, index)
    n, taken_scores, i = len(score), [], 0
    while i < n:
        best = i
        for pos in range(i + 1, n):
            if score[best] < score[pos]:
                best = pos
        for column in columns:
            column[i], column[best] = column[best], column[i]
        taken_scores.append(score[i])
        pos = i + 1
        while pos < n:
            w = max(f32(0), min(x2[i], x2[pos]) - max(x1[i], x1[pos]))
            h = max(f32(0), min(y2[i], y2[pos]) - max(y1[i], y1[pos]))
            inter = f32(w * h)
            overlap = f32(inter / f32(f32(area[i] + area[pos]) - inter))
            weight = f32(1)
            if method == "gaussian":
                weight = f32(np.exp(f32(-f32(overlap * overlap)) / f32(sigma)))
            elif overlap >= iou_threshold:
                weight = f32(1) - overlap if method == "linear" else f32(0)
            score[pos] = f32(score[pos] * weight)
            if score[pos] < min_score:
                for column in columns:
                    column[pos] = column[n - 1]
                n -= 1
                continue
            pos += 1
        i += 1
    return torch.as_tensor(index[:n]), torch.tensor(taken_scores[:n])


def clustered_boxes(generator, n, labels):
    """(n, 4) xyxy boxes in clusters of near-duplicates (IoUs spread over 0..1), scores and labels."""
    centres = torch.rand(n // 6 + 1, 2, generator=generator) * 80 + 10
    sizes = torch.rand(n // 6 + 1, 2, generator=generator) * 20 + 5
    which = torch.randint(0, len(centres), (n,), generator=generator)
    centre = centres[which] + torch.randn(n, 2, generator=generator) * sizes[which] * 0.15
    size = sizes[which] * (1 + 0.2 * torch.randn(n, 2, generator=generator)).clamp(min=0.3)
    boxes = torch.cat([centre - size / 2, centre + size / 2], 1).clamp(min=0)
    scores = torch.rand(n, generator=generator)
    return boxes, scores, torch.randint(0, labels, (n,), generator=generator)


@pytest.mark.parametrize("method", ["linear", "gaussian", "naive"])
@pytest.mark.parametrize(("iou_threshold", "min_score", "offset"), [(0.8, 1e-3, 0), (0.5, 0.2, 0), (0.6, 0.05, 1)])
def test_matches_naive_loop(method, iou_threshold, min_score, offset):
    generator = torch.Generator().manual_seed(len(method) * 100 + int(iou_threshold * 10))
    boxes, scores, labels = clustered_boxes(generator, 150, 3)
    scores[:5] = min_score * torch.tensor([0.1, 0.5, 0.9, 1.5, 3.0])  # some start below min_score
    keep, new_scores = batched_soft_nms(boxes, scores, labels, iou_threshold, 0.5, min_score, method, offset)
    taken, taken_scores, margin = naive_soft_nms(boxes, scores, labels, iou_threshold, 0.5, min_score, method, offset)
    assert margin > 1e-4  # no decision this close to a threshold: float32 and float64 agree on all of them
    assert keep.tolist() == taken
    torch.testing.assert_close(new_scores.double(), torch.tensor(taken_scores, dtype=torch.float64), rtol=1e-5,
                               atol=1e-7)
    assert keep.dtype == torch.int64
    assert len(taken) <= 150 - 3  # the three low starters went
    if method == "naive":
        assert len(taken) < 150 - 3
    else:
        assert (new_scores < scores[keep] - 1e-4).any()


def test_matches_mmcv_kernel_on_random_weight_model_outputs():
    """The input of the released Co-DINO inference with random weights (issue 33): 900 (query, class) pairs,
    3 classes, a few clusters of near-duplicate boxes, every score in a narrow band; here Soft-NMS decays
    and drops most of them."""
    for seed in range(3):
        generator = torch.Generator().manual_seed(seed)
        corner = torch.rand(5, 2, generator=generator) * 300
        base = torch.cat([corner, corner + 50 + torch.rand(5, 2, generator=generator) * 300], 1)
        boxes = base[torch.randint(0, 5, (900,), generator=generator)] + torch.randn(900, 4, generator=generator) * 4
        boxes = torch.cat([boxes[:, :2], torch.maximum(boxes[:, 2:], boxes[:, :2] + 1)], 1).clamp(0, 700)
        scores = 0.77 + 0.01 * torch.rand(900, generator=generator)
        labels = torch.randint(0, 3, (900,), generator=generator)
        keep, new_scores = batched_soft_nms(boxes, scores, labels, 0.8)
        expected_keep, expected_scores = mmcv_kernel_batched_soft_nms(boxes, scores, labels, 0.8)
        assert 20 < len(expected_keep) < 450
        assert keep.tolist() == expected_keep.tolist()
        assert torch.equal(new_scores, expected_scores)


@pytest.mark.parametrize("method", ["linear", "gaussian", "naive"])
def test_classes_never_suppress_each_other(method):
    generator = torch.Generator().manual_seed(1)
    boxes, scores, labels = clustered_boxes(generator, 120, 4)
    scores = scores * 0.9 + 0.1
    keep, new_scores = batched_soft_nms(boxes, scores, labels, 0.5, method=method)
    kept = dict(zip(keep.tolist(), new_scores.tolist()))
    for label in range(4):
        (members,) = (labels == label).nonzero(as_tuple=True)
        alone_keep, alone_scores = batched_soft_nms(boxes[members], scores[members], labels[members], 0.5,
                                                    method=method)
        # (the class shift differs when run alone, so the float rounding may too)
        alone = dict(zip(members[alone_keep].tolist(), alone_scores.tolist()))
        together = {i: s for i, s in kept.items() if int(labels[i]) == label}
        assert alone.keys() == together.keys()
        assert [alone[i] for i in alone] == pytest.approx([together[i] for i in alone], rel=1e-4)
    # one box copied into every class: nothing decays, even where negative coordinates defeat mmcv's class shift
    for box in ([10.0, 10.0, 50.0, 40.0], [-30.0, -30.0, 5.0, 5.0]):
        same = torch.tensor([box]).repeat(5, 1)
        keep, new_scores = batched_soft_nms(same, torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5]), torch.arange(5),
                                            method=method)
        assert keep.tolist() == [0, 1, 2, 3, 4]
        torch.testing.assert_close(new_scores, torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5]))


def test_empty_input():
    keep, new_scores = batched_soft_nms(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.long))
    assert keep.shape == new_scores.shape == (0,) and keep.dtype == torch.int64


@pytest.mark.parametrize("method", ["linear", "naive"])
def test_nothing_above_threshold_keeps_scores_sorted(method):
    generator = torch.Generator().manual_seed(2)
    boxes, scores, labels = clustered_boxes(generator, 100, 3)
    scores = scores * 0.9 + 0.05
    ious = [iou(a, b, 0) for i, a in enumerate(boxes.tolist()) for j, b in enumerate(boxes.tolist())
            if i < j and labels[i] == labels[j]]
    assert max(ious) > 0.5
    keep, new_scores = batched_soft_nms(boxes, scores, labels, max(ious) + 1e-3, method=method)
    assert keep.tolist() == torch.argsort(scores, descending=True).tolist()
    assert torch.equal(new_scores, scores[keep])


def test_gaussian_without_overlap_keeps_scores_sorted():
    grid = torch.stack(torch.meshgrid(torch.arange(6.0), torch.arange(5.0), indexing="ij"), -1).reshape(-1, 2) * 10
    boxes = torch.cat([grid, grid + 8], 1)  # disjoint 8 x 8 boxes
    scores = torch.rand(30, generator=torch.Generator().manual_seed(3)) * 0.9 + 0.05
    keep, new_scores = batched_soft_nms(boxes, scores, torch.zeros(30, dtype=torch.long), method="gaussian")
    assert keep.tolist() == torch.argsort(scores, descending=True).tolist()
    assert torch.equal(new_scores, scores[keep])


def test_min_score_as_mmcv_kernel():
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 9.5], [20.0, 20.0, 30.0, 30.0]])
    # a lone box below min_score survives: the kernel never tests the box it takes first
    keep, new_scores = batched_soft_nms(boxes[:1], torch.tensor([1e-4]), torch.tensor([0]))
    assert keep.tolist() == [0] and new_scores.tolist() == pytest.approx([1e-4])
    # ... but only the overall first one: the second, although alone in its class, is dropped
    keep, _ = batched_soft_nms(boxes[:2], torch.tensor([1e-4, 5e-4]), torch.tensor([0, 1]))
    assert keep.tolist() == [1]
    # a box decayed below min_score (linear: 0.05 x (1 - 0.95) < 1e-2) is dropped, its untouched neighbour is kept
    keep, new_scores = batched_soft_nms(boxes, torch.tensor([0.9, 0.05, 0.02]), torch.tensor([0, 0, 0]),
                                        iou_threshold=0.8, min_score=1e-2)
    assert keep.tolist() == [0, 2]


def test_threshold_is_inclusive_and_ties_keep_input_order():
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 5.0], [50.0, 50.0, 60.0, 60.0]])  # IoU 0.5 exactly
    keep, new_scores = batched_soft_nms(boxes, torch.tensor([0.9, 0.8, 0.9]), torch.tensor([0, 0, 0]), 0.5)
    assert keep.tolist() == [0, 2, 1]
    torch.testing.assert_close(new_scores, torch.tensor([0.9, 0.9, 0.4]))


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="method"):
        batched_soft_nms(torch.zeros(1, 4), torch.zeros(1), torch.zeros(1, dtype=torch.long), method="hard")
    with pytest.raises(ValueError, match="labels"):
        batched_soft_nms(torch.zeros(2, 4), torch.zeros(2), torch.zeros(3, dtype=torch.long))
