"""The model contract (codetr/models/base.py) is all a new auxiliary head needs: a head defined in
this file alone trains inside CoDETR with mixed precision (its ``float32_methods``), ``--init``
class re-initialisation (its ``class_layers``) and layer-wise learning-rate decay, through the
real training run, with nothing edited outside ``codetr/models``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from codetr.config import ModelConfig
from codetr.config_parsing import config_to_dict, load_config
from codetr.inference.weights import save_inference_weights
from codetr.models.aux.base import PositiveSet
from codetr.models.base import AuxHead, class_dependent_tensors
from codetr.models.build import ANCHOR_QUERIES, ARCHS
from codetr.models.co_detr import CoDETR
from codetr.models.dino import DINO
from codetr.models.necks.channel_mapper import SingleScaleAdapter
from codetr.models.positive_queries import DinoPositiveQueryEmbedding, PositiveQueryEmbedding
from codetr.structures import Detections, Target
from codetr.training.loop import Hook, Trainer
from codetr.training.run import train
from synthetic_config import synthetic_data

pytestmark = pytest.mark.usefixtures("one_thread")

TINY_VIT = ["model.backbone.timm_args={embed_dim: 32, depth: 4, num_heads: 2, pretrain_img_size: 64}",
            "model.backbone.window_size=2", "model.backbone.global_every=2", "model.backbone.drop_path_rate=0.0",
            "model.backbone.with_cp=false", "model.num_classes=6", "model.max_detections=20",
            "model.transformer={d_model: 32, n_heads: 2, ffn_dim: 64, enc_layers: 1, dec_layers: 1, num_queries: 10, "
            "enc_with_cp: 0}",
            "model.dino.num_dn_queries=6", "model.co={aux_heads: [center], max_pos_queries: 10}"]


class CenterHead(nn.Module):
    """A one-to-many head of its own: each object is assigned to the location of its centre on the
    finest pyramid level, classified there with a sigmoid focal loss; those locations' features and
    the objects' boxes are the positive set."""

    float32_methods = ("forward_train",)
    class_layers = ("cls",)

    def __init__(self, num_classes: int, channels: int, stride: int, loss_scale: float) -> None:
        super().__init__()
        self.num_classes, self.stride, self.loss_scale = num_classes, stride, loss_scale
        self.cls = nn.Conv2d(channels, num_classes, 1)
        self.autocast_in_forward_train: list[bool] = []

    def centres(self, feat: Tensor, boxes: Tensor) -> tuple[Tensor, Tensor]:
        """Row and column of each box's centre (xyxy pixels) on ``feat`` (C, H, W)."""
        cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
        rows = (cy / self.stride).long().clamp(0, feat.shape[-2] - 1)
        return rows, (cx / self.stride).long().clamp(0, feat.shape[-1] - 1)

    def forward_train(self, feats: list[Tensor], image_sizes: Tensor,
                      targets: list[Target]) -> tuple[dict[str, Tensor], list[PositiveSet]]:
        self.autocast_in_forward_train.append(torch.is_autocast_enabled("cpu") or feats[0].dtype != torch.float32)
        logits = self.cls(feats[0])  # (B, num_classes, H, W)
        goal = torch.zeros_like(logits)
        positives = []
        for b, target in enumerate(targets):
            rows, cols = self.centres(feats[0][b], target.boxes)
            goal[b, target.labels, rows, cols] = 1.0
            positives.append(PositiveSet(target.boxes, target.labels, target.boxes, feats[0][b, :, rows, cols].T))
        loss = F.binary_cross_entropy_with_logits(logits, goal, reduction="sum") / max(1, sum(len(t.labels) for t in targets))
        return {"center.loss_cls": loss * self.loss_scale}, positives

    def predict(self, feats: list[Tensor], image_sizes: Tensor) -> list[Detections]:
        """The best class of every location, a stride-sized box around it."""
        scores, labels = self.cls(feats[0]).sigmoid().flatten(2).max(1)  # (B, H * W)
        width = feats[0].shape[-1]
        index = torch.arange(scores.shape[1], device=scores.device)
        cx, cy = (index % width + 0.5) * self.stride, (index // width + 0.5) * self.stride
        half = self.stride / 2
        boxes = torch.stack([cx - half, cy - half, cx + half, cy + half], -1)
        return [Detections(boxes, s, lab) for s, lab in zip(scores, labels)]


def co_dino_with_center_head(cfg: ModelConfig) -> CoDETR:
    """DINO with the CenterHead as its one auxiliary head, composed from the contract's parts."""
    detector = DINO(cfg)
    strides = CoDETR.aux_strides(detector)
    head: AuxHead = CenterHead(cfg.num_classes, cfg.transformer.d_model, strides[0], CoDETR.aux_loss_scale(cfg))
    return CoDETR(detector, cfg, [head], DinoPositiveQueryEmbedding(cfg.transformer.d_model, 1))


class Recorder(Hook):
    """Keeps the trainer's optimizer groups and every step's loss terms."""

    def __init__(self) -> None:
        self.trainer: Trainer | None = None
        self.losses: list[dict[str, float]] = []

    def before_train(self, trainer: Trainer) -> None:
        self.trainer = trainer

    def after_step(self, trainer: Trainer) -> None:
        self.losses.append(dict(trainer.losses))


@pytest.mark.slow
def test_a_new_auxiliary_head_trains_with_amp_init_and_layer_decay(tmp_path: Path, capsys: Any) -> None:
    data = synthetic_data(tmp_path / "synth")
    overrides = [*TINY_VIT, *(f"data.{k}={v}" for k, v in data.items()), "train.max_iters=2", "train.amp=bf16",
                 "train.layer_decay.num_layers=4", "train.warmup_iters=0", "train.log_every=1", "train.device=cpu"]
    cfg = load_config("co_dino_5scale_vit_large_coco", overrides)
    # weights of the same model for another class count, to fine-tune from (train.init)
    torch.manual_seed(1)
    other = load_config("co_dino_5scale_vit_large_coco", [*overrides, "model.num_classes=3"])
    source = co_dino_with_center_head(other.model)
    init = tmp_path / "three_classes.safetensors"
    save_inference_weights(init, source.state_dict(), ["a", "b", "c"], [1, 2, 3], config_to_dict(other))
    cfg.train.init = str(init)

    recorder = Recorder()
    train(cfg, tmp_path / "run", build_model=co_dino_with_center_head, extra_hooks=[recorder])
    assert recorder.trainer is not None
    model = recorder.trainer.detector
    head = model.aux_heads[0]
    out = capsys.readouterr().out

    # --init: the head's class layer and the detector's are re-initialised, everything else is loaded
    reinit = next(line for line in out.splitlines() if line.startswith("re-initialised"))
    assert "aux_heads.0.cls.weight" in reinit and "class_branches.0.bias" in reinit
    assert {"aux_heads.0.cls.weight", "aux_heads.0.cls.bias"} <= class_dependent_tensors(model)
    assert "freshly initialised" not in out
    # AMP: the head's training step ran in float32 with autocast off, inside a bf16 autocast step
    assert "mixed precision bf16" in out and head.autocast_in_forward_train == [False, False]
    # the head's loss and its positive queries' losses were trained, finite
    assert all({"center.loss_cls", "loss_cls_pos_center"} <= set(step) for step in recorder.losses)
    assert all(torch.isfinite(torch.tensor(list(step.values()))).all() for step in recorder.losses)
    # layer decay: the ViT blocks at decayed rates, the new head at the base rate
    group_of = {id(p): g for g in recorder.trainer.optimizer.param_groups for p in g["params"]}
    assert group_of[id(head.cls.weight)]["lr_mult"] == 1.0
    blocks = model.detector.backbone.blocks
    assert [group_of[id(b.attn.q_proj.weight)]["lr_mult"] for b in blocks] == pytest.approx([0.8 ** (4 - i) for i in range(4)])
    assert (tmp_path / "run" / "model.safetensors").is_file()


def co_detr_with_center_head(cfg: ModelConfig) -> CoDETR:
    """The base detector of ``cfg.arch`` with the CenterHead on the finest level of its auxiliary pyramid."""
    detector = ARCHS[cfg.arch](cfg)
    head = CenterHead(cfg.num_classes, cfg.transformer.d_model, CoDETR.aux_strides(detector)[0], CoDETR.aux_loss_scale(cfg))
    embedding = DinoPositiveQueryEmbedding if cfg.arch in ANCHOR_QUERIES else PositiveQueryEmbedding
    return CoDETR(detector, cfg, [head], embedding(cfg.transformer.d_model, 1))


@pytest.mark.slow
@pytest.mark.parametrize("config", ["co_conditional_detr_tiny", "co_dab_detr_tiny"])
def test_single_scale_base_detectors_train_with_a_new_auxiliary_head(config: str, tmp_path: Path) -> None:
    """The contract is all a base detector needs too: Conditional DETR and DAB-DETR, with the CenterHead
    on the single-scale adapter's pyramid and their own positive queries, train with AMP through the
    real training run."""
    data = synthetic_data(tmp_path / "synth")
    overrides = [*(f"data.{k}={v}" for k, v in data.items()), "model.co={aux_heads: [center], max_pos_queries: 10}",
                 "model.transformer={enc_layers: 1, dec_layers: 2, num_queries: 10}", "train.max_iters=2",
                 "train.amp=bf16", "train.log_every=1", "train.device=cpu"]
    recorder = Recorder()
    train(load_config(config, overrides), tmp_path / "run", build_model=co_detr_with_center_head, extra_hooks=[recorder])
    assert recorder.trainer is not None
    model = recorder.trainer.detector
    assert isinstance(model.adapter, SingleScaleAdapter) and model.aux_heads[0].stride == 8
    assert model.aux_heads[0].autocast_in_forward_train == [False, False]
    assert all({"center.loss_cls", "loss_cls_pos_center", "d0.loss_bbox_pos_center"} <= set(step)
               for step in recorder.losses)
    assert all(torch.isfinite(torch.tensor(list(step.values()))).all() for step in recorder.losses)
    assert (tmp_path / "run" / "model.safetensors").is_file()
