"""``codetr convert mmdet`` for the released Co-DINO-Inst checkpoints (and the Co-Deformable-DETR mask
config): the key lists of the released mask branch (tests/official_co_detr.py ``mask_branch``) convert
strictly with nothing left over, a box-only checkpoint and an instance config (or the reverse) are refused,
and a converted tiny instance model's mask head computes what the released head computes with the
checkpoint's tensors."""

from __future__ import annotations

import math

import pytest
import torch
from official_co_detr import DATA, co_dino, mask_branch, random_state, read_list, sfp, vit
from released_mask import refine_mask_head

from codetr.config_parsing import load_config
from codetr.convert.mmdet import convert_checkpoint, model_config_for
from codetr.convert.mmdet_checkpoint import CheckpointError
from codetr.models.build import build_model

pytestmark = pytest.mark.usefixtures("one_thread")
INSTANCE = {"co_dino_5scale_vit_large_coco_instance": DATA / "co_dino_5scale_vit_large_coco_instance_mmdet2.txt",
            "co_dino_5scale_lsj_vit_large_lvis_instance": DATA / "co_dino_5scale_lsj_vit_large_lvis_instance_mmdet2.txt"}


def is_buffer(name: str) -> bool:
    return ".rope." in name or ".rope_" in name


@pytest.mark.parametrize("config", list(INSTANCE))
def test_instance_configs_build_with_the_released_parameter_count(config: str) -> None:
    names = read_list(INSTANCE[config])
    cfg = load_config(config).model
    with torch.device("meta"):
        model = build_model(cfg)
    assert sum(p.numel() for p in model.parameters()) == sum(math.prod(s) for n, s in names if not is_buffer(n))
    mask = sum(math.prod(s) for n, s in names if n.startswith(("mask_head.", "mask_iou_head.")))
    assert sum(p.numel() for p in model.mask_branch.parameters()) == mask
    assert cfg.mask.loss_weight == (1.33 if "coco" in config else 1.0)


@pytest.mark.slow
@pytest.mark.parametrize("config", list(INSTANCE))
@pytest.mark.parametrize("keep_aux", [False, True])
def test_released_instance_checkpoints_convert_without_leftovers(config: str, keep_aux: bool) -> None:
    state = random_state(read_list(INSTANCE[config]), meta=True)
    cfg = model_config_for(load_config(config).model, state)
    with torch.device("meta"):
        model = build_model(cfg)
    tensors = model.state_dict() if keep_aux else model.inference_state_dict()
    conversion = convert_checkpoint(state, cfg, keep_aux, {k: tuple(v.shape) for k, v in tensors.items()})
    assert conversion.ok, conversion.report()
    masks = {k for k in state if k.startswith(("mask_head.", "mask_iou_head."))}
    assert {s for k, sources in conversion.sources.items() if k.startswith("mask_branch.") for s in sources} == masks
    assert conversion.sources["mask_branch.mask_iou_head.fcs.0.weight"] == ["mask_iou_head.fcs.0.weight"]


def test_box_and_instance_checkpoints_need_their_own_configs() -> None:
    instance = random_state(read_list(INSTANCE["co_dino_5scale_vit_large_coco_instance"]), meta=True)
    with pytest.raises(CheckpointError, match="mask branch.*_instance config"):
        model_config_for(load_config("co_dino_5scale_vit_large_coco").model, instance)
    boxes = random_state(read_list(DATA / "co_dino_5scale_vit_large_coco_mmdet2.txt"), meta=True)
    with pytest.raises(CheckpointError, match="box-only config"):
        model_config_for(load_config("co_dino_5scale_vit_large_coco_instance").model, boxes)


TINY = ["model.backbone.timm_args={embed_dim: 64, depth: 4, num_heads: 2, pretrain_img_size: 64}",
        "model.backbone.window_size=2", "model.backbone.global_every=2", "model.backbone.drop_path_rate=0.0",
        "model.num_classes=5", "model.transformer={d_model: 64, n_heads: 4, ffn_dim: 128, enc_layers: 1, dec_layers: 2, "
        "num_queries: 30}", "model.dino.num_dn_queries=10", "model.max_detections=50",
        "model.co={rpn_pre_nms: 200, rpn_proposals: 100, roi_samples: 64, roi_fc_dim: 64, max_pos_queries: 40}",
        "model.mask.iou_fc_dim=32"]


def test_converted_tiny_instance_model_has_the_released_mask_head() -> None:
    names = co_dino(vit(2, 2, embed_dim=64, depth=4, heads=2, hidden=int(64 * 4 * 2 / 3), pretrain_grid=4), [],
                    neck=sfp(64, 64), roi_convs=4, roi_fcs=1, roi_agnostic=True, num_classes=5, num_queries=30, d=64,
                    ffn_dim=128, enc_layers=1, dec_layers=2, heads=4, roi_fc=64, masks=mask_branch(5, d=64, iou_fc=32))
    state = random_state(names, seed=2)
    cfg = model_config_for(load_config("co_dino_5scale_vit_large_coco_instance", TINY).model, state)
    model = build_model(cfg)
    conversion = convert_checkpoint(state, cfg)
    assert conversion.ok, conversion.report()
    model.load_state_dict(conversion.state_dict, strict=False)
    # the formulas of tests/released_mask.py name the LN2d norms ``norm`` (the checkpoint: ``norm_layer``)
    released = {k.removeprefix("mask_head.").replace(".norm_layer.", ".norm."): v for k, v in state.items()
                if k.startswith("mask_head.")}
    rois = torch.tensor([[0.0, 3.0, 4.0, 40.0, 30.0], [0.0, 10.0, 12.5, 20.0, 61.0]])
    labels = torch.tensor([4, 1])
    feats, semantic = torch.randn(2, 64, 14, 14), torch.randn(1, 64, 16, 16)
    with torch.no_grad():
        ours = model.mask_branch.mask_head(feats, semantic, rois, labels)
        reference = refine_mask_head(released, feats, semantic, rois, labels, 1, 2, [14, 28, 56, 112], [5, 5, 5, 1], 4)
    for a, b in zip(ours, reference):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("keep_aux", [False, True])
def test_co_deformable_detr_mask_checkpoint_converts_without_leftovers(keep_aux: bool) -> None:
    """co_deformable_detr_mask_r50_1x_coco: the FCN mask head of the Faster R-CNN head (roi_head.0.mask_head) is
    an auxiliary part, kept with --keep-aux, dropped as training-only otherwise."""
    state = random_state(read_list(DATA / "co_deformable_detr_mask_r50_mmdet2.txt"), meta=True)
    cfg = model_config_for(load_config("co_deformable_detr_mask_r50_1x_coco").model, state)
    with torch.device("meta"):
        model = build_model(cfg)
    tensors = model.state_dict() if keep_aux else model.inference_state_dict()
    conversion = convert_checkpoint(state, cfg, keep_aux, {k: tuple(v.shape) for k, v in tensors.items()})
    assert conversion.ok, conversion.report()
    masks = sorted(k for k in state if ".mask_head." in k)
    assert len(masks) == 12
    if keep_aux:
        assert conversion.sources["aux_heads.0.roi.mask_head.upsample.weight"] == ["roi_head.0.mask_head.upsample.weight"]
    else:
        assert set(masks) <= set(conversion.dropped_aux)
