"""One-to-many assigners against direct implementations of their rules; sampler properties."""

import math

import numpy as np
import pytest
import torch

from codetr.models.assigners import ATSSAssigner, MaxIoUAssigner, RandomSampler


def iou(a, b) -> float:
    inter = max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union


def random_boxes(n, g, size=100.0, min_wh=4.0, max_wh=40.0):
    xy = torch.rand(n, 2, generator=g) * size
    wh = torch.rand(n, 2, generator=g) * (max_wh - min_wh) + min_wh
    return torch.cat([xy, xy + wh], 1).double()


def atss_rule(anchors, counts, gts, topk=9):
    """The paper's rule, written as plain loops over ground truths and levels."""
    anchors, gts = anchors.tolist(), gts.tolist()
    best = [(-math.inf, -1)] * len(anchors)
    for j, g in enumerate(gts):
        gc = ((g[0] + g[2]) / 2, (g[1] + g[3]) / 2)
        candidates, start = [], 0
        for count in counts:
            level = list(range(start, start + count))
            level.sort(key=lambda i: (math.dist(((anchors[i][0] + anchors[i][2]) / 2,
                                                 (anchors[i][1] + anchors[i][3]) / 2), gc), i))
            candidates += level[:min(topk, count)]
            start += count
        ious = [iou(anchors[i], g) for i in candidates]
        thr = float(np.mean(ious) + np.std(ious, ddof=1))
        for i, v in zip(candidates, ious):
            cx, cy = (anchors[i][0] + anchors[i][2]) / 2, (anchors[i][1] + anchors[i][3]) / 2
            inside = min(cx - g[0], cy - g[1], g[2] - cx, g[3] - cy) > 0.01
            if v >= thr and inside and v > best[i][0]:
                best[i] = (v, j)
    return [j for _, j in best]


def test_atss_matches_the_rule():
    with_positives = 0
    for seed in range(16):
        g = torch.Generator().manual_seed(seed)
        counts = [30, 12, 5]
        anchors = torch.cat([random_boxes(30, g, max_wh=15), random_boxes(12, g, min_wh=15, max_wh=40),
                             random_boxes(5, g, min_wh=40, max_wh=80)])
        gts = random_boxes(int(torch.randint(1, 5, (1,), generator=g)), g, min_wh=10, max_wh=60)
        got = ATSSAssigner(topk=9)(anchors, counts, gts).gt.tolist()
        assert got == atss_rule(anchors, counts, gts), seed
        with_positives += any(v >= 0 for v in got)
    assert with_positives >= 10  # the comparison is not vacuous


def test_atss_without_ground_truth():
    a = ATSSAssigner()(random_boxes(10, torch.Generator().manual_seed(0)), [10], torch.zeros(0, 4, dtype=torch.float64))
    assert torch.all(a.gt == -1)


@pytest.mark.parametrize("seed", range(12))
def test_max_iou_against_brute_force(seed):
    g = torch.Generator().manual_seed(100 + seed)
    boxes, gts = random_boxes(40, g), random_boxes(3, g, min_wh=10, max_wh=50)
    for low_quality, (pos, neg, min_pos) in ((True, (0.7, 0.3, 0.3)), (False, (0.5, 0.5, 0.5))):
        got = MaxIoUAssigner(pos, neg, min_pos, low_quality)(boxes, gts).gt.tolist()
        table = [[iou(b, t) for t in gts.tolist()] for b in boxes.tolist()]
        expected = []
        for row in table:
            m = max(row)
            expected.append(row.index(m) if m >= pos else (-1 if m < neg else -2))
        if low_quality:
            for j in range(len(gts)):
                best = max(row[j] for row in table)
                if best >= min_pos:
                    for i, row in enumerate(table):
                        if row[j] == best:
                            expected[i] = j
        assert got == expected


def test_random_sampler_counts_fraction_and_ground_truth():
    g = torch.Generator().manual_seed(0)
    boxes, gts = random_boxes(600, g), random_boxes(4, g, min_wh=20, max_wh=60)
    assignment = MaxIoUAssigner(0.5, 0.5, 0.5, False)(boxes, gts)
    sampler = RandomSampler(64, 0.25, add_gt_as_proposals=True)
    sample = sampler(boxes, assignment, gts, generator=torch.Generator().manual_seed(1))
    num_pos = int((sample.gt >= 0).sum())
    assert len(sample.gt) == 64 and num_pos <= 16
    assert torch.all(sample.gt[:num_pos] >= 0) and torch.all(sample.gt[num_pos:] == -1)
    assert sample.index.unique().numel() == 64  # no duplicates
    candidates = torch.cat([gts, boxes])
    assert torch.equal(candidates[sample.index], sample.boxes)
    # ground-truth proposals present and positive on themselves when there is room for them
    sample = RandomSampler(512, 0.25, True)(boxes, assignment, gts, generator=torch.Generator().manual_seed(1))
    for j in range(4):
        hit = (sample.index == j).nonzero()
        assert len(hit) == 1 and sample.gt[hit[0, 0]] == j
    again = RandomSampler(512, 0.25, True)(boxes, assignment, gts, generator=torch.Generator().manual_seed(1))
    assert torch.equal(again.index, sample.index)


def test_random_sampler_keeps_candidate_order():
    """As mmdet's samplers (``unique`` on the drawn indices): positives, then negatives, each in candidate
    order, whatever order the permutation drew them in; the same permutation picks the same subset. The order
    decides which samples the positive-query padding draws (tests/models/test_training_parity.py)."""
    g = torch.Generator().manual_seed(2)
    boxes, gts = random_boxes(300, g), random_boxes(3, g, min_wh=20, max_wh=60)
    assignment = MaxIoUAssigner(0.5, 0.5, 0.5, False)(boxes, gts)
    sample = RandomSampler(64, 0.25, add_gt_as_proposals=True)(boxes, assignment, gts,
                                                               generator=torch.Generator().manual_seed(3))
    gt = torch.cat([torch.arange(3), assignment.gt])
    pos, neg = sample.index[sample.gt >= 0], sample.index[sample.gt == -1]
    assert len(neg) > 1 and torch.equal(pos, pos.sort().values) and torch.equal(neg, neg.sort().values)
    # the subset a direct draw makes with the same generator: positives first, then negatives
    draw = torch.Generator().manual_seed(3)
    all_pos, all_neg = torch.nonzero(gt >= 0).squeeze(1), torch.nonzero(gt == -1).squeeze(1)
    want_pos = all_pos[torch.randperm(len(all_pos), generator=draw)[:16]]
    want_neg = all_neg[torch.randperm(len(all_neg), generator=draw)[:64 - len(want_pos)]]
    assert set(pos.tolist()) == set(want_pos.tolist()) and set(neg.tolist()) == set(want_neg.tolist())
