"""Every packaged config builds (full size, on the meta device) with the class count and feature levels
its backbone implies, and its pipelines build; the Co-DINO model-zoo configs name their official file."""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch

from codetr.config import ModelConfig
from codetr.config_parsing import CONFIG_DIR, load_config
from codetr.data import build_transforms
from codetr.models.backbones.build import build_backbone
from codetr.models.build import build_model

CONFIGS = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
_BUILT: dict[str, tuple[list[int], dict[str, tuple[int, ...]]]] = {}


def built(model: ModelConfig) -> tuple[list[int], dict[str, tuple[int, ...]]]:
    """Backbone output channels and state_dict shapes of ``model`` built on the meta device, once per
    architecture (configs differing only in schedules, drop path or checkpointing share one)."""
    model = dataclasses.replace(model, backbone=dataclasses.replace(model.backbone, weights=None, drop_path_rate=0.0, with_cp=False))
    key = repr(model)
    if key not in _BUILT:
        with torch.device("meta"):
            _BUILT[key] = (build_backbone(model.backbone).out_channels,
                           {k: tuple(v.shape) for k, v in build_model(model).state_dict().items()})
    return _BUILT[key]


@pytest.mark.slow
@pytest.mark.parametrize("name", CONFIGS)
def test_packaged_config_builds_with_its_class_count_and_levels(name: str) -> None:
    cfg = load_config(name)
    outputs, state = built(cfg.model)
    levels = cfg.model.transformer.num_feature_levels
    if cfg.model.arch in ("conditional_detr", "dab_detr"):  # single-scale: the last backbone map, projected
        assert len(outputs) == 1 and levels == 1 and state["input_proj.weight"][1] == outputs[0], name
        assert "level_embed" not in state
    elif cfg.model.neck == "sfp":  # ViT-L: one stride-16 map, the simple feature pyramid makes every level
        assert state["level_embed"][0] == levels and len(outputs) == 1
    else:  # channel mapper: a 1x1 conv per backbone map, one extra 3x3 stride-2 level
        assert state["level_embed"][0] == levels
        assert len(outputs) == len(cfg.model.backbone.out_indices) and levels == len(outputs) + 1, name
        mapped = [state[f"neck.convs.{i}.0.weight"] for i in range(levels)]
        assert f"neck.convs.{levels}.0.weight" not in state
        assert [shape[1] for shape in mapped] == [*outputs, outputs[-1]]
        assert mapped[-1][2:] == (3, 3) and all(shape[2:] == (1, 1) for shape in mapped[:-1])
    classes = {shape[0] for key, shape in state.items() if re.fullmatch(r"class_branches\.\d+\.weight", key)}
    assert classes == {cfg.model.num_classes}, name
    if cfg.model.arch == "dino":
        assert state["denoising.label_embedding.weight"][0] == cfg.model.num_classes
    for train in (True, False):
        build_transforms(cfg.data, train)


OFFICIAL = {  # Co-DINO model-zoo config -> published box AP (COCO val2017; LVIS val for *_lvis), None: not published
    "co_dino_5scale_r50_1x_coco": 52.1, "co_dino_5scale_lsj_r50_1x_coco": 52.1, "co_dino_5scale_lsj_r50_3x_coco": 54.8,
    "co_dino_5scale_9encoder_lsj_r50_1x_coco": 52.6, "co_dino_5scale_9encoder_lsj_r50_3x_coco": 55.4,
    "co_dino_5scale_swin_large_1x_coco": 58.9, "co_dino_5scale_swin_large_2x_coco": 59.8,
    "co_dino_5scale_swin_large_3x_coco": 60.0, "co_dino_5scale_lsj_swin_large_1x_coco": 59.3,
    "co_dino_5scale_lsj_swin_large_2x_coco": 60.4, "co_dino_5scale_lsj_swin_large_3x_coco": 60.7,
    "co_dino_5scale_swin_large_16e_o365tococo": 64.1, "co_dino_5scale_r50_1x_lvis": None,
    "co_dino_5scale_lsj_r50_1x_lvis": None, "co_dino_5scale_lsj_swin_large_3x_lvis": 56.9,
    "co_dino_5scale_lsj_swin_large_16e_o365tolvis": 64.5,
}


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_co_dino_zoo_config_names_its_release_and_test_settings(name: str) -> None:
    comment = " ".join(line.lstrip("# ") for line in (CONFIG_DIR / f"{name}.yaml").read_text().splitlines()
                       if line.startswith("#"))
    assert f"official {name}" in comment
    assert (f"{OFFICIAL[name]} " in comment) if OFFICIAL[name] else "no published AP" in comment
    cfg = load_config(name)
    lvis, swin = "lvis" in name, "swin_large" in name
    assert cfg.model.num_classes == (1203 if lvis else 80)
    assert cfg.model.max_detections == (1000 if "o365tolvis" in name else 300)
    assert cfg.model.transformer.num_queries == 900 and cfg.model.dino.soft_nms and cfg.model.dino.soft_nms_iou == 0.8
    assert cfg.data.resize == "mmcv"
    assert cfg.model.backbone.out_indices == [0, 1, 2, 3]
    assert cfg.model.backbone.name == ("swin_large_patch4_window12_384" if swin else "resnet50")
    if "lsj" in name:
        assert cfg.data.augment == "lsj" and cfg.data.lsj_size == (1536 if "o365" in name else 1280 if swin else 1024)
    else:
        assert cfg.data.augment == "detr"
        assert (cfg.data.test_scale, cfg.data.max_size) == ((1280, 2048) if "o365" in name else (800, 1333))
        assert cfg.data.pad_size_divisor == (32 if "o365" in name else 1)
    epochs = {"1x": 12, "2x": 24, "3x": 36, "16e": 16}[re.search(r"_(1x|2x|3x|16e)_", name)[1]]
    if name != "co_dino_5scale_lsj_swin_large_3x_lvis":  # the released file keeps its base's 12 epochs
        assert cfg.train.epochs == epochs
