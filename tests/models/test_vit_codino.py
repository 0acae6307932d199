"""Co-DINO ViT-L (issue 24, the model side): the released configs build with the released parameter count,
the released checkpoints (exact key names and shapes) convert with nothing left over, the EMA hook's
averages are the weights loaded, the ConvFC RoI head computes what mmdet's does, and a tiny ViT trains
inside Co-DINO through the same code."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from official_co_detr import DATA, co_dino, random_state, read_list, sfp, vit

from codetr.config_parsing import load_config
from codetr.convert.mmdet import convert_checkpoint, model_config_for
from codetr.convert.mmdet_checkpoint import CheckpointError
from codetr.models.aux.roi import RoIHead
from codetr.models.backbones.build import build_backbone
from codetr.models.build import build_model
from codetr.structures import Batch, Target

pytestmark = pytest.mark.usefixtures("one_thread")
RELEASED = {"co_dino_5scale_vit_large_coco": DATA / "co_dino_5scale_vit_large_coco_mmdet2.txt",
            "co_dino_5scale_lsj_vit_large_lvis": DATA / "co_dino_5scale_lsj_vit_large_lvis_mmdet2.txt"}
BACKBONE_KEYS = {"co_dino_5scale_vit_large_coco": "co_dino_vit_large_backbone_keys.txt",
                 "co_dino_5scale_lsj_vit_large_lvis": "co_dino_vit_large_lvis_backbone_keys.txt"}


def is_buffer(name: str) -> bool:
    """Released buffers codetr recomputes: RoPE tables (and batch-norm counters, absent from the ViT)."""
    return ".rope." in name or ".rope_" in name or name.endswith("num_batches_tracked")


@pytest.mark.parametrize("config", list(RELEASED))
def test_released_lists_have_the_independently_listed_backbone_and_neck(config: str) -> None:
    """The ViT and SFP parts of the official lists equal the key files written separately from the
    released vit.py / sfp.py (tests/fixtures/co_dino_vit_large_*_keys.txt), names, shapes and order."""
    reference = []
    for line in (DATA.parent / BACKBONE_KEYS[config]).read_text().splitlines():
        if line and not line.startswith("#"):
            key, shape = line.split()
            reference.append((key, tuple(int(s) for s in shape.split(","))))
    ours = [entry for entry in read_list(RELEASED[config]) if entry[0].startswith(("backbone.", "neck."))]
    assert ours == reference


@pytest.mark.parametrize("config", list(RELEASED))
def test_vit_large_configs_build_with_the_released_parameter_count(config: str) -> None:
    names = read_list(RELEASED[config])
    released = sum(math.prod(shape) for name, shape in names if not is_buffer(name))
    cfg = load_config(config).model
    with torch.device("meta"):
        model = build_model(cfg)
    assert sum(p.numel() for p in model.parameters()) == released
    assert released == {"co_dino_5scale_vit_large_coco": 365_367_657, "co_dino_5scale_lsj_vit_large_lvis": 374_877_868}[config]
    assert model.detector.level_strides == [4, 8, 16, 32, 64]
    head = model.aux_heads[0].roi
    agnostic = config.endswith("coco")  # the COCO config's ConvFC head; LVIS keeps Shared2FC
    assert (head.reg_classes == 1) == agnostic and (len(head.shared_convs) == 12) == agnostic
    assert head.coder.stds == ((0.05, 0.05, 0.1, 0.1) if agnostic else (0.1, 0.1, 0.2, 0.2))


def convert_meta(config: str, names: list[tuple[str, tuple[int, ...]]], keep_aux: bool, **overrides: object):
    state = random_state(names, meta=True)
    cfg = model_config_for(load_config(config).model, state)
    with torch.device("meta"):
        model = build_model(cfg)
    tensors = model.state_dict() if keep_aux else model.inference_state_dict()
    return state, convert_checkpoint(state, cfg, keep_aux, {k: tuple(v.shape) for k, v in tensors.items()})


@pytest.mark.slow
@pytest.mark.parametrize("config", list(RELEASED))
@pytest.mark.parametrize("keep_aux", [False, True])
def test_released_vit_large_checkpoints_convert_without_leftovers(config: str, keep_aux: bool) -> None:
    state, conversion = convert_meta(config, read_list(RELEASED[config]), keep_aux)
    assert conversion.ok, conversion.report()
    assert set(conversion.derived) == {k for k in state if is_buffer(k)}
    used = sum(len(sources) for sources in conversion.sources.values())  # ATSS scales: several sources, one target
    assert len(conversion.derived) + len(conversion.dropped_aux) + used == len(state)
    assert conversion.sources["backbone.blocks.0.attn.q_proj.bias"] == ["backbone.blocks.0.attn.q_bias"]
    if keep_aux and config.endswith("coco"):
        assert conversion.sources["aux_heads.0.roi.shared_convs.10.weight"] == ["roi_head.0.bbox_head.shared_convs.3.gn.weight"]


def test_the_lvis_checkpoint_as_released_converts() -> None:
    """The published LVIS weights differ from their config (Sense-X/Co-DETR issue #152): no global RoPE
    tables (saved without use_lsj) and FedLoss class weights in the classification losses."""
    names = [(k, s) for k, s in read_list(RELEASED["co_dino_5scale_lsj_vit_large_lvis"])
             if "rope_glb" not in k and not (".attn.rope." in k and int(k.split(".")[2]) % 3 == 2)]
    names += [("query_head.loss_cls.fed_loss_weight", (1203,)), ("bbox_head.0.loss_cls.fed_loss_weight", (1203,))]
    _, conversion = convert_meta("co_dino_5scale_lsj_vit_large_lvis", names, False)
    assert conversion.ok, conversion.report()
    assert len(conversion.dropped["FedLoss class-weight buffers (a training loss's state)"]) == 2
    assert "dropped 2 FedLoss" in conversion.report()


def test_window_settings_of_the_other_config_are_refused() -> None:
    state = random_state(read_list(RELEASED["co_dino_5scale_vit_large_coco"]), meta=True)
    cfg = load_config("co_dino_5scale_vit_large_coco", ["model.backbone.window_size=16", "model.backbone.global_every=3"]).model
    with pytest.raises(CheckpointError, match="rope_win.freqs_cos.*576 tokens.*window_size=16"):
        convert_checkpoint(state, model_config_for(cfg, state), False, {})
    with pytest.raises(CheckpointError, match="ViT backbone but the config builds resnet50"):
        model_config_for(load_config("co_dino_5scale_r50_1x_coco", ["model.transformer.num_queries=1500"]).model, state)


# ------------------------------------------------------------------------------ tiny models

TINY_VIT = ["model.backbone.timm_args={embed_dim: 64, depth: 4, num_heads: 2, pretrain_img_size: 64}",
            "model.backbone.window_size=2", "model.backbone.global_every=2", "model.backbone.drop_path_rate=0.0", "model.num_classes=5",
            "model.transformer={d_model: 64, n_heads: 4, ffn_dim: 128, enc_layers: 1, dec_layers: 2, num_queries: 30}",
            "model.dino.num_dn_queries=10", "model.max_detections=50",
            "model.co={rpn_pre_nms: 200, rpn_proposals: 100, roi_samples: 64, roi_fc_dim: 64, max_pos_queries: 40}"]
TINY_SIZES = dict(num_classes=5, num_queries=30, d=64, ffn_dim=128, enc_layers=1, dec_layers=2, heads=4, roi_fc=64)


def tiny_official() -> list[tuple[str, tuple[int, ...]]]:
    """The released COCO ViT-L Co-DINO structure at the tiny sizes above."""
    return co_dino(vit(2, 2, embed_dim=64, depth=4, heads=2, hidden=int(64 * 4 * 2 / 3), pretrain_grid=4), [],
                   neck=sfp(64, 64), roi_convs=4, roi_fcs=1, roi_agnostic=True, **TINY_SIZES)


def mmcv_ema_checkpoint(raw: dict[str, torch.Tensor], averages: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state_dict mmcv's EMA hook leaves for the CheckpointHook (mmdet/core/hook/ema.py): the model holds
    ema_<name> buffers with the running averages; after_train_epoch (priority 49, ahead of checkpointing)
    swaps every model tensor with its buffer."""
    model = dict(raw) | {"ema_" + k.replace(".", "_"): v for k, v in averages.items()}
    for name in raw:  # _swap_ema_parameters
        buffer = "ema_" + name.replace(".", "_")
        model[name], model[buffer] = model[buffer], model[name]
    return model


def test_ema_checkpoints_load_the_averages() -> None:
    names = tiny_official()
    raw, averages = random_state(names, seed=1), random_state(names, seed=2)
    state = mmcv_ema_checkpoint(raw, averages)
    cfg = model_config_for(load_config("co_dino_5scale_vit_large_coco", TINY_VIT).model, state)
    model = build_model(cfg)
    conversion = convert_checkpoint(state, cfg, True)
    assert conversion.ok, conversion.report()
    assert len(conversion.dropped[next(iter(conversion.dropped))]) == len(names) and "ema_* entries" in conversion.report()
    for target, sources in conversion.sources.items():  # ATSS scales: 0-d entries stacked
        expected = averages[sources[0]] if len(sources) == 1 else torch.stack([averages[s] for s in sources])
        assert torch.equal(conversion.state_dict[target], expected), target
    model.load_state_dict(conversion.state_dict)
    assert torch.equal(model.state_dict()["backbone.blocks.1.mlp.fc1_g.weight"], averages["backbone.blocks.1.mlp.w1.weight"])
    state["ema_neck_p9_1_weight"] = torch.zeros(1)
    assert "ema_neck_p9_1_weight: an ema_* entry without a matching model tensor" in convert_checkpoint(state, cfg, True).problems


def tiny_batch() -> Batch:
    g = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, 128, 128, generator=g)
    masks = torch.zeros(2, 128, 128, dtype=torch.bool)
    masks[1, :, 112:] = True
    targets = [Target(torch.tensor([[10.0, 12, 60, 70], [70, 20, 120, 100]]), torch.tensor([0, 2])),
               Target(torch.tensor([[20.0, 30, 50, 80]]), torch.tensor([4]))]
    return Batch(images, masks, torch.tensor([[128, 128], [128, 112]]), targets)


@pytest.mark.slow
def test_tiny_vit_trains_inside_co_dino() -> None:
    """The COCO ViT-L config at tiny sizes (same code: ViT with window and global blocks and activation
    checkpointing, SFP, ConvFC RoI head): a few AdamW steps with finite losses, gradients in every ViT block
    and SFP level, and the weights move."""
    torch.manual_seed(0)
    model = build_model(load_config("co_dino_5scale_vit_large_coco", TINY_VIT).model)
    assert model.detector.backbone.window_block_indexes == [0, 2] and model.detector.backbone.use_act_checkpoint
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    for step in range(3):
        losses = model.loss(tiny_batch())
        assert all(torch.isfinite(v) for v in losses.values()), losses
        assert {"loss_cls", "dn.loss_cls", "rcnn.loss_bbox", "atss.loss_cls", "loss_cls_pos_rcnn"} <= set(losses)
        optimizer.zero_grad()
        sum(losses.values()).backward()
        if step == 0:
            grads = {k: p.grad for k, p in model.named_parameters()}
            for name in [f"detector.backbone.blocks.{i}.attn.q_proj.weight" for i in range(4)] + [
                    "detector.backbone.patch_embed.proj.weight", "detector.backbone.pos_embed",
                    *[f"detector.neck.p{k}.{i}.weight" for k, i in [(2, 1), (3, 1), (4, 0), (5, 1), (6, 1)]],
                    "aux_heads.0.roi.shared_convs.9.weight"]:
                assert grads[name] is not None and grads[name].abs().sum() > 0 and torch.isfinite(grads[name]).all(), name
        optimizer.step()
    moved = [k for k, v in model.named_parameters() if not torch.equal(v, before[k])]
    assert "detector.backbone.blocks.3.mlp.fc2.weight" in moved and "detector.neck.p6.7.weight" in moved
    model.eval()
    detections = model.predict(tiny_batch())
    assert len(detections[0].scores) == 30 and torch.isfinite(detections[1].boxes).all()  # top num_queries, Soft-NMS


def test_convfc_roi_head_equals_mmdet_conv_fc_bbox_head() -> None:
    """4 x (conv 3x3, GroupNorm(32), ReLU), flatten, FC + ReLU, fc_cls / fc_reg, written with functional ops;
    class-agnostic deltas give every class the same box."""
    torch.manual_seed(0)
    head = RoIHead(3, channels=64, num_convs=4, num_fcs=1, fc_dim=32, class_agnostic=True,
                   target_stds=(0.05, 0.05, 0.1, 0.1)).eval()
    with torch.no_grad():
        for p in head.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    sd = head.state_dict()
    x = torch.randn(5, 64, 7, 7)
    y = x
    for j in range(4):
        y = F.conv2d(y, sd[f"shared_convs.{3 * j}.weight"], padding=1)
        y = F.relu(F.group_norm(y, 32, sd[f"shared_convs.{3 * j + 1}.weight"], sd[f"shared_convs.{3 * j + 1}.bias"]))
    y = F.relu(F.linear(y.flatten(1), sd["shared_fcs.0.weight"], sd["shared_fcs.0.bias"]))
    with torch.no_grad():
        logits, deltas = head(x)
    torch.testing.assert_close(logits, F.linear(y, sd["fc_cls.weight"], sd["fc_cls.bias"]))
    assert sd["fc_reg.weight"].shape == (4, 32) and deltas.shape == (5, 3, 4)
    torch.testing.assert_close(deltas, F.linear(y, sd["fc_reg.weight"], sd["fc_reg.bias"])[:, None].expand(-1, 3, -1))
    feats = [torch.randn(1, 64, 32, 32), torch.randn(1, 64, 16, 16)]
    proposals = [torch.tensor([[4.0, 4, 40, 60], [50, 10, 100, 90], [8, 70, 120, 120]])]
    detections = head.predict([f for f in feats], proposals, torch.tensor([[128, 128]]), iou_thr=1.0)[0]
    per_proposal = {}
    for box, score in zip(detections.boxes, detections.scores):  # scores differ per class, boxes do not
        per_proposal.setdefault(round(float(box[0]), 4), []).append(box)
    assert all(torch.equal(b[0], other) for b in per_proposal.values() for other in b) and len(per_proposal) == 3


def test_vit_backbone_and_sfp_neck_errors() -> None:
    cfg = load_config("co_dino_5scale_vit_large_coco")
    with pytest.raises(ValueError, match="weights='eva02.pt'.*convert mmdet"):
        build_backbone(cfg.model.backbone.__class__(**{**vars(cfg.model.backbone), "weights": "eva02.pt"}))
    with pytest.raises(ValueError, match=r"timm_args \['depths'\] are not ViT arguments"):
        build_backbone(cfg.model.backbone.__class__(**{**vars(cfg.model.backbone), "timm_args": {"depths": [2]}}))
    with pytest.raises(ValueError, match="sfp makes 5 levels.*num_feature_levels=4"):
        build_model(load_config("co_dino_5scale_vit_large_coco", [*TINY_VIT, "model.transformer.num_feature_levels=4"]).model)
    with pytest.raises(ValueError, match="unknown model.neck 'fpn'"):
        build_model(load_config("co_dino_tiny", ["model.neck=fpn"]).model)



def test_codetr_convert_mmdet_on_a_tiny_vit_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``codetr convert mmdet`` end to end on an EMA-hook checkpoint of the tiny ViT Co-DINO: the report names
    what it dropped, and the written weights load (config and classes from the file) and detect."""
    from codetr.cli import main
    from codetr.inference.loading import load_model

    config = tmp_path / "tiny_vit.yaml"
    overrides = load_config("co_dino_5scale_vit_large_coco", TINY_VIT).model
    config.write_text(yaml.safe_dump({"base": "co_dino_5scale_vit_large_coco", "model": {
        "backbone": dataclasses.asdict(overrides.backbone), "transformer": dataclasses.asdict(overrides.transformer),
        "co": dataclasses.asdict(overrides.co), "dino": dataclasses.asdict(overrides.dino), "max_detections": 50}}))
    names = tiny_official()
    ckpt = tmp_path / "official.pth"
    torch.save({"meta": {"epoch": 12}, "state_dict": mmcv_ema_checkpoint(random_state(names, seed=1), random_state(names, seed=2))},
               ckpt)
    (tmp_path / "classes.txt").write_text("\n".join("abcde") + "\n")
    out = tmp_path / "converted.safetensors"
    assert main(["convert", "mmdet", str(ckpt), "--config", str(config), "--out", str(out),
                 "--classes", str(tmp_path / "classes.txt")]) == 0
    printed = capsys.readouterr().out
    assert f"dropped {len(names)} ema_* entries" in printed and "dropped 55 auxiliary-head" in printed  # with the ConvFC RoI head
    loaded = load_model(out)
    assert loaded.cfg.model.neck == "sfp" and loaded.cfg.model.backbone.name == "vit_large"
    detections = loaded.model.predict(tiny_batch())
    assert torch.isfinite(detections[0].boxes).all() and len(detections[0].scores) == 30
