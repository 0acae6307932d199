"""Parity of codetr's mask branch with the released code itself: the release's mask RoI extractor,
``SimpleRefineMaskHead``, ``MaskIoUHead``, ``BARCrossEntropyLoss``, ``CoDETR._mask_forward_train`` and
``simple_test_mask``, and the Co-Deformable-DETR mask config's ``FCNMaskHead`` path, were run by
``bench/release_reference/record_mask.py`` in the release's environment on the weights of
:func:`release_parity.release_tensor` and the inputs of tests/release_mask_inputs.py; what they computed is
in tests/data/release_parity/mask_{refine,fcn}.{json,pt}. Here codetr runs the same weights, converted from
the release's names by codetr's checkpoint converter, on the same inputs.

Tolerances (float32), on each of a digest's three numbers (sum, sum of absolute values, dot product with a
fixed probe): losses 1e-5 relative; gradients (every parameter's and the input feature maps') 1e-4 of the
release's sum of absolute values of the layer's gradients; forward outputs 1e-4 of their own. Exactly: the
sampled RoIs, the mask and IoU targets, the pasted masks. Mask scores 1e-5 relative.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from release_mask_inputs import (CANVAS, CHANNELS, FCN_STRIDES, IOU_FC, NUM_CLASSES, STRIDES, feature_maps,
                                 inference_inputs, train_inputs)
from release_parity import digest, release_probe, release_tensor

from codetr.config import MaskConfig, ModelConfig, TransformerConfig
from codetr.convert.mmdet import convert_state_dict
from codetr.convert.mmdet_rules import AUX_HEADS_MMDET, MASK_BRANCH_MMDET2, Layout, Rule
from codetr.models.base import MASK_BRANCH
from codetr.models.aux.roi import MASK_ROI_SIZE, MASK_SIZE, RoIHead, multilevel_roi_align, rois_of
from codetr.models.co_detr import CoDETR
from codetr.models.mask.boundary import refine_stages
from codetr.models.mask.branch import MaskBranch
from codetr.models.mask.mask_iou import area_ratios, mask_iou_targets
from codetr.models.mask.paste import crop_masks
from codetr.structures import Detections, Target

pytestmark = pytest.mark.usefixtures("one_thread")

DATA = Path(__file__).resolve().parents[1] / "data" / "release_parity"
LOSS_RTOL = 1e-5
GRAD_RTOL = 1e-4
OUTPUT_RTOL = 1e-4
# codetr's loss names -> the release's
LOSS_NAMES = {"mask.loss_mask": "loss_mask", "mask.loss_mask_iou": "loss_mask_iou"}


def reference(name: str) -> tuple[dict, dict]:
    return json.loads((DATA / f"{name}.json").read_text()), torch.load(DATA / f"{name}.pt")


def digest_off(ours: list[float], release: list[float]) -> float:
    """The largest difference of the digests' numbers over the release's sum of absolute values."""
    scale = max(release[1], 1e-30)
    return max(abs(a - b) / scale for a, b in zip(ours, release))


def gradient_differences(ours: dict[str, list[float]], release: dict[str, list[float]]) -> dict[str, float]:
    """Per gradient: the largest difference of the digests' numbers over its layer's scale, the sum of the
    release's sums of absolute values of the layer's gradients (a weight and its bias together; an input
    level alone). A layer's scale, not the bias's own: a ReLU input within float32 noise of zero may fall on
    either side in the two computations and move the bias gradient by that position's share, a share that
    the bias's own sum, which adds up all positions with their signs, may understate."""
    layer = {k: k if k.startswith("maps.") else k.rsplit(".", 1)[0] for k in release}
    scale: dict[str, float] = {}
    for k, v in release.items():
        scale[layer[k]] = scale.get(layer[k], 0.0) + v[1]
    return {k: max(abs(a - b) for a, b in zip(ours[k], v)) / max(scale[layer[k]], 1e-30) for k, v in release.items()}


def output_digest(name: str, value: torch.Tensor) -> list[float]:
    return digest(value.detach(), release_probe(f"output:{name}", tuple(value.shape)))


def gradient_digests(module: torch.nn.Module, maps: list[torch.Tensor], release_names: dict[str, str]) -> dict[str, list[float]]:
    """The digest of each parameter's gradient under its release name, and of each input level's."""
    out = {release_names[k]: digest(p.grad, release_probe(release_names[k], tuple(p.shape)))
           for k, p in module.named_parameters() if p.grad is not None}
    # a level without RoIs: no gradient here, zeros in the release (its extractor adds the level's sum x 0)
    out.update({f"maps.{i}": digest(torch.zeros_like(m) if m.grad is None else m.grad,
                                    release_probe(f"maps.{i}", tuple(m.shape))) for i, m in enumerate(maps)})
    return out


def converted(state_dict: dict[str, list[int]], rules: list[Rule], prefix: str) -> tuple[dict, dict[str, str]]:
    """The release's weights (its state-dict names and shapes, ``release_tensor`` of each) through codetr's
    converter ``rules``: the state dict of the codetr module whose names are the converted ones under
    ``prefix``, and each of its names' release name (for the gradients). Every release entry is used."""
    source = {k: release_tensor(k, tuple(s)) for k, s in state_dict.items()}
    conversion = convert_state_dict(source, rules, Layout(4, ("rcnn",), (("rcnn", 0),)), {}, keep_aux=True)
    assert not conversion.unused and not conversion.problems, conversion.report()
    assert all(k.startswith(prefix) for k in conversion.state_dict)
    names = {k.removeprefix(prefix): v for k, v in conversion.sources.items()}
    return ({k.removeprefix(prefix): v for k, v in conversion.state_dict.items()},
            {k: v for k, [v] in names.items()})


def refine_branch() -> tuple[MaskBranch, dict[str, str]]:
    """codetr's branch as the released instance config sets it, at the parity sizes, with the release's
    weights through codetr's converter (its mask rules: ``mask_head.*`` -> ``mask_branch.mask_head.*``, the
    LN2d norms ``norm_layer`` -> ``norm``), and the release name of each of its tensors."""
    cfg = ModelConfig(num_classes=NUM_CLASSES, transformer=TransformerConfig(d_model=CHANNELS),
                      mask=MaskConfig(enabled=True, iou_fc_dim=IOU_FC))
    branch = MaskBranch(cfg, list(STRIDES), CoDETR.aux_loss_scale(cfg))
    state, names = converted(reference("mask_refine")[0]["train"]["state_dict"], MASK_BRANCH_MMDET2, MASK_BRANCH)
    branch.load_state_dict(state)  # strict: every tensor of codetr's branch filled
    return branch, names


def train_targets(inputs: dict) -> list[Target]:
    return [Target(b, label, masks=m) for b, label, m in zip(inputs["boxes"], inputs["labels"], inputs["masks"])]


def sorted_rows(rows: torch.Tensor) -> torch.Tensor:
    for column in reversed(range(rows.shape[1])):
        rows = rows[torch.sort(rows[:, column], stable=True).indices]
    return rows


def test_the_same_rois_are_sampled_and_their_targets_are_the_releases():
    """codetr's assigner and sampler keep the release's positives, with the release's mask and IoU targets."""
    summary, ref = reference("mask_refine")
    inputs, (branch, _) = train_inputs(), refine_branch()
    rois, gt_index = [], []
    for i, (cand, boxes) in enumerate(zip(inputs["candidates"], inputs["boxes"])):
        sample = branch.sampler(cand[:, :4], branch.assigner(cand[:, :4], boxes), boxes)
        pos = sample.gt >= 0
        rois.append(torch.cat([torch.full((int(pos.sum()), 1), float(i)), sample.boxes[pos]], 1))
        gt_index.append(sample.gt[pos])
    assert len(torch.cat(rois)) == summary["train"]["num_rois"] == len(ref["rois"])
    torch.testing.assert_close(sorted_rows(torch.cat(rois)), sorted_rows(ref["rois"]), rtol=0, atol=0)
    # on the release's RoIs (in its order): the 28 x 28 targets, area ratios and IoU targets
    release_rois, release_gt = ref["rois"], ref["pos_assigned_gt"]
    image = release_rois[:, 0].long()
    stage_logits, _ = branch(inputs["maps"], release_rois, ref["roi_labels"])
    iou_targets = []
    for i, target in enumerate(train_targets(inputs)):
        boxes, gt = release_rois[image == i, 1:], release_gt[image == i]
        crops = crop_masks(target.masks, boxes, gt, 28)
        iou_targets.append(mask_iou_targets(stage_logits[1][image == i, 0], crops, area_ratios(boxes, gt, target.masks),
                                            branch.cfg.threshold))
    torch.testing.assert_close(torch.cat(iou_targets), ref["iou_targets"], rtol=1e-6, atol=1e-6)
    assert 0 < (ref["iou_targets"] > 0).sum() < len(ref["iou_targets"])  # the IoU loss sees some RoIs, not all


def test_forward_outputs_match_the_release():
    summary, ref = reference("mask_refine")
    inputs, (branch, _) = train_inputs(), refine_branch()
    with torch.no_grad():
        stage_logits, feats = branch(inputs["maps"], ref["rois"], ref["roi_labels"])
        iou = branch.mask_iou_head(feats, stage_logits[1][:, 0])
    torch.testing.assert_close(stage_logits[0], ref["stage0"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(iou, ref["iou_pred"], rtol=1e-4, atol=1e-6)
    for i, logits in enumerate(stage_logits):
        assert digest_off(output_digest(f"stage{i}", logits), summary["train"]["outputs"][f"stage{i}"]) < OUTPUT_RTOL, i


@pytest.fixture(scope="module")
def refine_step() -> tuple[dict[str, float], dict[str, list[float]]]:
    """codetr's training step of the mask branch on the parity batch: losses and gradient digests."""
    inputs, (branch, names) = train_inputs(), refine_branch()
    maps = [m.clone().requires_grad_(True) for m in inputs["maps"]]
    torch.manual_seed(0)
    losses = branch.forward_train(maps, [c[:, :4] for c in inputs["candidates"]], train_targets(inputs))
    sum(losses.values()).backward()
    return {k: float(v.detach()) for k, v in losses.items()}, gradient_digests(branch, maps, names)


def test_losses_match_the_release(refine_step):
    summary, _ = reference("mask_refine")
    losses, _ = refine_step
    assert set(losses) == set(LOSS_NAMES)
    for name, release_name in LOSS_NAMES.items():
        expected = summary["train"]["losses"][release_name]
        assert abs(losses[name] - expected) <= LOSS_RTOL * abs(expected), (name, losses[name], expected)


def test_gradients_match_the_release(refine_step):
    summary, _ = reference("mask_refine")
    _, grads = refine_step
    expected = summary["train"]["gradients"]
    assert set(grads) == set(expected)  # every parameter (both heads) and every input level has one
    off = gradient_differences(grads, expected)
    assert max(off.values()) < GRAD_RTOL, {k: v for k, v in off.items() if v >= GRAD_RTOL}


def unpack(bits: torch.Tensor, width: int) -> torch.Tensor:
    return torch.from_numpy(np.unpackbits(bits.numpy(), axis=-1, count=width).astype(bool))


@pytest.mark.parametrize("index", [0, 1])
def test_pasted_masks_and_mask_scores_are_the_releases(index):
    """``simple_test_mask`` with rescale: the boxes mapped to the original image (scale 0.64, then 1.6) and
    the masks pasted there; codetr's predict gives the same masks, bit for bit, and the same mask scores."""
    summary, ref = reference("mask_refine")
    image = inference_inputs()[index]
    branch = refine_branch()[0].eval()
    det = Detections(image["boxes"], image["scores"], image["labels"])
    target = Target(torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64), orig_size=image["orig_size"])
    [out] = branch.predict(image["maps"], torch.tensor([image["input_size"]]), [det], [target])
    expected = unpack(ref[f"test{index}.masks"], image["orig_size"][1])
    assert out.masks.shape == expected.shape == (6, *image["orig_size"])
    assert expected.any((1, 2)).sum() >= 3
    assert torch.equal(out.masks, expected), (out.masks != expected).sum((1, 2))
    torch.testing.assert_close(out.mask_scores, ref[f"test{index}.mask_scores"], rtol=LOSS_RTOL, atol=1e-7)
    # what was pasted: the stages' logits and their merge
    with torch.no_grad():
        stage_logits, _ = branch(image["maps"], rois_of([image["boxes"]]), image["labels"])
    outputs = {f"stage{k}": logits for k, logits in enumerate(stage_logits)} | {"merged": refine_stages(stage_logits[1:])}
    for name, value in outputs.items():
        assert digest_off(output_digest(f"test{index}.{name}", value), summary[f"test{index}"]["outputs"][name]) \
            < OUTPUT_RTOL, name


def test_fcn_mask_head_path_matches_the_release():
    """The Co-Deformable-DETR mask config's RoI head: FCN mask logits, 28 x 28 targets, loss and gradients."""
    summary, ref = reference("mask_fcn")
    inputs = train_inputs()
    head = RoIHead(NUM_CLASSES, CHANNELS, list(FCN_STRIDES), fc_dim=64, with_mask=True)
    masks = {k: v for k, v in summary["state_dict"].items() if ".mask_head." in k}
    state, names = converted(masks, AUX_HEADS_MMDET, "aux_heads.0.roi.mask_head.")
    head.mask_head.load_state_dict(state)
    maps = [m.requires_grad_(True) for m in feature_maps(len(inputs["sizes"]), *CANVAS, seed=33, strides=FCN_STRIDES)]
    targets = train_targets(inputs)
    torch.manual_seed(0)
    samples = [head.sampler(c[:, :4], head.assigner(c[:, :4], t.boxes), t.boxes)
               for c, t in zip(inputs["candidates"], targets)]
    rois = torch.cat([torch.cat([torch.full((int((s.gt >= 0).sum()), 1), float(i)), s.boxes[s.gt >= 0]], 1)
                      for i, s in enumerate(samples)])
    torch.testing.assert_close(sorted_rows(rois), sorted_rows(ref["rois"]), rtol=0, atol=0)
    # the logits of the release's RoIs, in its order
    with torch.no_grad():
        logits = head.mask_head(multilevel_roi_align(maps, list(FCN_STRIDES), ref["rois"], head.finest_scale,
                                                     MASK_ROI_SIZE))
    assert digest_off(output_digest("fcn.mask_pred", logits), summary["outputs"]["mask_pred"]) < OUTPUT_RTOL
    loss = head.mask_loss(maps, samples, targets) * CoDETR.aux_loss_scale(ModelConfig())
    assert abs(loss.item() - summary["losses"]["loss_mask"]) <= LOSS_RTOL * summary["losses"]["loss_mask"]
    loss.backward()
    grads = gradient_digests(head.mask_head, maps, names)
    assert set(grads) == set(summary["gradients"])
    off = gradient_differences(grads, summary["gradients"])
    assert max(off.values()) < GRAD_RTOL, {k: v for k, v in off.items() if v >= GRAD_RTOL}
    crops = torch.cat([crop_masks(t.masks, s.boxes[s.gt >= 0], s.gt[s.gt >= 0], MASK_SIZE)
                       for t, s in zip(targets, samples)])
    assert torch.equal(sorted_rows(crops.flatten(1)), sorted_rows(ref["mask_targets"].float().flatten(1)))
