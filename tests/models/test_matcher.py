"""Hungarian matcher: optimal total cost (brute force) and cost entries (direct formulas)."""

import itertools
import math

import pytest
import torch

from codetr.models.assigners import HungarianMatcher


def random_boxes(n: int, g: torch.Generator) -> torch.Tensor:
    centre = torch.rand(n, 2, generator=g) * 0.6 + 0.2
    size = torch.rand(n, 2, generator=g) * 0.3 + 0.05
    return torch.cat([centre, size], 1)


def direct_cost(logit: float, label_prob_index: int, box, tbox, alpha=0.25, gamma=2.0) -> float:
    p = 1 / (1 + math.exp(-logit))
    pos = -math.log(p + 1e-8) * alpha * (1 - p) ** gamma
    neg = -math.log(1 - p + 1e-8) * (1 - alpha) * p**gamma
    l1 = sum(abs(a - b) for a, b in zip(box, tbox))

    def xyxy(b):
        return b[0] - b[2] / 2, b[1] - b[3] / 2, b[0] + b[2] / 2, b[1] + b[3] / 2

    a, b = xyxy(box), xyxy(tbox)
    inter = max(0, min(a[2], b[2]) - max(a[0], b[0])) * max(0, min(a[3], b[3]) - max(a[1], b[1]))
    union = box[2] * box[3] + tbox[2] * tbox[3] - inter
    hull = (max(a[2], b[2]) - min(a[0], b[0])) * (max(a[3], b[3]) - min(a[1], b[1]))
    giou = inter / union - (hull - union) / hull
    return 2 * (pos - neg) + 5 * l1 - 2 * giou


def test_cost_entries_match_direct_formulas():
    g = torch.Generator().manual_seed(0)
    logits, boxes = torch.randn(5, 3, generator=g), random_boxes(5, g)
    labels, tboxes = torch.tensor([2, 0, 2]), random_boxes(3, g)
    cost = HungarianMatcher().cost(logits, boxes, labels, tboxes)
    for q in range(5):
        for t in range(3):
            expected = direct_cost(float(logits[q, labels[t]]), 0, boxes[q].tolist(), tboxes[t].tolist())
            assert cost[q, t].item() == pytest.approx(expected, rel=1e-4, abs=1e-4)


@pytest.mark.parametrize("seed", range(30))
def test_total_cost_is_minimal(seed):
    g = torch.Generator().manual_seed(seed)
    num_q = int(torch.randint(1, 7, (1,), generator=g))
    num_t = int(torch.randint(0, min(num_q, 4) + 1, (1,), generator=g))
    if seed % 10 == 0:
        num_t = min(num_q, 4)
    logits, boxes = torch.randn(1, num_q, 4, generator=g), random_boxes(num_q, g)[None]
    labels, tboxes = torch.randint(0, 4, (num_t,), generator=g), random_boxes(num_t, g)
    matcher = HungarianMatcher()
    (rows, cols), = matcher(logits, boxes, [labels], [tboxes])
    assert len(rows) == len(cols) == num_t
    assert len(set(rows.tolist())) == num_t and sorted(cols.tolist()) == list(range(num_t))
    if num_t == 0:
        return
    cost = matcher.cost(logits[0], boxes[0], labels, tboxes)
    found = cost[rows, cols].sum().item()
    best = min(sum(cost[q, t].item() for t, q in enumerate(perm))
               for perm in itertools.permutations(range(num_q), num_t))
    assert found == pytest.approx(best, abs=1e-5)
