"""DETR set-prediction loss against torchvision's focal / GIoU losses and its own properties."""

import pytest
import torch
from torchvision.ops import box_convert, generalized_box_iou_loss, sigmoid_focal_loss

from codetr.config import LossConfig
from codetr.models.losses.detr_loss import DetrCriterion
from codetr.structures import DetrOutput, Target

C = 4


def make_case(seed: int, layers: int = 3, batch: int = 2, queries: int = 6):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(layers, batch, queries, C, generator=g, requires_grad=True)
    centre = torch.rand(layers, batch, queries, 2, generator=g) * 0.6 + 0.2
    size = torch.rand(layers, batch, queries, 2, generator=g) * 0.3 + 0.05
    boxes = torch.cat([centre, size], -1).requires_grad_()
    sizes = torch.tensor([[100, 200], [80, 60]])[:batch]
    targets = []
    for b in range(batch):
        n = 3 if b == 0 else 2
        h, w = sizes[b].tolist()
        xy = torch.rand(n, 2, generator=g) * torch.tensor([w / 2, h / 2])
        wh = torch.rand(n, 2, generator=g) * torch.tensor([w / 3, h / 3]) + 2
        targets.append(Target(torch.cat([xy, xy + wh], 1), torch.randint(0, C, (n,), generator=g)))
    return DetrOutput(logits, boxes), targets, sizes


def test_last_layer_losses_match_torchvision_on_the_found_matching():
    out, targets, sizes = make_case(0)
    crit = DetrCriterion(C, LossConfig())
    losses = crit(out, targets, sizes)
    assert {"loss_cls", "loss_bbox", "loss_giou", "d0.loss_cls", "d1.loss_giou"} <= set(losses)
    tboxes = [box_convert(t.boxes / torch.tensor([w, h, w, h]), "xyxy", "cxcywh")
              for t, (h, w) in zip(targets, sizes.tolist())]
    matches = crit.matcher(out.logits[-1], out.boxes[-1], [t.labels for t in targets], tboxes)
    num_boxes = 5
    onehot = torch.zeros(2, 6, C)
    l1 = giou = 0.0
    for b, (q, t) in enumerate(matches):
        onehot[b, q, targets[b].labels[t]] = 1
        pred, tgt = out.boxes[-1][b, q], tboxes[b][t]
        l1 = l1 + (pred - tgt).abs().sum()
        giou = giou + generalized_box_iou_loss(box_convert(pred, "cxcywh", "xyxy"),
                                               box_convert(tgt, "cxcywh", "xyxy"), reduction="sum")
    focal = sigmoid_focal_loss(out.logits[-1], onehot, 0.25, 2.0, reduction="sum")
    assert losses["loss_cls"].item() == pytest.approx(2 * focal.item() / num_boxes, rel=1e-5)
    assert losses["loss_bbox"].item() == pytest.approx(5 * l1.item() / num_boxes, rel=1e-5)
    assert losses["loss_giou"].item() == pytest.approx(2 * giou.item() / num_boxes, rel=1e-5)
    sum(losses.values()).backward()
    assert out.logits.grad.abs().sum() > 0 and out.boxes.grad.abs().sum() > 0


def test_assigned_loss_equals_matched_loss_given_the_matching():
    out, targets, sizes = make_case(1)
    crit = DetrCriterion(C, LossConfig())
    matched = crit(out, targets, sizes)
    tboxes = [box_convert(t.boxes / torch.tensor([w, h, w, h]), "xyxy", "cxcywh")
              for t, (h, w) in zip(targets, sizes.tolist())]
    for layer in range(3):
        matches = crit.matcher(out.logits[layer], out.boxes[layer], [t.labels for t in targets], tboxes)
        labels = torch.full((2, 6), C)
        dense = torch.zeros(2, 6, 4)
        weights = torch.zeros(2, 6)
        for b, (q, t) in enumerate(matches):
            labels[b, q], dense[b, q], weights[b, q] = targets[b].labels[t], tboxes[b][t], 1
        assigned = crit.assigned_loss(out.logits[layer:layer + 1], out.boxes[layer:layer + 1], labels, dense,
                                      torch.ones(2, 6), weights, suffix="_x")
        prefix = "" if layer == 2 else f"d{layer}."
        for name in ("loss_cls", "loss_bbox", "loss_giou"):
            assert assigned[name + "_x"].item() == pytest.approx(matched[prefix + name].item(), rel=1e-6)


def test_zero_weights_and_no_positives():
    out, _, _ = make_case(2)
    crit = DetrCriterion(C, LossConfig())
    labels = torch.full((2, 6), C)
    losses = crit.assigned_loss(out.logits, out.boxes, labels, torch.zeros(2, 6, 4),
                                torch.zeros(2, 6), torch.zeros(2, 6), "")
    assert all(v.item() == 0 for v in losses.values())
    losses = crit.assigned_loss(out.logits, out.boxes, labels, torch.zeros(2, 6, 4),
                                torch.ones(2, 6), torch.zeros(2, 6), "")
    assert losses["loss_cls"] > 0 and losses["loss_bbox"] == 0 and all(torch.isfinite(v) for v in losses.values())


def test_empty_targets_and_normalisation_by_num_boxes():
    out, targets, sizes = make_case(3)
    crit = DetrCriterion(C, LossConfig())
    empty = [Target(torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64)) for _ in targets]
    losses = crit(out, empty, sizes)
    assert losses["loss_bbox"] == 0 and losses["loss_cls"] > 0
    # A batch made of two copies of the same batch has the same (normalised) loss.
    single = crit(out, targets, sizes)
    doubled = DetrOutput(torch.cat([out.logits, out.logits], 1), torch.cat([out.boxes, out.boxes], 1))
    double = crit(doubled, targets + targets, torch.cat([sizes, sizes]))
    for name in ("loss_cls", "loss_bbox", "loss_giou", "d0.loss_cls"):
        assert double[name].item() == pytest.approx(single[name].item(), rel=1e-5)


def test_encoder_proposals_use_binary_targets():
    out, targets, sizes = make_case(4, layers=1, queries=8)
    enc_logits = torch.randn(2, 8, C)
    enc_boxes = out.boxes[0].detach()
    with_enc = DetrCriterion(C, LossConfig())(DetrOutput(out.logits, out.boxes, enc_logits, enc_boxes), targets, sizes)
    relabelled = [Target(t.boxes, torch.zeros_like(t.labels)) for t in targets]
    reference = DetrCriterion(C, LossConfig())(DetrOutput(enc_logits[None], enc_boxes[None]), relabelled, sizes)
    for name in ("loss_cls", "loss_bbox", "loss_giou"):
        assert with_enc["enc." + name].item() == pytest.approx(reference[name].item(), rel=1e-6)
