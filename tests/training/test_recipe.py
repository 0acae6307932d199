"""Training recipe: EMA of the weights, layer-wise lr decay, warm-up, mixed precision, gradient
accumulation, TensorBoard."""

from __future__ import annotations

import copy
import io
import json
import math
import re
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_run import FakeDetector, safetensors_of, tiny_config, write_coco
from torch import nn

from codetr.config import Config, LayerDecayConfig, ModelConfig, TrainConfig
from codetr.config_parsing import load_config
from codetr.data import collate
from codetr.data.samplers import micro_batches
from codetr.inference.loading import load_model
from codetr.inference.weights import read_checkpoint
from codetr.models.build import build_model
from codetr.models.losses.detr_loss import DetrCriterion
from codetr.models.transformer import deformable_attention
from codetr.models.backbones.vit import ViT
from codetr.structures import Batch, Target
from codetr.training import hooks as hooks_module
from codetr.training.amp import keep_float32
from codetr.training.ema import ExpMomentumEMA
from codetr.training.layer_decay import layer_decay_param_groups
from codetr.training.loop import LossForward, Trainer
from codetr.training.optim import LrSchedule, build_optimizer
from codetr.training.run import train

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def coco(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 training images (one without objects) and 2 validation images, 40-56 px, dataset ids 3, 17, 90."""
    root = tmp_path_factory.mktemp("coco")
    write_coco(root, "train", [(48, 40, [(4, 6, 20, 16, 3), (26, 20, 18, 14, 90)]), (40, 48, [(10, 10, 16, 24, 17)]),
                               (56, 40, [(2, 2, 30, 30, 90), (36, 8, 12, 20, 3)]), (40, 40, [])])
    write_coco(root, "val", [(48, 40, [(6, 4, 24, 20, 17)]), (40, 40, [(12, 12, 20, 16, 3)])])
    return root


@pytest.fixture(autouse=True)
def no_plots(monkeypatch: pytest.MonkeyPatch) -> None:
    """The training plot is not under test here and takes most of a tiny run's time."""
    monkeypatch.setattr(hooks_module, "plot_training", lambda *args: None)


# ---------------------------------------------------------------------------------- EMA


def released_momentum(i: int, momentum: float, total_iter: int) -> float:
    """mmdet ExpMomentumEMAHook's momentum after iteration i (0-based)."""
    return (1 - momentum) * math.exp(-(1 + i) / total_iter) + momentum


def closed_form_ema(start: torch.Tensor, weights: list[torch.Tensor], momenta: list[float]) -> torch.Tensor:
    """sum over the updates of m_i * prod_{j > i} (1 - m_j) * w_i, plus prod (1 - m_j) * start (float64)."""
    total = start.double() * math.prod(1 - m for m in momenta)
    for i, (w, m) in enumerate(zip(weights, momenta)):
        total += w.double() * m * math.prod(1 - n for n in momenta[i + 1:])
    return total


@pytest.mark.parametrize("interval", [1, 2])
def test_ema_follows_the_released_update_rule(interval: int) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    start = {k: v.clone() for k, v in model.state_dict().items()}
    ema = ExpMomentumEMA(model, momentum=0.05, total_iter=3, interval=interval)
    assert "1.num_batches_tracked" not in ema.averages  # integers are not averaged
    history: dict[str, list[torch.Tensor]] = {k: [] for k in ema.averages}
    momenta = []
    for i in range(5):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        model(torch.randn(4, 3))  # moves the batch-norm running statistics (buffers are averaged too)
        ema.update(model, i)
        if (i + 1) % interval == 0:
            momenta.append(released_momentum(i, 0.05, 3))
            for k in history:
                history[k].append(model.state_dict()[k].clone())
    assert len(momenta) == 5 // interval
    for k, average in ema.averages.items():
        torch.testing.assert_close(average.double(), closed_form_ema(start[k], history[k], momenta), rtol=1e-5, atol=1e-6)
        assert not torch.allclose(average, model.state_dict()[k])
    # the released schedule: the average follows the weights at first, then moves by `momentum`
    default = ExpMomentumEMA(model)
    assert default.momentum_at(0) > 0.999 and default.momentum_at(100_000) == pytest.approx(1e-4, rel=1e-6)


def test_ema_applied_swaps_weights_in_and_back_exactly() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    ema = ExpMomentumEMA(model, momentum=0.5, total_iter=1)
    with torch.no_grad():
        model[0].weight.mul_(3.0)
    own = {k: v.clone() for k, v in model.state_dict().items()}
    with ema.applied(model):
        for k, average in ema.averages.items():
            assert torch.equal(model.state_dict()[k], average)
    for k, v in model.state_dict().items():
        assert torch.equal(v, own[k])


def test_training_with_ema_evaluates_and_saves_the_average(coco: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """A 2-step run: the average follows the rule over the weights after each step (iteration
    0 and 1); evaluation sees it; model.safetensors holds it; the checkpoint holds both."""
    cfg = tiny_config(coco, epochs=1, ema=True, ema_momentum=0.1, ema_total_iter=2)
    after_steps: list[dict[str, torch.Tensor]] = []
    real_step = Trainer.step

    def recording_step(self: Trainer, batches: list[Batch]) -> None:
        if not after_steps:
            after_steps.append({k: v.clone() for k, v in self.detector.state_dict().items()})
        real_step(self, batches)
        after_steps.append({k: v.clone() for k, v in self.detector.state_dict().items()})

    evaluated: list[torch.Tensor] = []
    real_evaluate = hooks_module.evaluate

    def recording_evaluate(model: nn.Module, *args: object) -> dict[str, float]:
        evaluated.append(model.head.weight.detach().clone())
        return real_evaluate(model, *args)

    monkeypatch.setattr(Trainer, "step", recording_step)
    monkeypatch.setattr(hooks_module, "evaluate", recording_evaluate)
    train(cfg, tmp_path / "run", build_model=FakeDetector)

    start, *steps = after_steps
    assert len(steps) == 2
    momenta = [released_momentum(i, 0.1, 2) for i in range(2)]
    expected = closed_form_ema(start["head.weight"], [s["head.weight"] for s in steps], momenta).float()
    ckpt = read_checkpoint(tmp_path / "run" / "last.pt")
    average = ckpt["hooks"]["EMAHook"]["averages"]["head.weight"]
    torch.testing.assert_close(average, expected)
    assert torch.equal(ckpt["model"]["head.weight"], steps[-1]["head.weight"])  # the trained weights themselves
    assert not torch.allclose(average, steps[-1]["head.weight"])
    weights, _ = safetensors_of(tmp_path / "run" / "model.safetensors")
    assert torch.equal(weights["head.weight"], average)
    assert len(evaluated) == 1 and torch.equal(evaluated[0], average)


# ----------------------------------------------------------------------- exact resume


RECIPES = {
    "ema": dict(ema=True, ema_momentum=0.3, ema_total_iter=3),
    "fp16": dict(amp="fp16"),
    "accumulate": dict(accumulate=2),  # with data.batch_size 1: iterations of 2 images, as the others
    "all": dict(ema=True, ema_momentum=0.3, ema_total_iter=3, warmup_iters=4, warmup_ratio=0.01, amp="bf16",
                accumulate=2, tensorboard=True),
}


def recipe_config(root: Path, settings: dict, **train_settings: object) -> Config:
    cfg = tiny_config(root, eval_every=0, **settings, **train_settings)
    cfg.data.batch_size = 2 // cfg.train.accumulate
    return cfg


@pytest.mark.slow
@pytest.mark.parametrize("recipe", list(RECIPES))
def test_resume_is_exact_with_the_recipe(recipe: str, coco: Path, tmp_path: Path) -> None:
    """Stopped mid-epoch by max_iters and resumed: the same final weights, averages and losses
    as an uninterrupted run."""
    settings = RECIPES[recipe]
    train(recipe_config(coco, settings), tmp_path / "straight", build_model=FakeDetector)
    train(recipe_config(coco, settings, max_iters=3), tmp_path / "resumed", build_model=FakeDetector)
    train(recipe_config(coco, settings), tmp_path / "resumed", resume=True, build_model=FakeDetector)
    straight = read_checkpoint(tmp_path / "straight" / "last.pt")
    resumed = read_checkpoint(tmp_path / "resumed" / "last.pt")
    assert straight["iteration"] == resumed["iteration"] == 6
    if settings.get("amp") == "fp16":  # the loss scale of the gradient scaler is checkpointed too
        assert straight["grad_scaler"]["scale"] == resumed["grad_scaler"]["scale"] > 0
    for part in ("model", "hooks"):
        flat_a, flat_b = _flatten(straight[part]), _flatten(resumed[part])
        assert flat_a.keys() == flat_b.keys()
        assert all(torch.equal(flat_a[k], flat_b[k]) for k in flat_a), part
    a, _ = safetensors_of(tmp_path / "straight" / "model.safetensors")
    b, _ = safetensors_of(tmp_path / "resumed" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def _flatten(tree: object, prefix: str = "") -> dict[str, torch.Tensor]:
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in _flatten(sub, f"{prefix}{key}.").items()}
    return {prefix: torch.as_tensor(tree)}


# ------------------------------------------------------------------ layer-wise lr decay


def test_layer_decay_ids_and_scales_are_the_released_ones_for_vit_large() -> None:
    """The released ViT-L setting (rate 0.8, 24 layers): lr scale per parameter name, by hand
    from get_layer_id_for_vit and decay_rate ** (num_layers + 2 - layer_id - 1)."""
    names = {"backbone.patch_embed.proj.weight": 0.8 ** 25, "backbone.pos_embed": 0.8 ** 25,
             "backbone.blocks.0.attn.q_proj.weight": 0.8 ** 24, "backbone.blocks.7.norm1.weight": 0.8 ** 17,
             "backbone.blocks.23.mlp.w3.weight": 0.8, "backbone.out_norm.weight": 1.0,
             "neck.convs.0.weight": 1.0, "transformer.encoder.layers.0.attn.value_proj.weight": 1.0}

    class Named(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            for name in names:
                module = self
                for part in name.split(".")[:-1]:
                    if not hasattr(module, part):
                        module.add_module(part, nn.Module())
                    module = getattr(module, part)
                module.register_parameter(name.split(".")[-1], nn.Parameter(torch.zeros(2, 2)))

    model = Named()
    assert sorted(n for n, _ in model.named_parameters()) == sorted(names)
    groups = layer_decay_param_groups(model, lr=1.0, weight_decay=0.05, rate=0.8, num_layers=24)
    group_of = {id(p): g for g in groups for p in g["params"]}
    for name, param in model.named_parameters():
        assert group_of[id(param)]["lr"] == pytest.approx(names[name], rel=1e-12), name


def test_layer_decay_groups_of_a_tiny_vit_detector() -> None:
    """A tiny ViT as a detector's ``backbone`` (also inside a Co-DETR wrapper, ``detector.``
    prefix): each block at the released rate, no weight decay on 1-d parameters and biases."""
    rate, depth = 0.8, 3

    class TinyDetector(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.backbone = ViT(embed_dim=32, depth=depth, num_heads=2, window_size=0, pretrain_img_size=32)
            self.neck = nn.Conv2d(32, 16, 1)
            self.head = nn.Linear(16, 4)
            self.frozen = nn.Linear(2, 2).requires_grad_(False)

    for model, prefix in ((TinyDetector(), ""), (nn.Module(), "detector.")):
        if prefix:
            model.detector = TinyDetector()
        cfg = TrainConfig(lr=1e-3, weight_decay=0.05, layer_decay=LayerDecayConfig(rate=rate, num_layers=depth))
        optimizer = build_optimizer(model, cfg)
        group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
        trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        assert len(group_of) == len(trainable)  # each trainable parameter once, the frozen one left out
        for full_name, param in trainable:
            name = full_name.removeprefix(prefix)
            group = group_of[id(param)]
            if name.startswith("backbone.blocks."):
                block = int(name.split(".")[2])
                expected = rate ** (depth - block)
            elif name.startswith(("backbone.patch_embed.", "backbone.pos_embed")):
                expected = rate ** (depth + 1)
            else:  # the final norm of the backbone, the neck, the head
                expected = 1.0
            assert group["lr"] == pytest.approx(1e-3 * expected, rel=1e-12), name
            no_decay = param.ndim == 1 or name.endswith(".bias")
            assert group["weight_decay"] == (0.0 if no_decay else 0.05), name
        detector = model.detector if prefix else model
        assert group_of[id(detector.backbone.pos_embed)]["weight_decay"] == 0.05  # as released (see layer_decay.py)

    with pytest.raises(ValueError, match="needs a ViT backbone"):
        build_optimizer(nn.Linear(2, 2), TrainConfig(layer_decay=LayerDecayConfig(rate=0.8)))
    with pytest.raises(ValueError, match="num_layers is 2, but the backbone has backbone.blocks.2"):
        build_optimizer(TinyDetector(), TrainConfig(layer_decay=LayerDecayConfig(rate=0.8, num_layers=2)))


# ---------------------------------------------------------------------------- warm-up


def test_linear_warmup_composed_with_the_step_schedule(coco: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """mmcv's linear warm-up: lr_i = lr * (1 - (1 - i / W) * (1 - ratio)) for iteration i < W
    (0-based), times 0.1 from epoch lr_steps on; every group keeps its multiplier."""
    used: list[list[float]] = []
    real_step = Trainer.step

    def recording_step(self: Trainer, batches: list[Batch]) -> None:
        real_step(self, batches)
        used.append([g["lr"] for g in self.optimizer.param_groups])

    monkeypatch.setattr(Trainer, "step", recording_step)
    cfg = tiny_config(coco, eval_every=0, lr=1e-2, lr_steps=[2], warmup_iters=5, warmup_ratio=0.01)
    train(cfg, tmp_path / "run", build_model=FakeDetector)
    # 3 epochs of 2 iterations: warm-up over iterations 0-4, lr x 0.1 in epoch 2 (iterations 4, 5)
    expected = [1e-2 * (1 - (1 - i / 5) * (1 - 0.01)) * (0.1 if i >= 4 else 1.0) if i < 5 else 1e-3 for i in range(6)]
    names = [g["name"] for g in build_optimizer(FakeDetector(cfg.model), cfg.train).param_groups]
    assert names == ["backbone", "default"]
    assert [lrs[1] for lrs in used] == pytest.approx(expected, rel=1e-12)
    assert [lrs[0] for lrs in used] == pytest.approx([0.1 * lr for lr in expected], rel=1e-12)  # backbone x0.1
    assert expected[0] == pytest.approx(1e-4) and expected[1] == pytest.approx(1e-2 * 0.208)


# --------------------------------------------------------------------- mixed precision


@pytest.mark.slow
def test_bf16_autocast_trains_a_tiny_co_deformable_detr_with_float32_boundaries(monkeypatch: pytest.MonkeyPatch) -> None:
    """Autocast is on in the transformer's layers; the deformable attention, the DETR losses and
    the auxiliary heads see float32; on a repeated batch the loss is finite and goes down."""
    cfg = load_config("co_deformable_detr_tiny", [
        "model.num_classes=3", "model.transformer.enc_layers=1", "model.transformer.dec_layers=2",
        "model.transformer.num_queries=20", "model.co.max_pos_queries=20",
        "model.backbone.frozen_stages=4",  # bfloat16 convolution gradients are slow on CPUs
        "train.lr=5e-4"])
    torch.manual_seed(0)
    model = build_model(cfg.model)
    assert keep_float32(model) == 1 + 2 + 1 + 2  # deformable attention x 3 layers, criterion, ATSS, Faster R-CNN

    dtypes: dict[str, set[torch.dtype]] = {"deform_attn": set(), "detr_loss": set(), "ffn": set(), "atss": set()}
    real_attn = deformable_attention.multi_scale_deformable_attn

    def recording_attn(value: torch.Tensor, shapes: list, locations: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        dtypes["deform_attn"] |= {value.dtype, locations.dtype, weights.dtype}
        return real_attn(value, shapes, locations, weights)

    real_layer_loss = DetrCriterion.layer_loss

    def recording_layer_loss(self: DetrCriterion, logits: torch.Tensor, boxes: torch.Tensor, *args: object) -> dict:
        dtypes["detr_loss"] |= {logits.dtype, boxes.dtype}
        return real_layer_loss(self, logits, boxes, *args)

    monkeypatch.setattr(deformable_attention, "multi_scale_deformable_attn", recording_attn)
    monkeypatch.setattr(DetrCriterion, "layer_loss", recording_layer_loss)
    model.detector.encoder.layers[0].ffn[0].register_forward_hook(lambda m, i, out: dtypes["ffn"].add(out.dtype))
    atss = model.aux_heads[list(cfg.model.co.aux_heads).index("atss")]
    atss.register_forward_hook(lambda m, i, out: dtypes["atss"].update(t.dtype for t in out[:3]))

    # 128 px: no map smaller than 2 x 2 enters a stride-2 convolution. On AVX-512 CPUs, oneDNN's
    # bfloat16 weight gradient of a 3x3 stride-2 convolution of a 1 x 1 map (32 px images) is now
    # and then NaN or inf (PyTorch 2.14.1; docs/training.md, mixed precision).
    images = torch.randn(2, 3, 128, 128, generator=torch.Generator().manual_seed(1))
    targets = [Target(4 * torch.tensor([[2.0, 3.0, 20.0, 18.0], [12.0, 8.0, 30.0, 30.0]]), torch.tensor([0, 2])),
               Target(4 * torch.tensor([[4.0, 4.0, 28.0, 24.0]]), torch.tensor([1]))]
    batch = collate(list(zip(images, targets)))
    trainer = Trainer(model, LossForward(model), build_optimizer(model, cfg.train), LrSchedule([]),
                      loader=None, sampler=None, device=torch.device("cpu"), epochs=1, max_iters=None,  # type: ignore[arg-type]
                      grad_clip=0.1, hooks=[], amp=torch.bfloat16)
    losses = []
    for _ in range(4):
        trainer.step([batch])
        losses.append(trainer.loss)
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0] - 1.0, losses
    assert dtypes == {"deform_attn": {torch.float32}, "detr_loss": {torch.float32}, "ffn": {torch.bfloat16},
                      "atss": {torch.float32}}
    assert all(p.dtype == torch.float32 for p in model.parameters())


# ---------------------------------------------------------------- gradient accumulation


class DeterministicDetector(FakeDetector):
    """FakeDetector without dropout: its losses are means over the images, and its random box
    jitter is drawn image after image, the same in micro-batches as in one batch."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        self.dropout = nn.Identity()


@pytest.mark.parametrize("num_images", [4, 3])
def test_accumulated_micro_batches_make_the_step_of_one_batch(num_images: int) -> None:
    """Micro-batches of 2 images (the last of 1 when 3 images) give the gradients, the step and
    the logged losses of one batch of all the images."""
    generator = torch.Generator().manual_seed(0)
    samples = [(torch.randn(3, 32, 32, generator=generator),
                Target(torch.tensor([[2.0, 4.0, 20.0 + i, 30.0]])[:i % 3], torch.tensor([i % 3])[:i % 3]))
               for i in range(num_images)]
    torch.manual_seed(0)
    model = DeterministicDetector(ModelConfig(num_classes=3))
    twin = copy.deepcopy(model)
    cfg = TrainConfig(lr=1e-2, lr_mult={"backbone": 0.1}, grad_clip=1.0)

    def one_step(detector: nn.Module, batches: list[Batch]) -> Trainer:
        trainer = Trainer(detector, LossForward(detector), build_optimizer(detector, cfg), LrSchedule([]),
                          loader=None, sampler=None, device=torch.device("cpu"), epochs=1, max_iters=None,  # type: ignore[arg-type]
                          grad_clip=cfg.grad_clip, hooks=[])
        torch.manual_seed(5)
        trainer.step(batches)
        return trainer

    micro = micro_batches(samples, 2)
    assert [len(b.targets) for b in micro] == [2, num_images - 2]
    accumulated, whole = one_step(model, micro), one_step(twin, micro_batches(samples, num_images))
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        if p.requires_grad:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7, msg=name)
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7, msg=name)
    assert accumulated.loss == pytest.approx(whole.loss, rel=1e-6)
    assert accumulated.losses == pytest.approx(whole.losses, rel=1e-6)


# ------------------------------------------------------------------------- TensorBoard


def read_events(log_dir: Path) -> tuple[dict[str, list[tuple[int, float]]], dict[str, list[tuple[int, bytes]]]]:
    """Scalars (step, value) and images (step, PNG bytes) per tag, as TensorBoard reads them."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    scalars = {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    images = {tag: [(e.step, e.encoded_image_string) for e in events.Images(tag)] for tag in events.Tags()["images"]}
    return scalars, images


def test_tensorboard_holds_losses_lr_metrics_and_drawn_predictions(coco: Path, tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    out = tmp_path / "run"
    train(tiny_config(coco, tensorboard=True, tensorboard_images=1, max_iters=3), out, build_model=FakeDetector)
    train(tiny_config(coco, tensorboard=True, tensorboard_images=1), out, resume=True, build_model=FakeDetector)
    scalars, images = read_events(out / "tensorboard")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["type"] == "train"]
    evals = [r for r in records if r["type"] == "eval"]
    # every step once, also across the resume (log_every 1), with the values of metrics.jsonl
    assert scalars["loss/total"] == [(r["iter"], pytest.approx(r["loss"], rel=1e-6)) for r in steps]
    assert scalars["train/lr"] == [(r["iter"], pytest.approx(r["lr"], rel=1e-6)) for r in steps]
    assert scalars["loss/loss_cls"] == [(r["iter"], pytest.approx(r["losses"]["loss_cls"], rel=1e-6)) for r in steps]
    assert [s for s, _ in scalars["loss/total"]] == [1, 2, 3, 4, 5, 6]
    assert [s for s, v in scalars["train/images_per_s"] if v > 0] == [1, 2, 3, 4, 5, 6]
    for metric in ("AP", "AP50", "APs"):
        assert scalars[f"val/{metric}"] == [(r["iter"], pytest.approx(r[metric], rel=1e-6)) for r in evals]
    assert [r["iter"] for r in evals] == [2, 3, 4, 6]  # each epoch, and where the first run stopped
    assert list(images) == ["val/image_0"] and [step for step, _ in images["val/image_0"]] == [2, 3, 4, 6]
    drawn = np.asarray(Image.open(io.BytesIO(images["val/image_0"][-1][1])).convert("RGB"))
    raw = np.asarray(Image.open(coco / "val" / "0001.png").convert("RGB"))
    assert drawn.shape == raw.shape and (drawn != raw).any(2).sum() > 50  # the image, with boxes drawn on it


# ---------------------------------------------------------------------------- progress


def test_log_lines_show_iteration_losses_lr_throughput_and_eta(coco: Path, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    train(tiny_config(coco, eval_every=0, log_every=2, accumulate=2), tmp_path / "run", build_model=FakeDetector)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("epoch ")]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    pattern = (r"epoch (\d)/3 iter (\d)/6 lr (\S+) loss (\S+) \(loss_bbox \S+ loss_cls \S+\) "
               r"(\S+) s/it (\S+) img/s eta 0:00:0\d")
    parsed = [re.fullmatch(pattern, line) for line in lines]
    # 4 images per iteration (2 x 2); each orientation group padded to 4: 2 iterations per epoch
    assert len(lines) == 3 and all(parsed), lines
    for match, record in zip(parsed, [r for r in records if r["type"] == "train"]):
        assert int(match[2]) == record["iter"] and float(match[3]) == pytest.approx(record["lr"], rel=1e-2)
        assert float(match[4]) == pytest.approx(record["loss"], abs=1e-4)
        # images per second over the logged steps: 4 images per step
        assert float(match[6]) == pytest.approx(4 / record["time"], rel=0.05, abs=0.1)


def test_vit_large_coco_config_trains_with_the_released_recipe() -> None:
    """The released ViT-L COCO recipe in its config; at tiny sizes (4 blocks) its detector's
    optimizer puts block i at lr * 0.8 ** (4 - i), the embeddings at lr * 0.8 ** 5, the rest at lr."""
    cfg = load_config("co_dino_5scale_vit_large_coco")
    assert (cfg.train.layer_decay.rate, cfg.train.layer_decay.num_layers) == (0.8, 24)
    assert (cfg.train.ema, cfg.train.ema_momentum, cfg.train.ema_total_iter, cfg.train.ema_interval) == (True, 1e-4, 2000, 1)
    assert (cfg.train.warmup_iters, cfg.train.warmup_ratio, cfg.train.lr, cfg.train.lr_steps) == (500, 0.01, 5e-5, [7])
    lvis = load_config("co_dino_5scale_lsj_vit_large_lvis").train
    assert (lvis.warmup_iters, lvis.ema, lvis.layer_decay.rate) == (500, False, None)

    tiny = load_config("co_dino_5scale_vit_large_coco", [
        "model.backbone.timm_args={embed_dim: 32, depth: 4, num_heads: 2, pretrain_img_size: 64}", "model.num_classes=3",
        "model.transformer={d_model: 32, n_heads: 2, ffn_dim: 64, enc_layers: 1, dec_layers: 1, num_queries: 10}",
        "model.co={roi_fc_dim: 32}", "train.layer_decay.num_layers=4"])
    model = build_model(tiny.model)
    group_of = {id(p): g for g in build_optimizer(model, tiny.train).param_groups for p in g["params"]}
    params = dict(model.named_parameters())
    for i in range(4):
        assert group_of[id(params[f"detector.backbone.blocks.{i}.attn.q_proj.weight"])]["lr"] == pytest.approx(5e-5 * 0.8 ** (4 - i))
    for name in ("detector.backbone.patch_embed.proj.weight", "detector.backbone.pos_embed"):
        assert group_of[id(params[name])]["lr"] == pytest.approx(5e-5 * 0.8 ** 5)
    for name in ("detector.class_branches.0.weight", "aux_heads.1.atss_cls.weight"):
        assert group_of[id(params[name])]["lr"] == pytest.approx(5e-5)
    assert len(group_of) == sum(p.requires_grad for p in params.values())


def test_load_model_from_a_checkpoint_takes_the_ema_average(coco: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Loading last.pt of an EMA run gives the weights model.safetensors holds (the average), not the last step's."""
    train(tiny_config(coco, epochs=1, ema=True, ema_momentum=0.1, ema_total_iter=2), tmp_path / "run",
          build_model=FakeDetector)
    monkeypatch.setitem(sys.modules, "codetr.models.build", types.SimpleNamespace(build_model=FakeDetector))
    loaded = load_model(tmp_path / "run" / "last.pt")
    weights, _ = safetensors_of(tmp_path / "run" / "model.safetensors")
    ckpt = read_checkpoint(tmp_path / "run" / "last.pt")
    assert not torch.equal(ckpt["model"]["head.weight"], weights["head.weight"])
    assert torch.equal(loaded.model.state_dict()["head.weight"], weights["head.weight"])
