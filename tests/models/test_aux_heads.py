"""Auxiliary heads: anchors, box coder, losses, exported positive sets, prediction."""

import pytest
import torch
from torchvision.ops import box_iou, sigmoid_focal_loss

from codetr.models.aux.atss import ATSSHead
from codetr.models.aux.base import DeltaXYWHCoder, base_anchors, grid_anchors
from codetr.models.aux.roi import FasterRCNNAux, roi_levels
from codetr.structures import Target

STRIDES = [8, 16, 32, 64, 128]


def pyramid(seed=0, channels=32, size=128):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, channels, -(-size // s), -(-size // s), generator=g).requires_grad_() for s in STRIDES]


SIZES = torch.tensor([[128, 128], [96, 112]])
TARGETS = [Target(torch.tensor([[10.0, 12, 60, 70], [70, 20, 120, 100]]), torch.tensor([0, 2])),
           Target(torch.tensor([[20.0, 30, 50, 80]]), torch.tensor([1]))]


def test_anchor_geometry():
    base = base_anchors(16, 4.0, 3, [0.5, 1.0, 2.0])
    w, h = base[:, 2] - base[:, 0], base[:, 3] - base[:, 1]
    expected_sizes = [16 * 4 * 2 ** (i / 3) for i in range(3)] * 3
    torch.testing.assert_close(torch.sqrt(w * h), torch.tensor(expected_sizes))
    torch.testing.assert_close(h / w, torch.tensor([0.5] * 3 + [1.0] * 3 + [2.0] * 3))
    grid = grid_anchors(base, 16, 2, 3).view(2, 3, 9, 4)
    centres = (grid[..., :2] + grid[..., 2:]) / 2
    for i in range(2):
        for j in range(3):
            assert torch.allclose(centres[i, j], torch.tensor([j * 16.0, i * 16.0]).expand(9, 2))


def test_box_coder_round_trip():
    g = torch.Generator().manual_seed(0)
    boxes = torch.rand(20, 2, generator=g) * 50
    boxes = torch.cat([boxes, boxes + torch.rand(20, 2, generator=g) * 40 + 2], 1)
    targets = boxes + torch.randn(20, 4, generator=g)
    coder = DeltaXYWHCoder((0.1, 0.1, 0.2, 0.2))
    torch.testing.assert_close(coder.decode(boxes, coder.encode(boxes, targets)), targets, atol=1e-4, rtol=1e-4)


def test_roi_level_mapping():
    boxes = torch.tensor([[0, 0, 50, 50], [0, 0, 224, 224], [0, 0, 448, 448], [0, 0, 2000, 2000.0]])
    assert roi_levels(boxes, 112, 4).tolist() == [0, 1, 2, 3]


@pytest.mark.parametrize("head_cls", [ATSSHead, FasterRCNNAux])
def test_training_step_losses_and_gradients(head_cls):
    torch.manual_seed(0)
    head = head_cls(4, 32, STRIDES, loss_scale=1.0)
    feats = pyramid()
    losses, _ = head.forward_train(feats, SIZES, TARGETS)
    assert all(torch.isfinite(v) and v > 0 for v in losses.values()), losses
    sum(losses.values()).backward()
    assert all(f.grad is not None and f.grad.abs().sum() > 0 for f in feats[:4])
    torch.manual_seed(0)
    scaled = head_cls(4, 32, STRIDES, loss_scale=12.0)
    scaled.load_state_dict(head.state_dict())
    torch.manual_seed(1)
    again, _ = head.forward_train(pyramid(), SIZES, TARGETS)
    torch.manual_seed(1)
    twelve, _ = scaled.forward_train(pyramid(), SIZES, TARGETS)
    for k in again:
        torch.testing.assert_close(twelve[k], again[k] * 12)


def test_atss_exports_every_anchor_with_its_assignment_and_zero_boxes_in_the_padding():
    torch.manual_seed(0)
    head = ATSSHead(4, 32, STRIDES)
    feats = pyramid()
    _, exports = head.forward_train(feats, SIZES, TARGETS)
    _, _, _, anchors, counts = head(feats)
    for b, (ex, target) in enumerate(zip(exports, TARGETS)):
        assert ex.boxes.shape[0] == sum(counts)
        # anchors centred inside the unpadded image (h, w) as they are; those of the padding
        # region (image 1 is 96 x 112 in a 128 x 128 batch) as zero boxes, background (as released)
        h, w = SIZES[b].tolist()
        centres = (anchors[:, :2] + anchors[:, 2:]) / 2
        inside = (centres[:, 0] < w) & (centres[:, 1] < h)
        assert torch.equal(ex.boxes[inside], anchors[inside])
        assert torch.all(ex.boxes[~inside] == 0) and torch.all(ex.labels[~inside] == 4)
        assert torch.all(ex.target_boxes[~inside] == 0)
        assert int((~inside).sum()) == (0 if b == 0 else sum(c - -(-96 // s) * -(-112 // s)
                                                             for c, s in zip(counts, STRIDES)))
        pos = ex.labels < 4
        assert pos.any()
        # each positive's target is one of the ground truths, with the matching label
        ious = box_iou(ex.target_boxes[pos], target.boxes)
        gt = ious.argmax(1)
        assert torch.allclose(ious.max(1).values, torch.ones(int(pos.sum())))
        assert torch.equal(target.labels[gt], ex.labels[pos])
        # the content feature is the pyramid feature at the anchor's location
        k = int(torch.nonzero(pos)[0])
        level = next(i for i, c in enumerate(torch.tensor(counts).cumsum(0).tolist()) if k < c)
        local = k - sum(counts[:level])
        w = feats[level].shape[-1]
        torch.testing.assert_close(ex.feats[k], feats[level][b, :, local // w, local % w])


def test_rcnn_exports_samples_with_ground_truth_as_positives():
    torch.manual_seed(0)
    head = FasterRCNNAux(4, 32, STRIDES)
    _, exports = head.forward_train(pyramid(), SIZES, TARGETS)
    for ex, target in zip(exports, TARGETS):
        assert ex.boxes.shape[0] <= 512 and ex.feats.shape == (ex.boxes.shape[0], 32)
        for box, label in zip(target.boxes, target.labels):
            hit = (ex.boxes == box).all(1).nonzero()
            assert len(hit) >= 1
            i = hit[0, 0]
            assert ex.labels[i] == label and torch.equal(ex.target_boxes[i], box)
        neg = ex.labels == 4
        assert torch.all(ex.target_boxes[neg] == 0)


@pytest.mark.parametrize("head_cls", [ATSSHead, FasterRCNNAux])
def test_predict_inside_the_image(head_cls):
    torch.manual_seed(0)
    head = head_cls(4, 32, STRIDES).eval()
    dets = head.predict(pyramid(), SIZES)
    for det, (h, w) in zip(dets, SIZES.tolist()):
        assert 0 < len(det.scores) <= 100
        assert torch.all(det.boxes[:, 0::2] <= w) and torch.all(det.boxes[:, 1::2] <= h) and torch.all(det.boxes >= 0)
        assert torch.all((det.labels >= 0) & (det.labels < 4))


def naive_dense_head_inference(head, feats, size, pre_nms, score_thr, iou_thr, max_per_image):
    """mmdet 2.25's rule written as plain loops: per level the top ``pre_nms`` (location, class)
    pairs by sigmoid class score among those above ``score_thr``, then x sigmoid centerness, then
    greedy class-wise NMS."""
    with torch.no_grad():
        logits, deltas, centerness, anchors, counts = head(feats)
    candidates, start = [], 0
    for count in counts:
        level = []
        for loc in range(start, start + count):
            for cls in range(head.num_classes):
                if float(logits[0, loc, cls].sigmoid()) > score_thr:
                    level.append((float(logits[0, loc, cls].sigmoid()), loc, cls))
        level.sort(key=lambda item: -item[0])
        for score, loc, cls in level[:pre_nms]:
            box = head.coder.decode(anchors[loc], deltas[0, loc], size)
            candidates.append((score * float(centerness[0, loc].sigmoid()), cls, box))
        start += count
    candidates.sort(key=lambda item: -item[0])
    kept = []
    for score, cls, box in candidates:
        if all(c != cls or box_iou(box[None], b[None]).item() <= iou_thr for _, c, b in kept):
            kept.append((score, cls, box))
    return kept[:max_per_image]


@pytest.mark.parametrize(("pre_nms", "score_thr"), [(20, 0.0), (1000, 0.012)])
def test_atss_inference_ranks_on_the_class_score_then_multiplies_centerness(pre_nms, score_thr):
    torch.manual_seed(0)
    head = ATSSHead(3, 32, STRIDES[:3]).eval()
    with torch.no_grad():  # spread scores and centerness so that the two rankings differ
        for conv in (head.atss_cls, head.atss_centerness):
            conv.weight.normal_(0, 0.05)
    feats = [f[:1].detach() for f in pyramid(channels=32, size=160)[:3]]
    size = (150, 160)
    dets = head.predict(feats, torch.tensor([size]), pre_nms, score_thr, iou_thr=0.6, max_per_image=40)[0]
    expected = naive_dense_head_inference(head, feats, size, pre_nms, score_thr, iou_thr=0.6, max_per_image=40)
    assert len(dets.scores) == len(expected) > 10
    torch.testing.assert_close(dets.scores, torch.tensor([s for s, _, _ in expected]))
    assert dets.labels.tolist() == [c for _, c, _ in expected]
    torch.testing.assert_close(dets.boxes, torch.stack([b for _, _, b in expected]))


def test_atss_image_without_positives_counts_one_in_the_normaliser():
    """As the release's anchor-head targets (``max(num_pos, 1)`` per image): classification and centerness
    are normalised by 1 + the positives of the other image, the classification sum computed here directly."""
    torch.manual_seed(0)
    head = ATSSHead(4, 32, STRIDES, loss_scale=1.0)
    feats = [f.detach() for f in pyramid(size=256)]  # (group norm needs more than one value at the top level)
    sizes = torch.tensor([[256, 256], [256, 256]])
    empty = Target(torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64))
    losses, exports = head.forward_train(feats, sizes, [TARGETS[0], empty])
    num_pos = int((exports[0].labels < 4).sum())
    alone, _ = head.forward_train([f[:1] for f in feats], sizes[:1], TARGETS[:1])
    logits = head(feats)[0]
    empty_sum = sigmoid_focal_loss(logits[1], torch.zeros_like(logits[1]), 0.25, 2.0, reduction="sum")
    expected = (alone["atss.loss_cls"] * num_pos + empty_sum) / (num_pos + 1)
    torch.testing.assert_close(losses["atss.loss_cls"], expected)
    torch.testing.assert_close(losses["atss.loss_centerness"], alone["atss.loss_centerness"] * num_pos / (num_pos + 1))


def test_rpn_image_without_positives_counts_one_in_the_normaliser(monkeypatch):
    """As the release: ``max(positives, 1) + max(negatives, 1)`` per image. With the sampler made deterministic
    (the first candidates), the empty image's 256 negatives are its first 256 anchors."""
    monkeypatch.setattr(torch, "randperm", lambda n, **kwargs: torch.arange(n))
    torch.manual_seed(0)
    head = FasterRCNNAux(4, 32, STRIDES, loss_scale=1.0).rpn
    feats = [f.detach() for f in pyramid()]
    sizes = torch.tensor([[128, 128], [128, 128]])
    empty = Target(torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64))
    logits, deltas, anchors, _ = head(feats)
    alone = head.loss(logits[:1], deltas[:1], anchors, [f[:1] for f in feats], sizes[:1], TARGETS[:1])
    both = head.loss(logits, deltas, anchors, feats, sizes, [TARGETS[0], empty])
    empty_sum = torch.nn.functional.softplus(logits[1, :256]).sum()  # BCE of negatives
    # the first image has positives and negatives: its 256 samples count 256
    torch.testing.assert_close(both["rpn.loss_cls"], (alone["rpn.loss_cls"] * 256 + empty_sum) / (256 + 257))
    torch.testing.assert_close(both["rpn.loss_bbox"], alone["rpn.loss_bbox"] * 256 / (256 + 257))


def test_rcnn_exports_as_many_samples_per_image_as_the_image_with_fewest():
    """As released (CoStandardRoIHead): every image's positive-query candidates are its first samples
    (positives, then negatives in proposal order), as many as the image with the fewest samples has."""
    head = FasterRCNNAux(4, 32, STRIDES).roi
    feats = pyramid()[:-1]
    g = torch.Generator().manual_seed(5)
    proposals = []
    for n, (h, w) in zip((700, 150), SIZES.tolist()):
        xy = torch.rand(n, 2, generator=g) * torch.tensor([w - 20.0, h - 20.0])
        proposals.append(torch.cat([xy, xy + 4 + torch.rand(n, 2, generator=g) * 60], 1).clamp(max=min(h, w)))
    torch.manual_seed(0)
    _, exports = head.forward_train(feats, proposals, SIZES, TARGETS)
    torch.manual_seed(0)  # the first image alone: the same draws, so the same samples
    _, alone = head.forward_train([f[:1] for f in feats], proposals[:1], SIZES[:1], TARGETS[:1])
    fewest = 150 + len(TARGETS[1].boxes)  # the second image's samples: all its proposals and its ground truth
    assert len(alone[0].boxes) == 512 and [len(e.boxes) for e in exports] == [fewest, fewest]
    torch.testing.assert_close(exports[0].boxes, alone[0].boxes[:fewest])
    torch.testing.assert_close(exports[0].labels, alone[0].labels[:fewest])
    torch.testing.assert_close(exports[0].feats, alone[0].feats[:fewest])
