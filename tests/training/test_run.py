"""Engine: optimizer groups, atomic checkpoints, exact resume, metrics, COCO evaluation, prediction."""

from __future__ import annotations

import json
import math
import os
import sys
import types
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from safetensors import safe_open
from torch import Tensor, nn

from codetr.config import Config, DataConfig, ModelConfig, TrainConfig
from codetr.config_parsing import load_config
from codetr.data import build_dataloader
from codetr.data.samplers import TrainBatchSampler, train_loader
from codetr.errors import FileWriteError, TrainingDiverged, UserError
from codetr.cli import main
from codetr.files import atomic_save, run_lock
from codetr.inference.evaluate import coco_results, evaluate
from codetr.inference.loading import LoadedModel, load_model
from codetr.inference.predict import predict_images
from codetr.inference.visualize import PALETTE
from codetr.inference.weights import read_checkpoint
from codetr.models.assigners import HungarianMatcher
from codetr.structures import Batch, Detections, Target
from codetr.training import hooks as hooks_module
from codetr.training.loop import Trainer
from codetr.training.optim import param_groups
from codetr.training.run import train
from full_disk import FullDisk

CATEGORY_IDS = [3, 17, 90]  # sparse dataset ids: labels 0, 1, 2
NAMES = ["cat_a", "cat_b", "cat_c"]


# ------------------------------------------------------------------------------- fixtures


pytestmark = pytest.mark.usefixtures("one_thread")


def write_coco(root: Path, split: str, images: list[tuple[int, int, list[tuple[float, float, float, float, int]]]]) -> None:
    """Write PNGs and ``annotations/instances_{split}.json``; each image is (width, height,
    [(x, y, w, h, category_id), ...]) and shows its boxes as filled rectangles."""
    (root / split).mkdir(parents=True, exist_ok=True)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    records, anns = [], []
    for i, (width, height, boxes) in enumerate(images, start=1):
        img = Image.new("RGB", (width, height), (40, 40, 40))
        draw = ImageDraw.Draw(img)
        for x, y, w, h, cat in boxes:
            draw.rectangle((x, y, x + w - 1, y + h - 1), fill=(80 * CATEGORY_IDS.index(cat) + 60, 200, 90))
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": cat, "bbox": [x, y, w, h],
                         "area": w * h, "iscrowd": 0})
        img.save(root / split / f"{i:04d}.png")
        records.append({"id": i, "file_name": f"{i:04d}.png", "width": width, "height": height})
    cats = [{"id": c, "name": n} for c, n in zip(CATEGORY_IDS, NAMES)]
    (root / "annotations" / f"instances_{split}.json").write_text(
        json.dumps({"images": records, "annotations": anns, "categories": cats}))


def data_config(root: Path, **kw: object) -> DataConfig:
    base = dict(train_images=str(root / "train"), train_annotations=str(root / "annotations/instances_train.json"),
                val_images=str(root / "val"), val_annotations=str(root / "annotations/instances_val.json"),
                train_scales=[32, 40], max_size=64, crop_resize_scales=[32], crop_size=[16, 32], test_scale=32,
                batch_size=2, num_workers=0)
    base.update(kw)
    return DataConfig(**base)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tiny_coco")
    train_images = [(48, 40, [(4, 6, 20, 16, 3), (26, 20, 18, 14, 90)]), (40, 48, [(10, 10, 16, 24, 17)]),
                    (56, 40, [(2, 2, 30, 30, 90), (36, 8, 12, 20, 3)]), (40, 40, [])]
    val_images = [(48, 40, [(6, 4, 24, 20, 17)]), (40, 40, [(12, 12, 20, 16, 3)])]
    write_coco(root, "train", train_images)
    write_coco(root, "val", val_images)
    return root


class FakeDetector(nn.Module):
    """A tiny detector with the codetr interface: pooled conv features -> a few boxes.

    Its loss draws random numbers (dropout and box jitter) so that RNG handling matters; the
    ``aux`` part is training-only and left out of ``inference_state_dict``.
    """

    def __init__(self, cfg: ModelConfig, num_queries: int = 3) -> None:
        super().__init__()
        self.num_classes, self.num_queries = cfg.num_classes, num_queries
        self.backbone = nn.Conv2d(3, 8, 3, stride=4, padding=1)
        self.frozen = nn.Parameter(torch.zeros(2), requires_grad=False)
        self.dropout = nn.Dropout(0.2)
        self.head = nn.Linear(8, num_queries * (4 + cfg.num_classes))
        self.aux = nn.Linear(8, 1)

    def _forward(self, batch: Batch) -> tuple[Tensor, Tensor, Tensor]:
        feats = torch.relu(self.backbone(batch.images)).mean((2, 3))
        out = self.head(self.dropout(feats)).view(len(feats), self.num_queries, 4 + self.num_classes)
        return feats, out[..., :4].sigmoid(), out[..., 4:]

    def loss(self, batch: Batch) -> dict[str, Tensor]:
        feats, boxes, logits = self._forward(batch)
        l1, cls = [], []
        for b, t in enumerate(batch.targets):
            h, w = batch.image_sizes[b].tolist()
            if len(t.boxes):
                goal = t.boxes[0] / t.boxes.new_tensor([w, h, w, h])
                onehot = nn.functional.one_hot(t.labels[0], self.num_classes).float()
            else:
                goal, onehot = boxes.new_full((4,), 0.5), boxes.new_zeros(self.num_classes)
            l1.append((boxes[b, 0] - goal - 0.01 * torch.randn(4)).abs().mean())
            cls.append(nn.functional.binary_cross_entropy_with_logits(logits[b, 0], onehot))
        return {"loss_bbox": torch.stack(l1).mean(), "loss_cls": torch.stack(cls).mean(),
                "d0.loss_bbox": 0.5 * torch.stack(l1).mean(), "aux.loss": self.aux(feats).pow(2).mean()}

    @torch.no_grad()
    def predict(self, batch: Batch) -> list[Detections]:
        _, boxes, logits = self._forward(batch)
        scores, labels = logits.sigmoid().max(-1)
        out = []
        for b in range(len(boxes)):
            h, w = batch.image_sizes[b].tolist()
            cx, cy, bw, bh = boxes[b].unbind(-1)
            xyxy = torch.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], -1) * torch.tensor([w, h, w, h])
            out.append(Detections(xyxy, scores[b], labels[b]))
        return out

    def inference_state_dict(self) -> dict[str, Tensor]:
        return {k: v for k, v in self.state_dict().items() if not k.startswith("aux.")}


def tiny_config(root: Path, **train: object) -> Config:
    train_cfg = dict(epochs=3, lr=1e-2, lr_steps=[2], max_iters=None, eval_every=1, seed=7, device="cpu",
                     log_every=1, grad_clip=1.0, lr_mult={"backbone": 0.1})
    train_cfg.update(train)
    return Config(model=ModelConfig(num_classes=3), data=data_config(root), train=TrainConfig(**train_cfg))  # type: ignore[arg-type]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def safetensors_of(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


# ------------------------------------------------------------------------ optimizer groups


def test_param_groups_use_first_matching_multiplier_and_skip_frozen() -> None:
    model = nn.Module()
    model.backbone = nn.Module()
    model.backbone.sampling_offsets = nn.Linear(2, 2)  # "backbone" is listed first: it wins
    model.encoder = nn.Module()
    model.encoder.sampling_offsets = nn.Linear(2, 2)
    model.head = nn.Linear(2, 2)
    model.frozen = nn.Linear(2, 2).requires_grad_(False)
    cfg = TrainConfig(lr=1e-3, lr_mult={"backbone": 0.1, "sampling_offsets": 0.5, "unused": 3.0})
    groups = {g["name"]: g for g in param_groups(model, cfg)}
    assert set(groups) == {"backbone", "sampling_offsets", "default"}
    assert groups["backbone"]["lr"] == pytest.approx(1e-4)
    assert groups["sampling_offsets"]["lr"] == pytest.approx(5e-4)
    assert groups["default"]["lr"] == pytest.approx(1e-3)
    ids = lambda g: {id(p) for p in g["params"]}  # noqa: E731
    assert ids(groups["backbone"]) == {id(p) for p in model.backbone.parameters()}
    assert ids(groups["sampling_offsets"]) == {id(p) for p in model.encoder.parameters()}
    assert ids(groups["default"]) == {id(p) for p in model.head.parameters()}


# ----------------------------------------------------------------------------- checkpoints


def test_failed_checkpoint_write_keeps_previous(full_disk: FullDisk) -> None:
    path = full_disk.folder / "last.pt"
    atomic_save({"iteration": 1, "w": torch.ones(3)}, path)
    full_disk.fill(leave=1000)  # the disk fills up during the write
    with pytest.raises(FileWriteError, match=f"^cannot write {path}: no space left on device \\(the previous "
                                             "last.pt is unchanged\\)$"):
        atomic_save({"iteration": 2, "w": torch.zeros(100_000)}, path)
    kept = torch.load(path, weights_only=True)
    assert kept["iteration"] == 1 and torch.equal(kept["w"], torch.ones(3))
    assert [p.name for p in full_disk.folder.iterdir() if not p.name.startswith("filler")] == ["last.pt"]  # no temporary


# ----------------------------------------------------------------------------- training


@pytest.mark.slow
def test_train_outputs_metrics_plot_and_weights(tiny_data: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    final = train(tiny_config(tiny_data), out, build_model=FakeDetector)
    # the config's backbone is random with frozen batch norm (the defaults): the user is told
    assert "model.backbone.norm=group_norm" in capsys.readouterr().out
    records = read_jsonl(out / "metrics.jsonl")
    steps = [r for r in records if r["type"] == "train"]
    evals = [r for r in records if r["type"] == "eval"]
    assert [r["iter"] for r in steps] == [1, 2, 3, 4, 5, 6]  # 4 images, batch 2, 3 epochs, log_every 1
    assert [r["epoch"] for r in steps] == [1, 1, 2, 2, 3, 3]
    for r in steps:
        assert set(r) == {"type", "iter", "epoch", "lr", "loss", "losses", "time"}
        assert set(r["losses"]) == {"loss_bbox", "loss_cls", "d0.loss_bbox", "aux.loss"}
        assert r["loss"] == pytest.approx(sum(r["losses"].values()), rel=1e-5)
        assert r["time"] > 0
    assert [r["lr"] for r in steps] == pytest.approx([1e-2] * 4 + [1e-3] * 2)  # lr_steps=[2]
    assert [r["iter"] for r in evals] == [2, 4, 6]
    assert set(evals[-1]) >= {"AP", "AP50", "AP75", "APs", "APm", "APl"}
    assert final == {k: evals[-1][k] for k in ("AP", "AP50", "AP75", "APs", "APm", "APl")}

    tensors, meta = safetensors_of(out / "model.safetensors")
    assert "aux.weight" not in tensors and "head.weight" in tensors
    assert json.loads(meta["class_names"]) == NAMES and json.loads(meta["category_ids"]) == CATEGORY_IDS
    assert load_config(out / "config.yaml") == tiny_config(tiny_data)
    assert (out / "training.png").stat().st_size > 1000
    umask = os.umask(0)
    os.umask(umask)
    for name in ("last.pt", "model.safetensors", "metrics.jsonl"):  # usual permissions, not mkstemp's 0600
        assert (out / name).stat().st_mode & 0o777 == 0o666 & ~umask
    ckpt = read_checkpoint(out / "last.pt")  # weights_only=True
    assert (ckpt["epoch"], ckpt["iteration"], ckpt["iter_in_epoch"]) == (3, 6, 0)
    assert ckpt["category_ids"] == CATEGORY_IDS

    with pytest.raises(UserError, match="last.pt exists: pass --resume"):
        train(tiny_config(tiny_data), out, build_model=FakeDetector)

    # resuming with other model settings (here a Co-DETR loss weight) is refused, naming them
    changed = tiny_config(tiny_data)
    changed.model.co.lambda1 = 0.5
    with pytest.raises(UserError, match=r"model\.co\.lambda1: 1\.0 -> 0\.5\)"):
        train(changed, out, resume=True, build_model=FakeDetector)

    # a checkpoint of an older codetr, without the settings added since, resumes: they take their
    # defaults (a setting present with another value is refused, as above)
    del ckpt["config"]["model"]["transformer"]["enc_with_cp"]
    atomic_save(ckpt, out / "last.pt")
    changed.model.transformer.enc_with_cp = 1
    changed.model.co.lambda1 = 1.0
    with pytest.raises(UserError, match=r"model\.transformer\.enc_with_cp: 0 -> 1\)"):
        train(changed, out, resume=True, build_model=FakeDetector)

    # resuming a finished run trains and evaluates nothing more and returns the recorded metrics
    assert train(tiny_config(tiny_data), out, resume=True, build_model=FakeDetector) == final
    assert read_jsonl(out / "metrics.jsonl") == records


class DivergingDetector(FakeDetector):
    """FakeDetector whose third loss call diverges: ``mode`` "loss" gives a NaN term, "grad" a finite
    loss with NaN gradients, "matcher" the error of a matcher given NaN predictions; "loss from the
    third call": a NaN term in every call from the third on."""

    mode = "loss"

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        self.calls = 0

    def loss(self, batch: Batch) -> dict[str, Tensor]:
        losses = super().loss(batch)
        self.calls += 1
        if (self.calls == 3 and self.mode == "loss") or (self.calls >= 3 and self.mode == "loss from the third call"):
            losses["loss_cls"] = losses["loss_cls"] * float("nan")
        if self.calls == 3 and self.mode == "grad":
            losses["aux.loss"] = losses["aux.loss"] + (0 * self.head.weight.sum()).sqrt()  # 0, gradient NaN
        if self.calls == 3 and self.mode == "matcher":
            matcher = HungarianMatcher(2.0, 5.0, 2.0)
            matcher(torch.full((1, 3, 3), float("nan")), torch.rand(1, 3, 4), [torch.tensor([0])], [torch.rand(1, 4)])
        return losses


@pytest.mark.parametrize("mode, what", [
    ("loss", "non-finite loss terms loss_cls=nan"),
    ("grad", "non-finite gradients (norm nan) of finite loss terms"),
    ("matcher", "the matching costs are not finite: the predicted logits or boxes are NaN or infinite"),
])
def test_divergence_stops_with_one_line_and_keeps_the_last_good_checkpoint(
        mode: str, what: str, tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(DivergingDetector, "mode", mode)
    out = tmp_path / "run"
    with pytest.raises(TrainingDiverged) as caught:
        train(tiny_config(tiny_data, checkpoint_every=1, eval_every=0), out, build_model=DivergingDetector)
    assert str(caught.value) == (f"training diverged at iteration 3: {what}; lower train.lr or train.grad_clip (now 1)")
    last = torch.load(out / "last.pt", weights_only=False)
    assert last["iteration"] == 2  # the epoch-end checkpoint before the bad step, with its finite weights
    assert all(torch.isfinite(v).all() for v in last["model"].values())


def test_skip_nonfinite_skips_that_many_bad_steps_then_stops(tiny_data: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    """train.skip_nonfinite=2 with a loss that is NaN from the third step on: steps 3 and 4 are skipped
    (logged, the weights unchanged: epoch 2 ends with epoch 1's weights), step 5 stops the run."""
    monkeypatch.setattr(DivergingDetector, "mode", "loss from the third call")
    saved: dict[int, dict[str, Tensor]] = {}
    real_save = hooks_module.CheckpointHook.save

    def save(self: hooks_module.CheckpointHook, trainer: Trainer) -> None:
        real_save(self, trainer)
        saved[trainer.iteration] = {k: v.clone() for k, v in trainer.detector.state_dict().items()}

    monkeypatch.setattr(hooks_module.CheckpointHook, "save", save)
    with pytest.raises(TrainingDiverged) as caught:
        train(tiny_config(tiny_data, eval_every=0, skip_nonfinite=2), tmp_path / "run", build_model=DivergingDetector)
    assert str(caught.value) == ("training diverged at iteration 5 (after skipping 2, train.skip_nonfinite): non-finite "
                                 "loss terms loss_cls=nan; lower train.lr or train.grad_clip (now 1)")
    printed = capsys.readouterr().out
    assert ("skipped iteration 3: non-finite loss terms loss_cls=nan (1 of train.skip_nonfinite=2 skipped)" in printed
            and "skipped iteration 4: non-finite loss terms loss_cls=nan (2 of train.skip_nonfinite=2 skipped)" in printed)
    assert sorted(saved) == [2, 4]
    assert all(torch.equal(saved[2][k], saved[4][k]) for k in saved[2])  # the skipped steps changed nothing
    last = read_checkpoint(tmp_path / "run" / "last.pt")
    assert (last["iteration"], last["skipped"]) == (4, 2)
    records = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [r["iter"] for r in records] == [1, 2] and all(math.isfinite(r["loss"]) for r in records)


def test_no_backbone_warning_for_a_group_norm_backbone(tiny_data: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tiny_config(tiny_data, epochs=1)
    cfg.model.backbone.norm = "group_norm"
    train(cfg, tmp_path / "run", build_model=FakeDetector)
    assert "model.backbone.norm" not in capsys.readouterr().out


@pytest.mark.slow
def test_resume_gives_the_same_weights_as_an_uninterrupted_run(
    tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = tiny_config(tiny_data)
    train(cfg, tmp_path / "straight", build_model=FakeDetector)
    reference, _ = safetensors_of(tmp_path / "straight" / "model.safetensors")

    # Stopped mid-epoch by max_iters, then resumed without the limit.
    train(tiny_config(tiny_data, max_iters=3), tmp_path / "stopped", build_model=FakeDetector)
    assert read_checkpoint(tmp_path / "stopped" / "last.pt")["iter_in_epoch"] == 1
    train(cfg, tmp_path / "stopped", resume=True, build_model=FakeDetector)
    resumed, _ = safetensors_of(tmp_path / "stopped" / "model.safetensors")

    # Killed during iteration 6 (after the epoch-2 checkpoint at iteration 4 and the log of 5).
    real_step = Trainer.step

    def dying_step(self: Trainer, batches: list[Batch]) -> None:
        if self.iteration == 5:
            raise KeyboardInterrupt
        real_step(self, batches)

    monkeypatch.setattr(Trainer, "step", dying_step)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "killed", build_model=FakeDetector)
    monkeypatch.undo()
    train(cfg, tmp_path / "killed", resume=True, build_model=FakeDetector)
    after_kill, _ = safetensors_of(tmp_path / "killed" / "model.safetensors")

    # Killed while evaluating after epoch 2 (its checkpoint is written, its eval is not):
    # the resumed run evaluates epoch 2 first.
    real_evaluate = hooks_module.evaluate
    calls = []

    def dying_evaluate(*args: object) -> dict[str, float]:
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_evaluate(*args)

    monkeypatch.setattr(hooks_module, "evaluate", dying_evaluate)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "killed_eval", build_model=FakeDetector)
    monkeypatch.undo()
    train(cfg, tmp_path / "killed_eval", resume=True, build_model=FakeDetector)
    after_eval_kill, _ = safetensors_of(tmp_path / "killed_eval" / "model.safetensors")

    assert not torch.equal(reference["head.weight"], FakeDetector(cfg.model).head.weight.detach())
    for name, tensor in reference.items():
        assert torch.equal(tensor, resumed[name]), name
        assert torch.equal(tensor, after_kill[name]), name
        assert torch.equal(tensor, after_eval_kill[name]), name
    straight = read_jsonl(tmp_path / "straight" / "metrics.jsonl")
    for run in ("killed", "killed_eval"):
        records = read_jsonl(tmp_path / run / "metrics.jsonl")
        assert [(r["type"], r["iter"]) for r in records] == [(r["type"], r["iter"]) for r in straight]
        assert [r["loss"] for r in records if r["type"] == "train"] == pytest.approx(
            [r["loss"] for r in straight if r["type"] == "train"], rel=1e-6)


@pytest.mark.slow
def test_resume_is_exact_with_the_real_co_detr(tmp_path: Path) -> None:
    """The tiny Co-Deformable-DETR (random sampling in its RPN/RoI heads, augmentation):
    stopped after 3 iterations and resumed, it ends with the weights of an uninterrupted run."""
    synth = tmp_path / "synth"
    overrides = [f"data.train_images={synth}/train", f"data.train_annotations={synth}/annotations/instances_train.json",
                 f"data.val_images={synth}/val", f"data.val_annotations={synth}/annotations/instances_val.json",
                 "data.synthetic_train=4", "data.synthetic_val=1", "data.synthetic_size=64", "data.train_scales=[56,64]",
                 "data.max_size=80", "data.crop_resize_scales=[64]", "data.crop_size=[40,64]", "data.test_scale=64",
                 "data.batch_size=2", "train.epochs=2", "train.device=cpu", "train.eval_every=0"]
    cfg = load_config("co_deformable_detr_tiny", overrides)
    train(cfg, tmp_path / "straight")
    train(load_config("co_deformable_detr_tiny", [*overrides, "train.max_iters=3"]), tmp_path / "resumed")
    train(cfg, tmp_path / "resumed", resume=True)
    straight, _ = safetensors_of(tmp_path / "straight" / "model.safetensors")
    resumed, _ = safetensors_of(tmp_path / "resumed" / "model.safetensors")
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_training_batches_do_not_depend_on_workers(tiny_data: Path) -> None:
    """Sample order and augmentation are a pure function of (seed, epoch, position)."""
    def batches(workers: int) -> list[Tensor]:
        sampler = TrainBatchSampler(4, 2, seed=3)
        dataset = build_dataloader(data_config(tiny_data), "train").dataset
        loader = train_loader(dataset, sampler, num_workers=workers, seed=3)
        out = []
        for epoch in (0, 1):
            sampler.set_epoch(epoch)
            out += [batch.images for batches in loader for batch in batches]
        sampler.set_epoch(1, start_batch=1)
        return out + [batch.images for batches in loader for batch in batches]

    torch.manual_seed(0)
    state = torch.get_rng_state()
    serial = batches(0)
    assert torch.equal(torch.get_rng_state(), state)  # loading does not touch the caller's RNG
    assert all(torch.equal(a, b) for a, b in zip(serial, batches(1)))
    assert torch.equal(serial[-1], serial[3])  # epoch 1 resumed at batch 1 == epoch 1's batch 1
    assert not torch.equal(serial[0], serial[2]) or not torch.equal(serial[1], serial[3])


def test_grouped_batches_are_of_one_orientation_deterministic_resumable_and_split_across_ranks() -> None:
    """mmdet's DistributedGroupSampler rule: every batch of one group; each group padded with its
    own images to whole steps of all processes; processes split the epoch's batches."""
    groups = [1, 0, 1, 1, 0, 1, 1, 0, 1, 1, 1]  # 3 portrait-or-square, 8 landscape images
    for batch_size, world in ((2, 1), (3, 1), (2, 3)):
        def epoch(e: int, rank: int = 0, start: int = 0) -> list[list[tuple[int, int]]]:
            sampler = TrainBatchSampler(11, batch_size, seed=5, rank=rank, world_size=world,
                                                       groups=groups)
            sampler.set_epoch(e, start_batch=start)
            return list(sampler)

        step = batch_size * world
        expected_batches = math.ceil(3 / step) + math.ceil(8 / step)
        ranks = [epoch(1, rank) for rank in range(world)]
        for batches in ranks:
            assert len(batches) == expected_batches
            assert all(len(b) == batch_size and len({groups[i] for i, _ in b}) == 1 for b in batches)
        everything = [i for batches in ranks for b in batches for i, _ in b]
        assert len(everything) == expected_batches * step
        for group, size in ((0, 3), (1, 8)):  # each group's images, each once, then repeats to fill
            members = [i for i in everything if groups[i] == group]
            assert len(members) == math.ceil(size / step) * step
            counts = np.bincount(members, minlength=11)[[i for i in range(11) if groups[i] == group]]
            assert counts.min() >= 1 and counts.max() - counts.min() <= 1
        assert epoch(1) == ranks[0]  # a pure function of (seed, epoch)
        assert epoch(2) != ranks[0]
        assert epoch(1, start=2) == ranks[0][2:]  # resume at batch 2
    # without groups, orientations mix within batches
    assert any(len({groups[i] for i, _ in b}) > 1 for b in TrainBatchSampler(11, 2, seed=5))


@pytest.mark.slow
def test_aspect_ratio_groups_and_grouped_training(tiny_data: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    dataset = build_dataloader(data_config(tiny_data), "train").dataset
    assert dataset.aspect_ratio_groups() == [1, 0, 1, 0]  # 48x40, 40x48, 56x40, 40x40 (w x h)
    seen: list[list[int]] = []
    real_step = Trainer.step

    def recording_step(self: Trainer, batches: list[Batch]) -> None:
        seen.append([t.image_id for batch in batches for t in batch.targets])
        real_step(self, batches)

    monkeypatch.setattr(Trainer, "step", recording_step)
    train(tiny_config(tiny_data, epochs=2, eval_every=0), tmp_path / "grouped", build_model=FakeDetector)
    assert sorted(sorted(b) for b in seen) == [[1, 3], [1, 3], [2, 4], [2, 4]]  # image ids: landscape 1, 3
    seen.clear()
    cfg = tiny_config(tiny_data, epochs=3, eval_every=0)
    cfg.data.group_by_aspect_ratio = False
    train(cfg, tmp_path / "mixed", build_model=FakeDetector)
    assert any(sorted(b) not in ([1, 3], [2, 4]) for b in seen)


# ------------------------------------------------------------------------------ evaluation


class OracleDetector(nn.Module):
    """Answers with detections computed from each image's target (input-image coordinates)."""

    def __init__(self, answer: Callable[[Target], Detections]) -> None:
        super().__init__()
        self.answer = answer
        self.dummy = nn.Parameter(torch.zeros(1))

    def predict(self, batch: Batch) -> list[Detections]:
        return [self.answer(t) for t in batch.targets]


@pytest.fixture(scope="module")
def eval_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """200x160 images (resized to 100x80 for the model) with small, medium and large boxes."""
    root = tmp_path_factory.mktemp("eval_coco")
    images = [
        (200, 160, [(10, 10, 20, 20, 3), (40, 30, 50, 40, 17), (60, 50, 120, 100, 90)]),  # 400, 2000, 12000 px²
        (200, 160, [(100, 20, 40, 40, 17), (20, 90, 40, 40, 17)]),
        (200, 160, []),
        (200, 160, [(100, 20, 40, 40, 17)]),
    ]
    write_coco(root, "val", images)
    write_coco(root, "train", images)
    return root


def run_eval(root: Path, answer: Callable[[Target], Detections], image_ids: list[int] | None = None
             ) -> dict[str, float]:
    loader = build_dataloader(data_config(root, test_scale=80, max_size=1000, batch_size=1), "val", shuffle=False)
    batches = [b for b in loader if image_ids is None or b.targets[0].image_id in image_ids]
    return evaluate(OracleDetector(answer), loader.dataset, batches)


def ground_truth(t: Target) -> Detections:
    return Detections(t.boxes.clone(), torch.ones(len(t.boxes)), t.labels.clone())


def test_ground_truth_as_detections_scores_100(eval_data: Path, capsys: pytest.CaptureFixture[str]) -> None:
    metrics = run_eval(eval_data, ground_truth)
    assert metrics == {"AP": 100.0, "AP50": 100.0, "AP75": 100.0, "APs": 100.0, "APm": 100.0, "APl": 100.0}
    table = capsys.readouterr().out
    assert table.count("Average Precision") == 6 and table.count("Average Recall") == 6


def test_shifted_box_ap_matches_hand_computation(eval_data: Path) -> None:
    # Image 4, one medium box (100, 20, 40, 40), detected 8 px to the right in the stored image
    # (4 px in the half-size model input): IoU = 32*40 / (2*1600 - 32*40) = 0.667, a match at
    # the IoU thresholds 0.50, 0.55, 0.60, 0.65 and a miss at 0.70..0.95: AP = 4/10.
    def shifted(t: Target) -> Detections:
        return Detections(t.boxes + torch.tensor([4.0, 0.0, 4.0, 0.0]), torch.ones(1), t.labels)

    metrics = run_eval(eval_data, shifted, image_ids=[4])
    assert metrics == {"AP": 40.0, "AP50": 100.0, "AP75": 0.0, "APs": -1.0, "APm": 40.0, "APl": -1.0}


def test_false_positive_ranked_first_gives_two_thirds(eval_data: Path) -> None:
    # Image 2 (two GT boxes of category 17): a false positive scored 0.9, then both boxes.
    # Precision after each detection: 0, 1/2, 2/3 at recall 0, 1/2, 1; the interpolated
    # precision is 2/3 at every recall point, at every IoU threshold: AP = 66.667.
    def answer(t: Target) -> Detections:
        boxes = torch.cat([torch.tensor([[0.0, 0.0, 3.0, 3.0]]), t.boxes])
        return Detections(boxes, torch.tensor([0.9, 0.8, 0.7]), torch.cat([t.labels[:1], t.labels]))

    metrics = run_eval(eval_data, answer, image_ids=[2])
    assert metrics["AP"] == pytest.approx(66.667, abs=1e-3)
    assert metrics["AP50"] == pytest.approx(66.667, abs=1e-3)


def test_sparse_category_ids_are_mapped(eval_data: Path) -> None:
    target = Target(torch.tensor([[0.0, 0.0, 10.0, 20.0]] * 3), torch.tensor([0, 1, 2]), image_id=7, orig_size=(40, 60))
    batch = Batch(torch.zeros(1, 3, 20, 30), torch.zeros(1, 20, 30, dtype=torch.bool), torch.tensor([[20, 30]]),
                  [target])
    records = coco_results([Detections(target.boxes, torch.tensor([0.5, 0.6, 0.7]), target.labels)], batch,
                           CATEGORY_IDS)
    assert [r["category_id"] for r in records] == [3, 17, 90]
    assert records[0]["bbox"] == [0.0, 0.0, 20.0, 40.0]  # xywh, scaled by 2 to the stored image
    assert all(r["image_id"] == 7 for r in records)

    def wrong_label(t: Target) -> Detections:  # every box labelled one class off
        return Detections(t.boxes.clone(), torch.ones(len(t.boxes)), (t.labels + 1) % 3)

    assert run_eval(eval_data, wrong_label)["AP"] == 0.0


def test_no_detections_gives_zero_ap(eval_data: Path) -> None:
    def nothing(t: Target) -> Detections:
        return Detections(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.int64))

    assert run_eval(eval_data, nothing) == {"AP": 0.0, "AP50": 0.0, "AP75": 0.0, "APs": 0.0, "APm": 0.0, "APl": 0.0}


def test_an_images_detections_do_not_depend_on_the_rest_of_the_evaluation_set(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A random tiny Deformable-DETR evaluated (through ``evaluate`` and the "val" loader, as
    ``codetr eval`` and training do) on one small image alone, then with larger images after it:
    that image's COCO records are identical, whatever ``data.batch_size`` (training) is."""
    from codetr.models.build import build_model

    small = (40, 32, [(4, 4, 20, 16, 3)])
    others = [(64, 40, [(10, 10, 30, 20, 17)]), (36, 64, [(6, 20, 20, 30, 90)])]
    write_coco(tmp_path / "alone", "val", [small])
    write_coco(tmp_path / "mixed", "val", [small, *others])
    cfg = load_config("deformable_detr_tiny", ["model.num_classes=3", "data.synthetic=false"])
    torch.manual_seed(0)
    model = build_model(cfg.model).eval()
    captured: list[list[dict]] = []
    monkeypatch.setattr("codetr.inference.evaluate.coco_metrics", lambda gt, results, ids: captured.append(results))

    def records_of_image_1(root: Path) -> list[dict]:
        data = data_config(root, test_scale=64, max_size=96, batch_size=3)
        loader = build_dataloader(data, "val", shuffle=False)
        evaluate(model, loader.dataset, loader)
        return [r for r in captured[-1] if r["image_id"] == 1]

    alone = records_of_image_1(tmp_path / "alone")
    assert len(alone) == 100  # model.max_detections
    assert records_of_image_1(tmp_path / "mixed") == alone


def test_lsj_evaluation_maps_boxes_back_to_the_stored_image(eval_data: Path) -> None:
    """With LSJ the model sees 64 x 64 canvases (200 x 160 images resized to 64 x 51, padded with
    114, no padding mask); ground truth answered in canvas coordinates comes back as the
    annotations (AP 100), although the canvas is not the resized image."""
    data = data_config(eval_data, augment="lsj", lsj_size=64, batch_size=3)
    loader = build_dataloader(data, "val", shuffle=False)
    batches = list(loader)
    for batch in batches:
        assert batch.images.shape[-2:] == (64, 64) and not batch.masks.any()
        assert batch.image_sizes.tolist() == [[64, 64]] * len(batch.targets)
        assert [t.content_size for t in batch.targets] == [(51, 64)] * len(batch.targets)
    records = coco_results([ground_truth(t) for t in batches[0].targets], batches[0], CATEGORY_IDS)
    annotations = loader.dataset.coco.loadAnns(loader.dataset.coco.getAnnIds(imgIds=[1]))
    assert [r["bbox"] for r in records] == [pytest.approx(a["bbox"], abs=1e-3) for a in annotations]
    metrics = evaluate(OracleDetector(ground_truth), loader.dataset, batches)
    assert metrics == {"AP": 100.0, "AP50": 100.0, "AP75": 100.0, "APs": 100.0, "APm": 100.0, "APl": 100.0}


class FixedDetector(nn.Module):
    """Detects one box, (8, 4, 40, 24) xyxy in the model input, in every image."""

    def __init__(self) -> None:
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(1))

    def predict(self, batch: Batch) -> list[Detections]:
        box = torch.tensor([[8.0, 4.0, 40.0, 24.0]])
        return [Detections(box, torch.tensor([0.9]), torch.tensor([1])) for _ in batch.targets]


def test_lsj_predictions_are_drawn_in_the_stored_image(tmp_path: Path) -> None:
    # a 200 x 100 image fills 64 x 32 of the 64 x 64 canvas (scale 0.32): the canvas box
    # (8, 4, 40, 24) is (25, 12.5, 125, 75) in the image, xywh (25, 12.5, 100, 62.5)
    path = tmp_path / "wide.png"
    Image.new("RGB", (200, 100), (40, 40, 40)).save(path)
    cfg = Config(model=ModelConfig(num_classes=3), data=DataConfig(augment="lsj", lsj_size=64))
    loaded = LoadedModel(FixedDetector().eval(), cfg, NAMES, CATEGORY_IDS)
    records = predict_images(loaded, [path], tmp_path / "out")
    assert [r["bbox"] for r in records] == [[25.0, 12.5, 100.0, 62.5]]
    drawn = np.asarray(Image.open(tmp_path / "out" / "wide.png"))
    assert tuple(drawn[60, 25]) == PALETTE[1] and tuple(drawn[60, 125]) == PALETTE[1]  # left and right edges
    assert tuple(drawn[60, 60]) == (40, 40, 40)


# ------------------------------------------------------------------------------ prediction


def test_predict_from_weights_and_from_checkpoint(tiny_data: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "run"
    train(tiny_config(tiny_data, epochs=1), out, build_model=FakeDetector)
    monkeypatch.setitem(sys.modules, "codetr.models.build", types.SimpleNamespace(build_model=FakeDetector))
    images = sorted((tiny_data / "val").iterdir())
    for weights in (out / "model.safetensors", out / "last.pt"):
        loaded = load_model(weights)
        assert loaded.class_names == NAMES and loaded.category_ids == CATEGORY_IDS
        records = predict_images(loaded, images, tmp_path / weights.stem, score_thr=0.0)
        assert json.loads((tmp_path / weights.stem / "predictions.json").read_text()) == records
        assert len(records) == 3 * len(images)  # 3 queries per image, no score threshold
        assert {r["file_name"] for r in records} == {p.name for p in images}
        sizes = {p.name: Image.open(p).size for p in images}
        for r in records:
            assert NAMES[CATEGORY_IDS.index(r["category_id"])] == r["category_name"]
            x, y, w, h = r["bbox"]  # xywh within the stored image
            width, height = sizes[r["file_name"]]
            assert 0 <= x <= x + w <= width + 1e-3 and 0 <= y <= y + h <= height + 1e-3
        drawn = Image.open(tmp_path / weights.stem / images[0].name)
        assert drawn.size == Image.open(images[0]).size
        assert not np.array_equal(np.asarray(drawn), np.asarray(Image.open(images[0]).convert("RGB")))
    weights_records = json.loads((tmp_path / "model" / "predictions.json").read_text())
    assert weights_records == json.loads((tmp_path / "last" / "predictions.json").read_text())


# ------------------------------------------------------------------------------ one run per folder


def test_a_second_run_into_a_busy_folder_stops_naming_the_first(tiny_data: Path, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str],
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """While a run holds the folder's lock (here this process, as a running ``codetr train`` does),
    another train, resume or eval there stops with one line naming it, touching nothing (not the
    temporary file the running run is writing)."""
    out = tmp_path / "run"
    train(tiny_config(tiny_data, epochs=1), out, build_model=FakeDetector)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    (out / ".last.pt.abcd1234.tmp").write_bytes(b"being written")
    busy = rf"--out {out} is in use by another codetr run \(pid {os.getpid()} on host "
    with run_lock(out):
        for resume in (True, False):
            with pytest.raises(UserError, match=busy):
                train(tiny_config(tiny_data, epochs=2), out, resume=resume, overwrite=not resume,
                      build_model=FakeDetector)
        monkeypatch.setattr("codetr.models.build.build_model", FakeDetector)
        assert main(["eval", str(out / "config.yaml"), "--weights", str(out / "model.safetensors")]) == 2
        assert f"the folder of --weights {out} is in use by another codetr run (pid {os.getpid()}" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and p.name in before} == before
    assert (out / ".last.pt.abcd1234.tmp").exists()
    train(tiny_config(tiny_data, epochs=2), out, resume=True, build_model=FakeDetector)  # the lock is free again
    assert read_checkpoint(out / "last.pt")["epoch"] == 2


def test_a_run_that_ended_before_any_result_does_not_need_overwrite(tiny_data: Path, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """A run that fails on its first batch leaves config.yaml and an empty metrics.jsonl: nothing to
    resume or keep, so the next run there replaces them; a folder with metrics records stays protected."""
    out = tmp_path / "run"

    def failing(self: FakeDetector, batch: Batch) -> dict[str, Tensor]:
        raise UserError("bad batch")

    with monkeypatch.context() as patch:
        patch.setattr(FakeDetector, "loss", failing)
        with pytest.raises(UserError, match="bad batch"):
            train(tiny_config(tiny_data, epochs=1), out, build_model=FakeDetector)
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["config.yaml", "metrics.jsonl"]
    capsys.readouterr()
    train(tiny_config(tiny_data, epochs=1), out, build_model=FakeDetector)
    assert f"replaced metrics.jsonl, config.yaml in {out}: their run ended before a checkpoint" in capsys.readouterr().out
    (out / "last.pt").unlink()
    (out / "model.safetensors").unlink()
    with pytest.raises(UserError, match="holds the outputs of another run"):  # its metrics records are kept
        train(tiny_config(tiny_data, epochs=1), out, build_model=FakeDetector)
