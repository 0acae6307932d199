"""DINO and Co-DINO: every loss term with and without ground truth, gradients into every part,
Co-DINO's inference equal to DINO's with shared weights, the decoder's query position and
look-forward-twice, class-aware query selection, released post-processing."""

import dataclasses
import math
from pathlib import Path

import pytest
import torch

from codetr.config_parsing import load_config
from codetr.errors import UserError
from codetr.models.build import build_model
from codetr.models.co_detr import CoDETR
from codetr.models.dino import DINO, apply_soft_nms
from codetr.models.transformer.position import box_sine_embed
from codetr.ops.soft_nms import batched_soft_nms
from codetr.structures import Batch, Detections, Target

pytestmark = pytest.mark.usefixtures("one_thread")
# the mmdetection 3.x Co-DINO R50 state-dict list (3 classes), copied from shared/reference
RELEASED_KEYS = Path(__file__).parents[1] / "fixtures" / "official" / "co_dino_5scale_r50_lsj_3classes_mmdet3_reference.txt"


def tiny(name="co_dino_tiny", **co):
    cfg = load_config(name).model
    cfg.transformer = dataclasses.replace(cfg.transformer, enc_layers=1, dec_layers=2, num_queries=30)
    cfg.dino = dataclasses.replace(cfg.dino, num_dn_queries=8)
    if co:
        cfg.co = dataclasses.replace(cfg.co, **co)
    return cfg


def batch(with_boxes: bool = True) -> Batch:
    g = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, 96, 96, generator=g)
    masks = torch.zeros(2, 96, 96, dtype=torch.bool)
    masks[1, 64:] = True
    empty = Target(torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64))
    targets = [Target(torch.tensor([[10.0, 12, 60, 70], [50, 20, 90, 90]]), torch.tensor([0, 2])),
               Target(torch.tensor([[20.0, 10, 50, 60]]), torch.tensor([5]))] if with_boxes else [empty, empty]
    return Batch(images, masks, torch.tensor([[96, 96], [64, 96]]), targets)


@pytest.mark.parametrize("with_boxes", [True, False])
def test_dino_training_step_has_every_term_and_reaches_every_part(with_boxes):
    torch.manual_seed(0)
    model = build_model(tiny("dino_tiny"))
    assert isinstance(model, DINO)
    losses = model.loss(batch(with_boxes))
    expected = {f"{p}{k}" for p in ("", "d0.", "enc.", "dn.", "d0.dn.") for k in ("loss_cls", "loss_bbox", "loss_giou")}
    assert expected == set(losses)
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(g is not None for g in grads.values())  # every parameter is reached (distributed training needs it)
    for name in ("backbone.layer1.0.conv1.weight", "encoder.layers.0.self_attn.value_proj.weight",
                 "decoder_layers.1.cross_attn.sampling_offsets.weight", "ref_point_head.0.weight",
                 "decoder_norm.weight", "query_embedding.weight"):
        assert grads[name].abs().sum() > 0, name
    assert (grads["denoising.label_embedding.weight"].abs().sum() > 0) == with_boxes


@pytest.mark.parametrize("with_boxes", [True, False])
def test_co_dino_training_step_reaches_the_auxiliary_heads(with_boxes):
    torch.manual_seed(0)
    model = build_model(tiny())
    assert isinstance(model, CoDETR) and isinstance(model.detector, DINO)
    losses = model.loss(batch(with_boxes))
    assert {"atss.loss_cls", "atss.loss_bbox", "rpn.loss_cls", "loss_cls_pos_atss", "loss_cls_pos_rcnn",
            "d0.loss_giou_pos_rcnn", "dn.loss_cls", "enc.loss_cls"} <= set(losses)
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    params = dict(model.named_parameters())
    reached = ["detector.backbone.layer1.0.conv1.weight", "detector.encoder.layers.0.ffn.0.weight",
               "detector.decoder_layers.0.self_attn.in_proj_weight", "adapter.downsample.0.weight",
               "aux_heads.1.atss_cls.weight", "aux_heads.0.rpn.rpn_cls.weight", "aux_heads.0.roi.fc_cls.weight"]
    if with_boxes:
        reached += ["positive_queries.box_proj.0.weight", "positive_queries.box_proj.1.weight"]
    for name in reached:
        assert params[name].grad is not None and params[name].grad.abs().sum() > 0, name


def test_co_dino_pyramid_and_roi_levels_follow_the_release():
    model = build_model(tiny())
    assert model.detector.level_strides == [4, 8, 16, 32, 64]
    assert model.aux_heads[0].rpn.strides == [4, 8, 16, 32, 64, 128]
    assert model.aux_heads[0].roi.strides == [4, 8, 16, 32, 64] and model.aux_heads[0].roi.finest_scale == 56
    assert model.aux_heads[1].strides == [4, 8, 16, 32, 64, 128]
    # Co-DINO's positive queries: box embedding only, 512 -> 256, no feature term, no head embedding
    assert not hasattr(model.positive_queries, "feat_proj") and not hasattr(model.positive_queries, "head_embed")
    assert model.positive_queries.box_proj[0].weight.shape == (64, 128)


def test_co_dino_eval_equals_dino_with_the_same_weights():
    torch.manual_seed(0)
    co = build_model(tiny()).eval()
    plain = build_model(tiny("dino_tiny")).eval()
    weights = co.inference_state_dict()
    assert not any(k.startswith(("aux_heads.", "adapter.", "positive_queries.", "denoising.")) for k in weights)
    missing, unexpected = plain.load_state_dict(weights, strict=False)
    assert missing == ["denoising.label_embedding.weight"] and not unexpected
    b = batch()
    for ours, theirs in zip(co.predict(b), plain.predict(b), strict=True):
        assert torch.equal(ours.boxes, theirs.boxes) and torch.equal(ours.scores, theirs.scores)
        assert torch.equal(ours.labels, theirs.labels)


def test_box_sine_embed_is_y_x_w_h_with_interleaved_sin_cos():
    boxes = torch.rand(2, 3, 4)
    out = box_sine_embed(boxes, num_feats=8)
    assert out.shape == (2, 3, 32)
    for b in range(2):
        for q in range(3):
            expected = []
            for coord in (1, 0, 2, 3):  # y, x, w, h
                for i in range(8):
                    angle = boxes[b, q, coord] * 2 * math.pi / 10000 ** (2 * (i // 2) / 8)
                    expected.append(math.sin(angle) if i % 2 == 0 else math.cos(angle))
            torch.testing.assert_close(out[b, q], torch.tensor(expected), rtol=1e-5, atol=1e-5)


def test_decoder_looks_forward_twice_and_samples_from_detached_references():
    torch.manual_seed(0)
    model = build_model(tiny("dino_tiny")).eval()
    with torch.no_grad():  # the box branches start at zero: give them a slope
        for branch in model.box_branches:
            branch[-1].weight.normal_(std=0.1)
    b = batch()
    enc = model.encode_images(b.images, b.masks)
    queries = model.select_queries(enc)
    assert queries.query_pos is None and queries.enc_logits.shape == (2, 30, 6)
    out = model.decode(enc, queries.query, None, queries.reference)
    first_box_branch = model.box_branches[0][0].weight
    # layer 1's box is layer 0's refined reference, refined again: it back-propagates into layer 0's branch
    (grad_box,) = torch.autograd.grad(out.boxes[1].sum(), first_box_branch, retain_graph=True)
    assert grad_box.abs().sum() > 0
    # layer 1's sampling (hence its logits) sees layer 0's reference only detached
    (grad_logit,) = torch.autograd.grad(out.logits[1].sum(), first_box_branch, allow_unused=True)
    assert grad_logit is None or grad_logit.abs().sum() == 0
    with pytest.raises(ValueError, match="query position"):
        model.decode(enc, queries.query, queries.query, queries.reference)


def test_query_selection_ranks_proposals_by_their_best_class():
    torch.manual_seed(0)
    model = build_model(tiny("dino_tiny")).eval()
    b = batch()
    enc = model.encode_images(b.images, b.masks)
    memory, _ = model.encoder_proposals(enc)
    best = model.class_branches[-1](memory).max(-1)[0]
    queries = model.select_queries(enc)
    top = torch.topk(best, 30, dim=1)[0]
    torch.testing.assert_close(queries.enc_logits.max(-1)[0], top)


def test_inference_top_k_soft_nms_then_max_detections():
    torch.manual_seed(0)
    cfg = tiny("dino_tiny")
    cfg.max_detections = 10
    model = build_model(cfg).eval()
    logits, boxes = torch.randn(1, 30, 6), torch.rand(1, 30, 4) * 0.5 + 0.25
    sizes = torch.tensor([[96, 128]])
    top_boxes, top_scores, top_labels = model.postprocess(logits, boxes, sizes)
    raw = logits.sigmoid().flatten()
    assert top_scores.shape == (1, 30)  # num_queries candidates before Soft-NMS
    torch.testing.assert_close(top_scores[0], raw.topk(30)[0])
    dets = apply_soft_nms(Detections(top_boxes[0], top_scores[0], top_labels[0]), cfg)
    keep, decayed = batched_soft_nms(top_boxes[0], top_scores[0], top_labels[0], 0.8)
    assert len(dets.scores) == 10 and torch.equal(dets.scores, decayed[:10])
    assert torch.equal(dets.boxes, top_boxes[0][keep[:10]]) and torch.equal(dets.labels, top_labels[0][keep[:10]])
    model.cfg.dino.soft_nms = False
    _, plain, _ = model.postprocess(logits, boxes, sizes)
    torch.testing.assert_close(plain[0], raw.topk(10)[0])
    # predict = the tensors, then Soft-NMS
    model.cfg.dino.soft_nms = True
    b = batch()
    tensors = model.predict_tensors(b.images, b.masks, b.image_sizes)
    for i, det in enumerate(model.predict(b)):
        expected = apply_soft_nms(Detections(*(t[i] for t in tensors)), cfg)
        assert torch.equal(det.scores, expected.scores) and torch.equal(det.boxes, expected.boxes)


def test_soft_nms_candidates_as_the_mmdet3_port():
    """``model.dino.soft_nms_candidates: 10`` with ``max_detections: 10``: the port's top-10 pairs enter
    Soft-NMS, not the released top ``num_queries`` (30). The best 15 queries predict one box (near-duplicates
    Soft-NMS decays), the next 15 separate boxes that only the released candidates include."""
    torch.manual_seed(0)
    cfg = tiny("dino_tiny")
    cfg.max_detections = 10
    model = build_model(cfg).eval()
    logits = torch.full((1, 30, 6), -5.0)
    logits[0, torch.arange(15), torch.arange(15) % 3] = 3 + 0.1 * torch.randn(15)
    logits[0, torch.arange(15, 30), 0] = 1 + 0.1 * torch.randn(15)
    boxes = torch.tensor([0.5, 0.5, 0.3, 0.3]).repeat(1, 30, 1) + 0.005 * torch.randn(1, 30, 4)
    boxes[0, 15:, :2] = torch.rand(15, 2)
    boxes[0, 15:, 2:] = 0.02
    sizes = torch.tensor([[96, 128]])
    released = apply_soft_nms(Detections(*(t[0] for t in model.postprocess(logits, boxes, sizes))), cfg)
    model.cfg.dino = cfg.dino = dataclasses.replace(cfg.dino, soft_nms_candidates=10)
    candidates = [t[0] for t in model.postprocess(logits, boxes, sizes)]
    torch.testing.assert_close(candidates[1], logits.sigmoid().flatten().topk(10)[0])
    ported = apply_soft_nms(Detections(*candidates), cfg)
    keep, decayed = batched_soft_nms(*candidates, 0.8)
    assert torch.equal(ported.scores, decayed) and torch.equal(ported.boxes, candidates[0][keep])
    # issue 33: the port's scores fall after one box per class, the released ones stay high
    assert (ported.scores > 0.5).sum() == 3 and (released.scores > 0.5).sum() == 10
    with pytest.raises(UserError, match="soft_nms_candidates"):
        load_config("dino_tiny", ["model.dino.soft_nms_candidates=0"])


def test_co_dino_r50_has_the_released_parameter_count():
    """Every number of the released mmdetection 3.x Co-DINO R50 state dict (3 classes), summed,
    equals ours (built on the meta device: no memory)."""
    released = 0
    for line in open(RELEASED_KEYS):
        name, shape = line.strip().rsplit(" (", 1)
        if not name.endswith("num_batches_tracked"):
            released += math.prod(int(d) for d in shape.rstrip(")").split(",") if d.strip())
    cfg = load_config("co_dino_5scale_r50_1x_coco", ["model.backbone.weights=null", "model.num_classes=3"])
    with torch.device("meta"):
        model = build_model(cfg.model)
    assert sum(v.numel() for v in model.state_dict().values()) == released == 64_526_780
