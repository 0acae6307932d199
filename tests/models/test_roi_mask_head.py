"""The Co-Deformable-DETR mask config's FCN mask head inside the Faster R-CNN auxiliary head
(``model.co.roi_mask``): the released head and loss written out (tests/released_mask.py), and a training step
of a tiny Co-Deformable-DETR whose RoI head learns masks from hand-made ones."""

from __future__ import annotations

import pytest
import torch
from released_mask import fcn_mask_head, mask_cross_entropy

from codetr.config_parsing import load_config
from codetr.models.build import build_model
from codetr.models.mask.fcn_head import FCNMaskHead, fcn_mask_loss
from codetr.structures import Batch, Target

pytestmark = pytest.mark.usefixtures("one_thread")


def test_fcn_mask_head_and_loss_match_the_released_ones() -> None:
    head = FCNMaskHead(5, channels=16)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in head.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    sd = {k: v.detach().clone().requires_grad_(True) for k, v in head.state_dict().items()}
    x = torch.randn(6, 16, 14, 14, generator=g)
    labels = torch.tensor([0, 4, 2, 2, 1, 3])
    targets = (torch.rand(6, 28, 28, generator=g) > 0.5).float()
    ours = head(x)
    reference = fcn_mask_head(sd, x)
    assert ours.shape == (6, 5, 28, 28)
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)
    loss, ref_loss = fcn_mask_loss(ours, labels, targets), mask_cross_entropy(reference, targets, labels)[0]
    torch.testing.assert_close(loss, ref_loss)
    loss.backward()
    ref_loss.backward()
    for name, p in head.named_parameters():
        torch.testing.assert_close(p.grad, sd[name].grad, rtol=1e-4, atol=1e-6, msg=name)
    assert fcn_mask_loss(ours[:0], labels[:0], targets[:0]) == 0


@pytest.mark.slow
def test_rcnn_head_learns_masks_in_training_only() -> None:
    overrides = ["model.num_classes=3", "model.co.roi_mask=true", "model.co.rpn_proposals=100", "model.co.roi_samples=64"]
    torch.manual_seed(0)
    model = build_model(load_config("co_deformable_detr_tiny", overrides).model)
    ys, xs = torch.meshgrid(torch.arange(64) + 0.5, torch.arange(64) + 0.5, indexing="ij")
    masks = torch.stack([((xs - 24) / 14) ** 2 + ((ys - 20) / 10) ** 2 <= 1, (xs > 30) & (xs < 58) & (ys > 28) & (ys < 60)])
    target = Target(torch.tensor([[10.0, 10.0, 38.0, 30.0], [30.0, 28.0, 58.0, 60.0]]), torch.tensor([0, 2]), masks=masks)
    batch = Batch(torch.randn(1, 3, 64, 64), torch.zeros(1, 64, 64, dtype=torch.bool), torch.tensor([[64, 64]]), [target])
    losses = model.loss(batch)
    assert "rcnn.loss_mask" in losses and losses["rcnn.loss_mask"] > 0
    losses["rcnn.loss_mask"].backward()
    head = model.aux_heads[0].roi.mask_head
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head.parameters())
    # training-only, as released (the DETR head is evaluated): not in the inference weights
    assert not any("mask" in k for k in model.inference_state_dict())
    assert "aux_heads.0.roi.mask_head.conv_logits.weight" in model.state_dict()
