"""Conditional DETR and DAB-DETR as base detectors, alone and inside CoDETR with the single-scale
adapter (parity with transformers: tests/convert/test_hf_single_scale.py); the tiny configs train,
evaluate and predict through ``codetr train`` / ``codetr predict``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from codetr.cli import main
from codetr.config_parsing import load_config
from codetr.models.build import build_model
from codetr.models.co_detr import CoDETR
from codetr.models.necks.channel_mapper import SingleScaleAdapter
from codetr.models.positive_queries import DinoPositiveQueryEmbedding, PositiveQueryEmbedding
from codetr.structures import Batch, Target
from synthetic_config import synthetic_data

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = ["model.transformer.enc_layers=1", "model.transformer.dec_layers=2", "model.transformer.num_queries=12",
         "model.co.max_pos_queries=12"]


def tiny(name: str, *overrides: str):
    torch.manual_seed(0)
    return load_config(name, [*SMALL, *overrides]).model


def batch() -> Batch:
    g = torch.Generator().manual_seed(0)
    images, masks = torch.randn(2, 3, 128, 96, generator=g), torch.zeros(2, 128, 96, dtype=torch.bool)
    masks[1, 100:] = True  # the second image is 100 x 96
    targets = [Target(torch.tensor([[10.0, 20.0, 60.0, 90.0], [40.0, 50.0, 90.0, 120.0]]), torch.tensor([1, 3])),
               Target(torch.tensor([[20.0, 10.0, 70.0, 80.0]]), torch.tensor([2]))]
    return Batch(images, masks, torch.tensor([[128, 96], [100, 96]]), targets)


def test_adapter_makes_strides_8_to_128_from_the_c5_map() -> None:
    adapter = SingleScaleAdapter(32)
    memory = torch.randn(2, 5 * 3, 32)
    maps = adapter(memory, [(5, 3)])
    assert [m.shape[-2:] for m in maps] == [(20, 12), (10, 6), (5, 3), (3, 2), (2, 1)]
    # the middle level is the encoder map itself, (B, S, d) -> (B, d, H, W) row-major
    torch.testing.assert_close(maps[2], memory.transpose(1, 2).reshape(2, 32, 5, 3))
    assert SingleScaleAdapter.strides(32) == [8, 16, 32, 64, 128]
    model = build_model(tiny("co_conditional_detr_tiny"))
    assert isinstance(model.adapter, SingleScaleAdapter) and CoDETR.aux_strides(model.detector) == [8, 16, 32, 64, 128]


@pytest.mark.parametrize("name, embedding", [("co_conditional_detr_tiny", PositiveQueryEmbedding),
                                             ("co_dab_detr_tiny", DinoPositiveQueryEmbedding)])
def test_co_training_losses_and_the_plain_detector_inside(name: str, embedding: type) -> None:
    """Every term of K = 2 is finite and every parameter is trained; the positive queries take the
    base detector's own form; at inference the Co- model is the plain detector, with its weights."""
    model = build_model(tiny(name))
    assert isinstance(model.positive_queries, embedding)
    losses = model.loss(batch())
    assert {"loss_cls", "d0.loss_bbox", "atss.loss_cls", "rpn.loss_cls", "loss_cls_pos_atss", "loss_giou_pos_rcnn",
            "d0.loss_bbox_pos_rcnn"} <= set(losses)
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert not [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]

    plain = build_model(tiny(name.removeprefix("co_"))).eval()
    plain.load_state_dict(model.inference_state_dict(), strict=True)
    model.eval()
    ours, theirs = model.predict(batch()), plain.predict(batch())
    for a, b in zip(ours, theirs):
        assert torch.equal(a.boxes, b.boxes) and torch.equal(a.scores, b.scores)


@pytest.mark.parametrize("name", ["co_conditional_detr_tiny", "co_dab_detr_tiny"])
def test_an_auxiliary_head_evaluates_on_the_adapter_pyramid(name: str) -> None:
    """``model.co.eval_head: atss``: detections of the ATSS head on the single-scale adapter's pyramid,
    boxes inside each (unpadded) image."""
    model = build_model(tiny(name, "model.co.eval_head=atss")).eval()
    detections = model.predict(batch())
    assert [len(d.scores) > 0 for d in detections] == [True, True]
    for d, (h, w) in zip(detections, [(128, 96), (100, 96)]):
        assert bool((d.boxes[:, 2] <= w + 1e-3).all()) and bool((d.boxes[:, 3] <= h + 1e-3).all())


def test_conditional_detr_takes_the_centre_of_a_reference_box() -> None:
    """Conditional DETR's positive queries: an auxiliary box's centre is the reference point."""
    model = build_model(tiny("conditional_detr_tiny")).eval()
    b = batch()
    with torch.no_grad():
        enc = model.encode_images(b.images, b.masks)
        q = model.select_queries(enc)
        boxes = torch.cat([q.reference, torch.rand_like(q.reference)], -1)
        from_points = model.decode(enc, q.query, q.query_pos, q.reference)
        from_boxes = model.decode(enc, q.query, q.query_pos, boxes)
        moved = model.decode(enc, q.query, q.query_pos, boxes.flip(1))
    torch.testing.assert_close(from_boxes.boxes, from_points.boxes)
    assert not torch.allclose(moved.boxes, from_points.boxes)
    with pytest.raises(ValueError, match="needs the query position"):
        model.decode(enc, q.query, None, q.reference)


def test_dab_detr_anchors_are_its_queries_and_zero_boxes_stay_finite() -> None:
    """DAB-DETR decodes from anchors alone (no query position); a zero-size anchor (zero-padded positive
    query) keeps every output finite; Co-DAB-DETR with zero padding trains."""
    model = build_model(tiny("dab_detr_tiny")).eval()
    b = batch()
    with torch.no_grad():
        enc = model.encode_images(b.images, b.masks)
        q = model.select_queries(enc)
        assert q.query_pos is None and q.reference.shape == (2, 12, 4)
        out = model.decode(enc, q.query, None, torch.zeros_like(q.reference))
    assert torch.isfinite(out.logits).all() and torch.isfinite(out.boxes).all()
    with pytest.raises(ValueError, match="builds the query position"):
        model.decode(enc, q.query, q.reference, q.reference)
    co = build_model(tiny("co_dab_detr_tiny", "model.co.zero_padding=true"))
    assert all(torch.isfinite(v) for v in co.loss(b).values())


def test_single_scale_needs_one_backbone_map() -> None:
    with pytest.raises(ValueError, match="out_indices"):
        build_model(tiny("conditional_detr_tiny", "model.backbone.out_indices=[2, 3]"))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["conditional_detr_tiny", "co_conditional_detr_k1_tiny", "co_conditional_detr_tiny",
                                  "dab_detr_tiny", "co_dab_detr_k1_tiny", "co_dab_detr_tiny"])
def test_codetr_train_then_predict(name: str, tmp_path: Path) -> None:
    """``codetr train`` on the tiny config (2 iterations, evaluation at the end), then ``codetr predict``."""
    data = synthetic_data(tmp_path / "synth")
    overrides = [*SMALL, *(f"data.{k}={v}" for k, v in data.items()), "train.epochs=1", "train.eval_every=1",
                 "train.device=cpu", "train.log_every=1"]
    out = tmp_path / "run"
    assert main(["train", name, *overrides, "--out", str(out)]) == 0
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("bbox_mAP" in m or "AP" in m for m in metrics), metrics[-1]
    assert main(["predict", str(tmp_path / "synth" / "val"), "--weights", str(out / "model.safetensors"),
                 "--out", str(tmp_path / "pred"), "--score-thr", "0"]) == 0
    assert json.loads((tmp_path / "pred" / "predictions.json").read_text())
