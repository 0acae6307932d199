"""The mask branch composed with Co-DINO (model.mask): box-only models keep their weights' names and
outputs, a training step learns masks from hand-made instance masks, inference adds the masks of the
final detections in the input frame with their released scores, the branch's weights are inference
weights, and fine-tuning from box-only weights starts it afresh."""

from __future__ import annotations

import pytest
import torch

from codetr.config_parsing import load_config
from codetr.errors import UserError
from codetr.inference.weights import load_state
from codetr.models.build import build_model
from codetr.models.co_detr import CoDETR
from codetr.models.necks.channel_mapper import memory_to_maps
from codetr.structures import Batch, Detections, Target

pytestmark = pytest.mark.usefixtures("one_thread")
SMALL = ["model.num_classes=3", "model.transformer.num_queries=30", "model.max_detections=20",
         "model.dino.num_dn_queries=6", "model.co.max_pos_queries=30", "model.co.rpn_proposals=100",
         "model.co.roi_samples=64", "model.mask.train_rois=40", "model.mask.roi_samples=32",
         "model.mask.iou_fc_dim=64"]
MASKED = SMALL + ["model.mask.enabled=true"]


def build(overrides: list[str], seed: int = 0) -> CoDETR:
    torch.manual_seed(seed)
    return build_model(load_config("co_dino_tiny", overrides).model)


def target(h: int, w: int, with_masks: bool = True) -> Target:
    """An ellipse and a rectangle, boxes tight around them."""
    ys, xs = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")
    ellipse = ((xs - 24) / 14) ** 2 + ((ys - 20) / 10) ** 2 <= 1
    rect = (xs > 30) & (xs < 58) & (ys > 28) & (ys < 60)
    masks = torch.stack([ellipse, rect])
    boxes = torch.tensor([[10.0, 10.0, 38.0, 30.0], [30.0, 28.0, 58.0, 60.0]])
    return Target(boxes, torch.tensor([0, 2]), masks=masks if with_masks else None)


def batch(with_masks: bool = True) -> Batch:
    g = torch.Generator().manual_seed(0)
    pad = torch.zeros(2, 64, 64, dtype=torch.bool)
    pad[1, :, 60:] = True
    return Batch(torch.randn(2, 3, 64, 64, generator=g), pad, torch.tensor([[64, 64], [64, 60]]),
                 [target(64, 64, with_masks), target(64, 60, with_masks)])


def test_box_only_models_keep_their_keys_weights_and_detections() -> None:
    plain, masked = build(SMALL), build(MASKED)
    plain_state, masked_state = plain.state_dict(), masked.state_dict()
    assert not any("mask" in k for k in plain_state) and plain.mask_branch is None
    extra = set(masked_state) - set(plain_state)
    assert set(plain_state) <= set(masked_state) and extra and all(k.startswith("mask_branch.") for k in extra)
    masked.load_state_dict(plain_state, strict=False)
    plain.eval(), masked.eval()
    b = batch()
    for box_only, with_masks in zip(plain.predict(b), masked.predict(b)):
        assert box_only.masks is None and box_only.mask_scores is None
        for field in ("boxes", "scores", "labels"):
            assert torch.equal(getattr(box_only, field), getattr(with_masks, field))


def test_training_step_learns_masks_into_the_encoder() -> None:
    model = build(MASKED)
    losses = model.loss(batch())
    assert {"mask.loss_mask", "mask.loss_mask_iou"} <= set(losses)
    assert all(torch.isfinite(v) for v in losses.values())
    (losses["mask.loss_mask"] + losses["mask.loss_mask_iou"]).backward()
    branch = dict(model.mask_branch.named_parameters())
    assert all(p.grad is not None for p in branch.values())
    # the RoI features and the semantic map come from the encoder: the mask loss reaches the backbone
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.detector.backbone.parameters())
    # the RoIs are detached predictions: no gradient reaches the decoder's heads through them
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in model.detector.box_branches.parameters())


def test_training_without_masks_is_one_clear_error() -> None:
    with pytest.raises(UserError, match="no instance masks"):
        build(MASKED).loss(batch(with_masks=False))


def test_predict_adds_masks_in_the_input_frame_with_released_scores() -> None:
    model = build(MASKED).eval()
    b = batch()
    detections = model.predict(b)
    for det, (h, w) in zip(detections, b.image_sizes.tolist()):
        assert det.masks.dtype == torch.bool and det.masks.shape == (len(det.boxes), h, w)
        assert det.mask_scores.shape == det.scores.shape
        assert ((det.mask_scores >= 0) & (det.mask_scores <= det.scores + 1e-6)).all()
        ys, xs = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")
        for mask, box in zip(det.masks, det.boxes):  # a pasted mask stays in its box
            outside = (xs < box[0] - 1) | (xs > box[2] + 1) | (ys < box[1] - 1) | (ys > box[3] + 1)
            assert not (mask & outside).any()
    # the scores are the box score times the predicted IoU of the detection's class
    det = detections[0]
    maps = model.detector.detect(b)[1]
    levels = [m[:1] for m in memory_to_maps(maps.memory, maps.spatial_shapes)]
    with torch.inference_mode():
        _, iou = model.mask_branch.mask_probs(levels, det.boxes, det.labels)
    torch.testing.assert_close(det.mask_scores, iou * det.scores)


def test_mask_branch_is_kept_for_inference_and_starts_afresh_from_box_only_weights() -> None:
    model = build(MASKED)
    inference = model.inference_state_dict()
    assert any(k.startswith("mask_branch.") for k in inference)
    assert not any(k.startswith(("aux_heads.", "adapter.", "positive_queries.")) for k in inference)
    fresh = build(MASKED, seed=1)
    load_state(fresh, inference, "model.safetensors")  # an inference file fits a fresh model
    assert all(torch.equal(v, fresh.state_dict()[k]) for k, v in inference.items())
    box_only = build(SMALL, seed=2).inference_state_dict()
    with pytest.raises(UserError, match="missing"):  # evaluating box-only weights as an instance model
        load_state(build(MASKED), box_only, "boxes.safetensors")
    target_model = build(MASKED, seed=3)
    before = {k: v.clone() for k, v in target_model.state_dict().items() if k.startswith("mask_branch.")}
    lines = load_state(target_model, box_only, "boxes.safetensors", reinit_classes=True)
    assert any("mask branch starts afresh" in line for line in lines)
    assert all(torch.equal(v, target_model.state_dict()[k]) for k, v in before.items())
    # and the other way: an instance model's weights load into a box-only model, the branch skipped
    lines = load_state(build(SMALL), inference, "inst.safetensors")
    assert any("skipped" in line for line in lines)


def test_mask_config_needs_the_co_wrapper() -> None:
    with pytest.raises(ValueError, match="model.co.aux_heads"):
        build_model(load_config("dino_tiny", ["model.mask.enabled=true"]).model)
    with pytest.raises(ValueError, match="multi-scale encoder.*'dab_detr' has one level"):
        build_model(load_config("co_dab_detr_tiny", ["model.mask.enabled=true"]).model)


@pytest.mark.parametrize(("override", "message"), [
    ("model.mask.stage_sizes=[14, 28, 50]", "model.mask.stage_sizes"),
    ("model.mask.stage_sizes=[14]", "model.mask.stage_sizes"),
    ("model.mask.stage_loss_weights=[1, 1]", "model.mask.stage_loss_weights"),
    ("model.mask.threshold=1.5", "model.mask.threshold"),
    ("model.mask.train_rois=0", "model.mask.train_rois"),
])
def test_bad_mask_config_is_one_clear_error(override: str, message: str) -> None:
    with pytest.raises(UserError, match=message):
        load_config("co_dino_tiny", [override])


def test_images_without_objects_give_zero_mask_losses_that_reach_every_parameter() -> None:
    model = build(MASKED)
    b = batch()
    b.targets = [Target(torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64), masks=torch.zeros(0, 64, w, dtype=torch.bool))
                 for w in (64, 60)]
    losses = model.loss(b)
    assert losses["mask.loss_mask"] == 0 and losses["mask.loss_mask_iou"] == 0
    (losses["mask.loss_mask"] + losses["mask.loss_mask_iou"]).backward()
    assert all(p.grad is not None for p in model.mask_branch.parameters())


@pytest.mark.slow
def test_the_branch_learns_the_masks_of_a_batch() -> None:
    """Trained alone on fixed encoder maps, the branch's loss falls and its pasted masks of the ground-truth
    boxes come to match the ellipse and the rectangle."""
    model = build(MASKED)
    b = batch()
    with torch.no_grad():
        enc = model.detector.encode_images(b.images, b.masks)
    maps = memory_to_maps(enc.memory, enc.spatial_shapes)
    branch = model.mask_branch
    optimizer = torch.optim.Adam(branch.parameters(), lr=1e-3)
    candidates = [t.boxes + torch.tensor([1.0, -1.0, -1.0, 1.0]) for t in b.targets]
    first = None
    for _ in range(40):
        loss = sum(branch.forward_train(maps, candidates, b.targets).values())
        first = loss.item() if first is None else first
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.3 * first
    target = b.targets[0]
    det = Detections(target.boxes, torch.ones(2), target.labels)
    with torch.inference_mode():
        masks = branch.predict([m[:1] for m in maps], b.image_sizes[:1], [det], b.targets[:1])[0].masks
    iou = (masks & target.masks).flatten(1).sum(1) / (masks | target.masks).flatten(1).sum(1)
    assert (iou > 0.8).all(), iou
