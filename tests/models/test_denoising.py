"""Contrastive denoising queries against the released CdnQueryGenerator / CoDINOHead.get_dn_target rules."""

import math

import pytest
import torch

from codetr.models.transformer.denoising import ContrastiveDenoising

NUM_CLASSES, D_MODEL, NUM_MATCHING = 5, 8, 7


def random_targets(generator: torch.Generator, counts: list[int], centre=(0.35, 0.65), size=(0.05, 0.2)):
    """Per image (N,) labels and (N, 4) cxcywh normalised boxes, centres and sizes uniform in the ranges."""
    labels, boxes = [], []
    for n in counts:
        labels.append(torch.randint(0, NUM_CLASSES, (n,), generator=generator))
        cxcy = torch.rand(n, 2, generator=generator) * (centre[1] - centre[0]) + centre[0]
        wh = torch.rand(n, 2, generator=generator) * (size[1] - size[0]) + size[0]
        boxes.append(torch.cat([cxcy, wh], 1))
    return labels, boxes


def copies_of(groups, counts):
    """Yield (image, box j, slot, positive) for every noised copy, from the documented slot layout."""
    max_gt = max(counts)
    for b, n in enumerate(counts):
        for k in range(2 * groups.num_groups):
            for j in range(n):
                yield b, j, k * max_gt + j, k % 2 == 0


def corner_ratios(groups, boxes, counts, box_noise):
    """Corner offsets of every copy, in units of box_noise * (w or h) / 2 of its ground truth.

    The offsets are read from the noised reference (cxcywh -> xyxy) against the ground-truth corners:
    the released noise is ``sign * factor * (w/2, h/2, w/2, h/2) * box_noise`` on the xyxy corners, with
    factor in [0, 1) for positives and [1, 2) for negatives, so |ratio| is that factor (while no clamping to
    [0, 1] and no width / height clamping of the inverse sigmoid intervenes).
    Returns (positive ratios (P, 4), negative ratios (M, 4), negative copies with a crossed-over box (M,)).
    """
    pos, neg, crossed = [], [], []
    for b, j, slot, positive in copies_of(groups, counts):
        cx, cy, w, h = boxes[b][j].double()
        gt = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2])
        rcx, rcy, rw, rh = groups.reference[b, slot].double()
        noised = torch.stack([rcx - rw / 2, rcy - rh / 2, rcx + rw / 2, rcy + rh / 2])
        ratio = (noised - gt).abs() / (torch.stack([w, h, w, h]) / 2 * box_noise)
        if positive:
            pos.append(ratio)
        else:
            neg.append(ratio)
            crossed.append(bool(rw < 0.002 or rh < 0.002))
    return torch.stack(pos), torch.stack(neg), torch.tensor(crossed)


def test_box_noise_ranges_without_crossing():
    # box noise 0.4 (the O365 / ViT configs): a negative copy moves each corner by less than 0.8 half-sizes
    # towards the other, so no box crosses over and every copy can be measured
    generator = torch.Generator().manual_seed(0)
    counts = [6, 3]
    labels, boxes = random_targets(generator, counts)
    module = ContrastiveDenoising(NUM_CLASSES, D_MODEL, num_dn_queries=60, box_noise=0.4)
    groups = module(labels, boxes, NUM_MATCHING, generator=generator)
    pos, neg, crossed = corner_ratios(groups, boxes, counts, 0.4)
    assert not crossed.any()
    assert pos.max() < 1 + 1e-4 and pos.max() > 0.95 and pos.min() < 0.05
    assert neg.min() > 1 - 1e-4 and neg.max() < 2 + 1e-4 and neg.min() < 1.05 and neg.max() > 1.95


def test_box_noise_ranges_released_scale():
    # box noise 1.0 (the COCO configs): a negative copy whose corners cross over (one corner moved by w/2..w
    # inward from each side) is a negative-width box that the released inverse_sigmoid(eps=1e-3) turns into
    # width ~1e-3; every other copy keeps its corner offsets within the stated ranges
    generator = torch.Generator().manual_seed(1)
    counts = [10, 4]
    labels, boxes = random_targets(generator, counts)
    module = ContrastiveDenoising(NUM_CLASSES, D_MODEL, num_dn_queries=100, box_noise=1.0)
    groups = module(labels, boxes, NUM_MATCHING, generator=generator)
    pos, neg, crossed = corner_ratios(groups, boxes, counts, 1.0)
    assert pos.max() < 1 + 1e-4 and pos.max() > 0.95
    measurable = neg[~crossed]
    assert measurable.min() > 1 - 1e-4 and measurable.max() < 2 + 1e-4
    # inward moves on both sides of x (or of y) cross over: about 1 - (3/4)^2 of the negatives
    assert 0.3 < crossed.float().mean() < 0.57
    logit_floor = torch.tensor(1e-3 / (1 + 1e-3))
    widths = groups.reference[..., 2:][groups.reference[..., 2:] < 0.002]
    torch.testing.assert_close(widths, logit_floor.expand_as(widths))


def test_label_flip_rate_is_released_fraction():
    # the released code redraws a label (uniformly over all classes, the true one included) with probability
    # label_noise * 0.5, so the fraction of copies whose label actually changes is 0.25 * (C - 1) / C
    module = ContrastiveDenoising(NUM_CLASSES, NUM_CLASSES, num_dn_queries=100, label_noise=0.5)
    with torch.no_grad():
        module.label_embedding.weight.copy_(torch.eye(NUM_CLASSES))
    generator = torch.Generator().manual_seed(2)
    changed = total = 0
    for _ in range(20):
        counts = [50, 30, 50]
        labels, boxes = random_targets(generator, counts)
        groups = module(labels, boxes, NUM_MATCHING, generator=generator)
        for b, j, slot, _ in copies_of(groups, counts):
            changed += int(groups.query[b, slot].argmax()) != int(labels[b][j])
            total += 1
    p = 0.25 * (NUM_CLASSES - 1) / NUM_CLASSES
    tolerance = 4 * math.sqrt(p * (1 - p) / total)
    assert total == 20 * 2 * 2 * 130
    assert abs(changed / total - p) < tolerance
    assert abs(changed / total - 0.25) > tolerance  # the redraw fraction itself is not the flip fraction


@pytest.mark.parametrize(("counts", "groups", "num_dn"), [
    ([3, 1], 33, 198), ([7], 14, 196), ([100, 2], 1, 200), ([150, 0], 1, 300), ([1, 1, 1], 100, 200), ([0, 2], 50, 200),
])
def test_number_of_groups_follows_largest_image(counts, groups, num_dn):
    labels, boxes = random_targets(torch.Generator().manual_seed(3), counts)
    out = ContrastiveDenoising(NUM_CLASSES, D_MODEL, num_dn_queries=100)(labels, boxes, NUM_MATCHING)
    assert out.num_groups == groups
    assert out.query.shape == (len(counts), num_dn, D_MODEL)
    assert out.reference.shape == out.target_boxes.shape == (len(counts), num_dn, 4)
    assert out.labels.shape == out.label_weights.shape == out.box_weights.shape == (len(counts), num_dn)
    assert out.attn_mask.shape == (num_dn + NUM_MATCHING, num_dn + NUM_MATCHING)
    assert int(out.box_weights.sum()) == groups * sum(counts)


@pytest.mark.parametrize("counts", [[0, 0], [0], []])
def test_no_ground_truth_gives_none(counts):
    labels, boxes = random_targets(torch.Generator().manual_seed(4), counts)
    assert ContrastiveDenoising(NUM_CLASSES, D_MODEL)(labels, boxes, NUM_MATCHING) is None


@pytest.mark.parametrize(("counts", "num_dn_queries"), [([2, 1], 10), ([3], 1), ([4, 4], 100)])
def test_attention_mask_matches_naive_rule(counts, num_dn_queries):
    labels, boxes = random_targets(torch.Generator().manual_seed(5), counts)
    out = ContrastiveDenoising(NUM_CLASSES, D_MODEL, num_dn_queries=num_dn_queries)(labels, boxes, NUM_MATCHING)
    group_size = 2 * max(counts)
    num_dn = group_size * out.num_groups
    total = num_dn + NUM_MATCHING
    expected = torch.zeros(total, total, dtype=torch.bool)
    for i in range(total):
        for j in range(total):
            if i >= num_dn:  # matching query: blind to every denoising query
                expected[i, j] = j < num_dn
            elif j < num_dn:  # denoising query: blind to the other groups, sees the matching queries
                expected[i, j] = i // group_size != j // group_size
    assert torch.equal(out.attn_mask, expected)


def test_targets_and_padding_slots_as_released():
    generator = torch.Generator().manual_seed(6)
    counts = [3, 1, 0]
    labels, boxes = random_targets(generator, counts)
    module = ContrastiveDenoising(NUM_CLASSES, D_MODEL, num_dn_queries=7)
    out = module(labels, boxes, NUM_MATCHING, generator=generator)
    max_gt, groups = 3, 2
    assert out.num_groups == groups
    for b in range(3):
        for slot in range(2 * groups * max_gt):
            k, j = divmod(slot, max_gt)
            if j >= counts[b]:  # padding: zero content, zero logit box, background class with weight 1
                assert torch.equal(out.query[b, slot], torch.zeros(D_MODEL))
                assert torch.equal(out.reference[b, slot], torch.full((4,), 0.5))
                expected = (NUM_CLASSES, torch.zeros(4), 0.0)
            elif k % 2 == 0:  # positive copy: the true (un-noised) label and box
                expected = (int(labels[b][j]), boxes[b][j], 1.0)
            else:  # negative copy: background, no box loss
                expected = (NUM_CLASSES, torch.zeros(4), 0.0)
            assert int(out.labels[b, slot]) == expected[0]
            assert torch.equal(out.target_boxes[b, slot], expected[1])
            assert float(out.box_weights[b, slot]) == expected[2]
            assert float(out.label_weights[b, slot]) == 1.0
    assert out.labels.dtype == torch.int64


def test_generator_reproducible_and_gradient_reaches_embedding():
    labels, boxes = random_targets(torch.Generator().manual_seed(7), [4, 2])
    module = ContrastiveDenoising(NUM_CLASSES, D_MODEL)
    first = module(labels, boxes, NUM_MATCHING, generator=torch.Generator().manual_seed(8))
    second = module(labels, boxes, NUM_MATCHING, generator=torch.Generator().manual_seed(8))
    third = module(labels, boxes, NUM_MATCHING, generator=torch.Generator().manual_seed(9))
    assert torch.equal(first.query, second.query) and torch.equal(first.reference, second.reference)
    assert not torch.equal(first.reference, third.reference)
    first.query.sum().backward()
    assert module.label_embedding.weight.grad.abs().sum() > 0


def test_bad_input_is_named():
    module = ContrastiveDenoising(NUM_CLASSES, D_MODEL)
    with pytest.raises(ValueError, match="image 1"):
        module([torch.tensor([0]), torch.tensor([1, 2])], [torch.rand(1, 4), torch.rand(1, 4)], NUM_MATCHING)
    with pytest.raises(ValueError, match="labels must lie"):
        module([torch.tensor([NUM_CLASSES])], [torch.rand(1, 4)], NUM_MATCHING)
