"""``codetr convert mmdet``: official Co-Deformable-DETR checkpoints (exact released names and shapes,
random values) convert with nothing left over, run, and fail clearly when they do not fit."""

from __future__ import annotations

import json
import math
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from official_co_detr import (
    DATA,
    MMDET3_REFERENCE,
    co_deformable_detr,
    co_dino,
    format_list,
    random_state,
    read_list,
    released_configs,
    resnet,
    swin_mmdet,
    swin_v1,
)
from synthetic_config import synthetic_data

from codetr.cli import main
from codetr.config_parsing import load_config
from codetr.convert.mmdet import coco_classes, convert_checkpoint, model_config_for, read_classes
from codetr.convert.mmdet_checkpoint import CheckpointError, load_mmdet_checkpoint
from codetr.convert.mmdet_rules import detect_detector
from codetr.data import collate
from codetr.inference.loading import load_model
from codetr.structures import Target

pytestmark = pytest.mark.usefixtures("one_thread")

ZOO = {  # packaged config -> official key/shape list
    "co_deformable_detr_r50_1x_coco": "co_deformable_detr_r50",
    "co_deformable_detr_swin_tiny_1x_coco": "co_deformable_detr_swin_tiny",
    "co_deformable_detr_swin_tiny_3x_coco": "co_deformable_detr_swin_tiny",
    "co_deformable_detr_swin_small_1x_coco": "co_deformable_detr_swin_small",
    "co_deformable_detr_swin_small_3x_coco": "co_deformable_detr_swin_small",
    "co_deformable_detr_swin_base_1x_coco": "co_deformable_detr_swin_base",
    "co_deformable_detr_swin_base_3x_coco": "co_deformable_detr_swin_base",
    "co_deformable_detr_swin_large_1x_coco": "co_deformable_detr_swin_large",
    "co_deformable_detr_swin_large_900q_3x_coco": "co_deformable_detr_swin_large_900q",
    "co_dino_5scale_r50_1x_coco": "co_dino_5scale_r50",
    "co_dino_5scale_lsj_r50_3x_coco": "co_dino_5scale_r50",
    "co_dino_5scale_swin_large_1x_coco": "co_dino_5scale_swin_large",  # the 2x / 3x / LSJ / O365 rows share it
    "co_dino_5scale_lsj_swin_large_3x_coco": "co_dino_5scale_swin_large",  # (tests/models/test_model_zoo.py checks them all)
}
TINY_SIZES = dict(num_classes=6, num_queries=50, d=64, ffn_dim=256, enc_layers=2, dec_layers=3, heads=4, roi_fc=256)
TINY_SWIN = {"embed_dim": 16, "depths": [2, 2, 2, 2], "num_heads": [1, 2, 4, 8]}


def tiny_official(backbone: str = "resnet18", **sizes: int) -> list[tuple[str, tuple[int, ...]]]:
    """The released Co-Deformable-DETR structure at the tiny config's widths (``co_dino_mmdet2`` /
    ``co_dino_mmdet3``: Co-DINO's with a ResNet-18, at co_dino_tiny's widths)."""
    if backbone.startswith("co_dino"):
        return co_dino(resnet(18), [64, 128, 256, 512], mmdet3=backbone.endswith("3"), **(TINY_SIZES | {"num_queries": 100}))
    if backbone == "resnet18":
        return co_deformable_detr(resnet(18), [128, 256, 512], **(TINY_SIZES | sizes))
    names = (swin_v1 if backbone == "swin_v1" else swin_mmdet)(16, (2, 2, 2, 2), (1, 2, 4, 8), 7, (1, 2, 3))
    return co_deformable_detr(names, [32, 64, 128], **(TINY_SIZES | sizes))


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The packaged tiny Co-DETR with a frozen-batch-norm ResNet-18 (as the released ResNets) on a
    64 px synthetic dataset."""
    root = tmp_path_factory.mktemp("mmdet")
    synth = root / "synth"
    cfg = {
        "base": "co_deformable_detr_tiny",
        "model": {"backbone": {"name": "resnet18", "weights": None, "norm": "frozen_bn", "frozen_stages": 1}},
        "data": synthetic_data(synth),
        "train": {"epochs": 1, "device": "cpu", "log_every": 1, "eval_every": 1},
    }
    path = root / "tiny_r18.yaml"
    path.write_text(yaml.safe_dump(cfg))
    cfg["model"]["backbone"] = {"name": "swin_tiny_patch4_window7_224", "weights": None, "frozen_stages": -1,
                                "timm_args": TINY_SWIN}
    (root / "tiny_swin.yaml").write_text(yaml.safe_dump(cfg))
    cfg["base"] = "co_dino_tiny"
    cfg["model"]["backbone"] = {"name": "resnet18", "weights": None, "norm": "frozen_bn", "frozen_stages": 1}
    (root / "tiny_co_dino.yaml").write_text(yaml.safe_dump(cfg))
    (root / "classes.txt").write_text("\n".join(["circle", "square", "triangle", "star", "ring", "cross"]) + "\n")
    return path


def save_mmdet(state: dict[str, torch.Tensor], path: Path, meta: dict | None = None) -> Path:
    torch.save({"meta": meta or {"epoch": 12, "CLASSES": ("a", "b")}, "state_dict": state}, path)
    return path


# ----------------------------------------------------------------------- the official lists


def test_official_lists_are_current() -> None:
    """tests/fixtures/official/*_mmdet2.txt are the lists written from the released definitions."""
    lists = released_configs()
    assert sorted(p.name for p in DATA.glob("*_mmdet2.txt")) == sorted(f"{name}_mmdet2.txt" for name in lists)
    for name, names in lists.items():
        assert (DATA / f"{name}_mmdet2.txt").read_text() == format_list(names), name


def test_lists_agree_with_what_mmdetection_builds() -> None:
    """The lists come from the same building blocks as this one, which equals, name for name, shape for
    shape and in order, the state_dict mmdetection 3.x builds for Co-DINO R50 (3 classes)."""
    ours = co_dino(resnet(50), [256, 512, 1024, 2048], num_classes=3, mmdet3=True)
    assert ours == read_list(MMDET3_REFERENCE)


RELEASED = [(config, DATA / f"{ZOO[config]}_mmdet2.txt") for config in (
    "co_deformable_detr_r50_1x_coco", "co_deformable_detr_swin_tiny_1x_coco", "co_deformable_detr_swin_small_3x_coco",
    "co_deformable_detr_swin_base_1x_coco", "co_deformable_detr_swin_large_1x_coco",
    "co_deformable_detr_swin_large_900q_3x_coco", "co_dino_5scale_r50_1x_coco", "co_dino_5scale_lsj_swin_large_3x_coco")]
RELEASED.append(("co_dino_5scale_lsj_r50_1x_coco", MMDET3_REFERENCE))


@pytest.mark.parametrize(("config", "names"), RELEASED, ids=[f"{c}-{n.stem}" for c, n in RELEASED])
def test_released_checkpoints_convert_without_leftovers(config: str, names: Path) -> None:
    """Every released tensor is used and every codetr tensor filled, shapes checked (full sizes, on
    the meta device)."""
    from codetr.models.build import build_model

    state = random_state(read_list(names), meta=True)
    cfg = model_config_for(load_config(config).model, state)
    assert cfg.num_classes == (3 if names == MMDET3_REFERENCE else 80) and cfg.backbone.weights is None
    with torch.device("meta"):
        model = build_model(cfg)
    full = convert_checkpoint(state, cfg, True, {k: tuple(v.shape) for k, v in model.state_dict().items()})
    assert full.ok, full.report()
    assert len(full.derived) + len(full.sources) + sum(len(s) - 1 for s in full.sources.values()) == len(state)
    inference = convert_checkpoint(state, cfg, False, {k: tuple(v.shape) for k, v in model.inference_state_dict().items()})
    assert inference.ok, inference.report()
    assert {k for k in inference.dropped_aux if not k.startswith(("rpn_head.", "roi_head.", "bbox_head."))} == {
        k for k in state if k.startswith(("query_head.downsample.", "query_head.transformer.aux_pos",
                                          "query_head.transformer.pos_feats", "query_head.transformer.head_pos"))
        or k.endswith("label_embedding.weight")}


def test_co_dino_with_nine_encoder_layers_converts() -> None:
    from codetr.models.build import build_model

    state = random_state(co_dino(resnet(50), [256, 512, 1024, 2048], enc_layers=9, mmdet3=True), meta=True)
    cfg = model_config_for(load_config("co_dino_5scale_9encoder_lsj_r50_1x_coco").model, state)
    with torch.device("meta"):
        model = build_model(cfg)
    conversion = convert_checkpoint(state, cfg, True, {k: tuple(v.shape) for k, v in model.state_dict().items()})
    assert conversion.ok and "encoder.layers.8.ffn.3.weight" in conversion.state_dict, conversion.report()


@pytest.mark.slow
def test_every_zoo_config_matches_its_release() -> None:
    for config, name in ZOO.items():
        state = random_state(read_list(DATA / f"{name}_mmdet2.txt"), meta=True)
        cfg = model_config_for(load_config(config).model, state)
        neck_in = [v.shape[1] for k, v in state.items() if re.match(r"neck\.convs\.\d\.conv\.weight", k)]
        with torch.device("meta"):
            from codetr.models.backbones.build import build_backbone

            assert neck_in == build_backbone(cfg.backbone).out_channels, config
        assert cfg.max_detections == (300 if "900q" in config or "dino" in config else 100)
    with pytest.raises(CheckpointError, match="900 queries .*num_queries=300"):
        model_config_for(load_config("co_deformable_detr_swin_large_1x_coco").model, random_state(
            read_list(DATA / "co_deformable_detr_swin_large_900q_mmdet2.txt"), meta=True))
    with pytest.raises(CheckpointError, match="ResNet backbone but the config builds swin_tiny"):
        model_config_for(load_config("co_deformable_detr_swin_tiny_1x_coco").model, random_state(
            read_list(DATA / "co_deformable_detr_r50_mmdet2.txt"), meta=True))


# ------------------------------------------------------------------ converted models run


def random_batch(size: tuple[int, int] = (64, 80)) -> object:
    target = Target(torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64), 0, size)
    return collate([(torch.randn(3, *size), target)])


@pytest.mark.parametrize("backbone", ["resnet18", "swin_v1", "swin_mmdet", "co_dino_mmdet2", "co_dino_mmdet3"])
def test_converted_tiny_model_runs_and_evaluates(backbone: str, tiny_config: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    configs = {"resnet18": tiny_config, "swin_v1": "tiny_swin.yaml", "swin_mmdet": "tiny_swin.yaml",
               "co_dino_mmdet2": "tiny_co_dino.yaml", "co_dino_mmdet3": "tiny_co_dino.yaml"}
    config = tiny_config.parent / configs[backbone]
    ckpt = save_mmdet(random_state(tiny_official(backbone), seed=3), tmp_path / "official.pth")
    out = tmp_path / "converted.safetensors"
    assert main(["convert", "mmdet", str(ckpt), "--config", str(config), "--out", str(out),
                 "--classes", str(tiny_config.parent / "classes.txt")]) == 0
    printed = capsys.readouterr().out
    dropped = 45 if backbone.startswith("co_dino") else 52  # auxiliary heads, positive-query layers (DINO: label embedding)
    assert f"dropped {dropped} auxiliary-head" in printed and f"wrote {out}" in printed
    loaded = load_model(out)  # the config and class names stored in the file
    assert loaded.class_names[:2] == ["circle", "square"] and loaded.category_ids == [1, 2, 3, 4, 5, 6]
    detections = loaded.model.predict(random_batch())[0]
    assert len(detections.scores) == loaded.cfg.model.max_detections
    assert torch.isfinite(detections.boxes).all() and torch.isfinite(detections.scores).all()
    if backbone == "resnet18":
        assert main(["eval", str(config), "--weights", str(out), "--out", str(tmp_path)]) == 0
        assert set(json.loads((tmp_path / "metrics.json").read_text())) >= {"AP", "AP50"}


def released_positive_queries(state: dict[str, torch.Tensor], head: int, boxes: torch.Tensor,
                              feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The released CoDeformableDetrTransformer.forward_aux query construction, step by step.
    boxes (B, G, 4) cxcywh normalised, feats (B, G, d) -> (query, query_pos)."""
    t = "query_head.transformer."
    d = feats.shape[-1]
    x = boxes.clamp(0, 1)
    coords = torch.log(x.clamp(min=1e-5) / (1 - x).clamp(min=1e-5))  # inverse_sigmoid, eps 1e-5
    num_feats = d // 2
    dim_t = 10000 ** (2 * (torch.arange(num_feats, dtype=torch.float32) // 2) / num_feats)
    pos = (coords.sigmoid() * 2 * torch.pi)[..., None] / dim_t
    pos = torch.stack((pos[..., 0::2].sin(), pos[..., 1::2].cos()), dim=4).flatten(2)
    out = F.linear(pos, state[f"{t}aux_pos_trans.{head}.weight"], state[f"{t}aux_pos_trans.{head}.bias"])
    out = F.layer_norm(out, (2 * d,), state[f"{t}aux_pos_trans_norm.{head}.weight"], state[f"{t}aux_pos_trans_norm.{head}.bias"])
    query_pos, query = out.split(d, dim=2)
    feat = F.linear(feats, state[f"{t}pos_feats_trans.{head}.weight"], state[f"{t}pos_feats_trans.{head}.bias"])
    query = query + F.layer_norm(feat, (d,), state[f"{t}pos_feats_norm.{head}.weight"], state[f"{t}pos_feats_norm.{head}.bias"])
    query_pos = query_pos + state[f"{t}head_pos_embed.weight"][head]  # (1,): one scalar for every channel
    return query, query_pos


def test_head_pos_embed_converts_exactly(tiny_config: Path) -> None:
    """The (2, 1) released table gives the released positive queries; checked with the auxiliary heads
    listed in the other order, so the checkpoint's head 0 (Faster R-CNN) is codetr's head 1."""
    from codetr.models.build import build_model

    state = random_state(tiny_official(), seed=5)
    state["query_head.transformer.head_pos_embed.weight"] = torch.tensor([[0.7], [-1.3]])
    cfg = load_config(tiny_config, ["model.co.aux_heads=[atss, rcnn]"]).model
    cfg = model_config_for(cfg, state)
    conversion = convert_checkpoint(state, cfg, keep_aux=True)
    assert conversion.ok, conversion.report()
    model = build_model(cfg)
    model.load_state_dict(conversion.state_dict, strict=True)
    torch.manual_seed(0)
    boxes, feats = torch.rand(2, 7, 4) * 0.8 + 0.1, torch.randn(2, 7, 64)
    for released_head, codetr_head in ((0, 1), (1, 0)):
        query, query_pos = model.positive_queries(codetr_head, boxes, feats)
        ref_query, ref_pos = released_positive_queries(state, released_head, boxes, feats)
        torch.testing.assert_close(query, ref_query, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(query_pos, ref_pos, atol=1e-5, rtol=1e-5)


def released_dino_positive_queries(state: dict[str, torch.Tensor], head: int, anchors: torch.Tensor) -> torch.Tensor:
    """The released CoDinoTransformer.forward_aux query, step by step: LN(Linear(get_proposal_pos_embed(
    inverse_sigmoid(anchors)))) with the module-level inverse_sigmoid (eps 1e-5), num_pos_feats = d / 2 and
    temperature 10000. anchors (B, G, 4) cxcywh normalised -> (B, G, d)."""
    t = "query_head.transformer."
    d = state[f"{t}aux_pos_trans.{head}.weight"].shape[0]
    x = anchors.clamp(0, 1)
    unact = torch.log(x.clamp(min=1e-5) / (1 - x).clamp(min=1e-5))
    num_feats = d // 2
    dim_t = 10000 ** (2 * (torch.arange(num_feats, dtype=torch.float32) // 2) / num_feats)
    pos = (unact.sigmoid() * 2 * math.pi)[:, :, :, None] / dim_t
    pos = torch.stack((pos[:, :, :, 0::2].sin(), pos[:, :, :, 1::2].cos()), dim=4).flatten(2)  # (B, G, 2d)
    out = F.linear(pos, state[f"{t}aux_pos_trans.{head}.weight"], state[f"{t}aux_pos_trans.{head}.bias"])
    return F.layer_norm(out, (d,), state[f"{t}aux_pos_trans_norm.{head}.weight"], state[f"{t}aux_pos_trans_norm.{head}.bias"])


@pytest.mark.parametrize("release", ["co_dino_mmdet2", "co_dino_mmdet3"])
def test_co_dino_positive_queries_convert_exactly(release: str, tiny_config: Path) -> None:
    """Converted aux_pos_trans.{i} / aux_pos_trans_norm.{i} give the released Co-DINO positive queries
    (no content feature, no head embedding, no query position); auxiliary heads listed in the other
    order, so the checkpoint's head 0 (Faster R-CNN) is codetr's head 1."""
    from codetr.models.build import build_model

    state = random_state(tiny_official(release), seed=6)
    cfg = model_config_for(load_config(tiny_config.parent / "tiny_co_dino.yaml", ["model.co.aux_heads=[atss, rcnn]"]).model, state)
    conversion = convert_checkpoint(state, cfg, keep_aux=True)
    assert conversion.ok, conversion.report()
    model = build_model(cfg)
    model.load_state_dict(conversion.state_dict, strict=True)
    torch.manual_seed(0)
    anchors = torch.rand(2, 7, 4) * 0.9 + 0.05
    anchors[0, 0] = torch.tensor([0.0, 1.0, 0.5, 1e-7])  # the clamps of inverse_sigmoid
    for released_head, codetr_head in ((0, 1), (1, 0)):
        query, query_pos = model.positive_queries(codetr_head, anchors, torch.randn(2, 7, 64))
        assert query_pos is None
        torch.testing.assert_close(query, released_dino_positive_queries(state, released_head, anchors), atol=1e-5, rtol=1e-5)
    other, _ = model.positive_queries(0, anchors, torch.zeros(2, 7, 64))
    assert not torch.allclose(other, released_dino_positive_queries(state, 0, anchors), atol=1e-3)  # heads differ


def test_keep_aux_loads_the_whole_training_model(tiny_config: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from codetr.models.build import build_model

    state = random_state(tiny_official(), seed=4)
    ckpt = save_mmdet(state, tmp_path / "official.pth")
    out = tmp_path / "full.safetensors"
    assert main(["convert", "mmdet", str(ckpt), "--config", str(tiny_config), "--out", str(out), "--keep-aux",
                 "--classes", str(tiny_config.parent / "classes.txt")]) == 0
    cfg = load_config(tiny_config).model
    model = build_model(cfg)
    converted = load_file(str(out))
    model.load_state_dict(converted, strict=True)
    torch.testing.assert_close(converted["class_branches.3.bias"], state["query_head.cls_branches.3.bias"])
    loaded = model.state_dict()
    torch.testing.assert_close(loaded["encoder.layers.1.ffn.3.weight"],
                               state["query_head.transformer.encoder.layers.1.ffns.0.layers.1.weight"])
    atss = f"aux_heads.{cfg.co.aux_heads.index('atss')}."
    torch.testing.assert_close(loaded[f"{atss}scales"], torch.stack([state[f"bbox_head.0.scales.{i}.scale"] for i in range(5)]))
    torch.testing.assert_close(loaded[f"{atss}cls_convs.1.bias"], state["bbox_head.0.cls_convs.0.gn.bias"])
    batch = random_batch()
    batch.targets[0] = Target(torch.tensor([[5.0, 6.0, 40.0, 50.0]]), torch.tensor([2]), 0, (64, 80))
    losses = model.loss(batch)
    assert all(torch.isfinite(v) for v in losses.values())


# ---------------------------------------------------------------------------------- errors


def test_truncated_and_corrupted_checkpoints(tiny_config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = save_mmdet(random_state(tiny_official()), tmp_path / "good.pth")
    (tmp_path / "truncated.pth").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    (tmp_path / "garbage.pth").write_bytes(np.random.default_rng(0).bytes(5000))
    for name in ("truncated.pth", "garbage.pth"):
        with pytest.raises(CheckpointError, match=f"cannot read checkpoint .*{name}: it is truncated, corrupted"):
            load_mmdet_checkpoint(tmp_path / name)
        assert main(["convert", "mmdet", str(tmp_path / name), "--config", str(tiny_config), "--out",
                     str(tmp_path / "x.safetensors")]) == 2
        assert "truncated, corrupted or not a PyTorch file" in capsys.readouterr().err
    torch.save([1, 2], tmp_path / "list.pth")
    with pytest.raises(CheckpointError, match="holds a list"):
        load_mmdet_checkpoint(tmp_path / "list.pth")


def test_checkpoints_of_other_architectures_name_what_does_not_fit(tiny_config: Path, tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "x.safetensors"
    classes = ["--classes", str(tiny_config.parent / "classes.txt")]

    def convert(state: dict[str, torch.Tensor], *extra: str) -> str:
        ckpt = save_mmdet(state, tmp_path / "ckpt.pth")
        assert main(["convert", "mmdet", str(ckpt), "--config", str(tiny_config), "--out", str(out), *classes, *extra]) == 2
        assert not out.exists()
        return capsys.readouterr().err

    other = {"backbone.body.conv1.weight": torch.zeros(64, 3, 7, 7), "rpn.head.conv.0.0.weight": torch.zeros(1),
             "roi_heads.box_head.fc6.weight": torch.zeros(1)}  # a torchvision Faster R-CNN
    error = convert(other)
    assert "not a Co-DETR checkpoint" in error and "['backbone', 'roi_heads', 'rpn']" in error
    # ResNet-34 weights for the ResNet-18 config: the extra blocks are listed, grouped
    error = convert(random_state(co_deformable_detr(resnet(34), [128, 256, 512], **TINY_SIZES)))
    assert "source tensors no rule uses" not in error  # all are understood ...
    assert "converted tensors the model does not have" in error and "backbone.layer1.2.conv1.weight" in error
    # a wider feed-forward network: every shape mismatch names the tensor and its source
    error = convert(random_state(tiny_official(ffn_dim=512)))
    assert ("encoder.layers.0.ffn.0.weight: shape (512, 64) from query_head.transformer.encoder.layers.0.ffns.0."
            "layers.0.0.weight, the model has (256, 64)") in error
    # an unknown tensor
    state = random_state(tiny_official())
    state["query_head.transformer.extra_thing.weight"] = torch.zeros(3)
    assert "source tensors no rule uses (1):\n  query_head.transformer.extra_thing.weight" in convert(state)
    # auxiliary heads the config does not list
    state = random_state(tiny_official())
    assert "1 rcnn auxiliary head(s) but the config's model.co.aux_heads is ['atss']" in convert(
        state, "--keep-aux", "model.co.aux_heads=[atss]")
    assert detect_detector(random_state(read_list(MMDET3_REFERENCE), meta=True)) == "co_dino"
    with pytest.raises(CheckpointError, match="the checkpoint is a co_dino but the config builds model.arch=deformable_detr"):
        model_config_for(load_config(tiny_config).model, random_state(read_list(MMDET3_REFERENCE), meta=True))


def test_code_in_a_checkpoint_is_refused_and_numpy_metadata_allowed(tmp_path: Path) -> None:
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):  # noqa: ANN204
            return (Path.touch, (marker,))

    state = {"w": torch.ones(2)}
    torch.save({"state_dict": state, "meta": {"hook": Payload()}}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match=r"could run code: \[.*'pathlib.Path'") as err:
        load_mmdet_checkpoint(tmp_path / "evil.pth")
    assert not marker.exists() and "torch.save(torch.load(PATH)['state_dict']" in str(err.value)
    torch.save({"state_dict": state, "meta": {"hook": Payload()}}, tmp_path / "evil_legacy.pth",
               _use_new_zipfile_serialization=False)  # the pre-1.6 format
    with pytest.raises(CheckpointError, match=r"could run code: \[.*getattr"):
        load_mmdet_checkpoint(tmp_path / "evil_legacy.pth")
    assert not marker.exists()

    meta = {"epoch": 12, "seed": np.int64(7), "hook_msgs": {"best_score": np.float64(0.495)}, "CLASSES": ("a",)}
    torch.save({"state_dict": state, "meta": meta}, tmp_path / "numpy.pth")
    with pytest.raises(pickle.UnpicklingError):  # plain weights_only refuses it
        torch.load(tmp_path / "numpy.pth", weights_only=True)
    loaded = load_mmdet_checkpoint(tmp_path / "numpy.pth")
    assert torch.equal(loaded.state_dict["w"], state["w"]) and loaded.meta["hook_msgs"]["best_score"] == 0.495
    assert loaded.numpy_globals and all(g.startswith("numpy") for g in loaded.numpy_globals)
    torch.save(state, tmp_path / "bare.pth")  # a bare state_dict
    assert load_mmdet_checkpoint(tmp_path / "bare.pth").state_dict.keys() == {"w"}


def test_class_names(tmp_path: Path, tiny_config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    names, ids = coco_classes()
    assert len(names) == len(ids) == 80 and (names[0], ids[0]) == ("person", 1) and (names[-1], ids[-1]) == ("toothbrush", 90)
    assert set(range(1, 91)) - set(ids) == {12, 26, 29, 30, 45, 66, 68, 69, 71, 83}
    (tmp_path / "ann.json").write_text(json.dumps({"categories": [{"id": 7, "name": "b"}, {"id": 3, "name": "a"}]}))
    assert read_classes(tmp_path / "ann.json") == (["a", "b"], [3, 7])
    (tmp_path / "c.txt").write_text("x\n\ny\n")
    assert read_classes(tmp_path / "c.txt") == (["x", "y"], [1, 2])
    ckpt = save_mmdet(random_state(tiny_official()), tmp_path / "ckpt.pth")
    base = ["convert", "mmdet", str(ckpt), "--config", str(tiny_config), "--out", str(tmp_path / "o.safetensors")]
    assert main(base) == 2
    assert "has 6 classes (its metadata names ['a', 'b']...): pass --classes FILE" in capsys.readouterr().err
    assert main([*base, "--classes", str(tmp_path / "c.txt")]) == 2
    assert "names 2 classes but the checkpoint has 6" in capsys.readouterr().err


def test_class_names_from_the_checkpoint_metadata() -> None:
    """mmdet 2.x stores ``meta["CLASSES"]``, mmdet 3.x ``meta["dataset_meta"]["classes"]``; used for a
    checkpoint of another class count than COCO's when they name every class."""
    from codetr.convert.mmdet import metadata_classes

    assert metadata_classes({"CLASSES": ("a", "b")}) == ["a", "b"]
    assert metadata_classes({"dataset_meta": {"classes": ("c",), "palette": [(0, 0, 0)]}}) == ["c"]
    assert metadata_classes({"epoch": 12}) == [] and metadata_classes({"dataset_meta": "x"}) == []
