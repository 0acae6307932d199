"""A training run: its output folder, resume checks, the model, data and hooks put together (``codetr train``)."""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from codetr import distributed as dist
from codetr.config import Config, ModelConfig
from codetr.config_parsing import config_from_dict, config_to_dict, save_config, validate_config
from codetr.data import build_dataloader, build_dataset
from codetr.data.coco import CocoDetection
from codetr.data.samplers import TrainBatchSampler, ignore_stop_signals, train_loader
from codetr.devices import resolve_device
from codetr.distributed import log
from codetr.errors import UserError
from codetr.files import (
    CHECKPOINT_NAME,
    CONFIG_NAME,
    METRICS_NAME,
    PLOT_NAME,
    RUN_OUTPUTS,
    TENSORBOARD_DIR,
    WEIGHTS_NAME,
    check_writable_folder,
    remove_interrupted_writes,
    run_lock,
)
from codetr.inference.loading import build_detector, without_backbone_weights
from codetr.inference.weights import load_state, read_checkpoint, read_weights_file, save_inference_weights
from codetr.training.amp import amp_dtype, keep_float32
from codetr.training.hooks import CheckpointHook, EMAHook, EvalHook, LoggerHook, MetricsFile, PlotHook, TensorBoardHook
from codetr.training.loop import Hook, LossForward, Trainer
from codetr.training.optim import LrSchedule, build_optimizer
from codetr.training.rng import seed_everything
from codetr.training.signals import TrainingInterrupted


def init_from_file(model: nn.Module, path: str | Path, cfg: ModelConfig | None = None) -> list[str]:
    """Start fine-tuning from the weights in ``path`` (.safetensors, or a codetr checkpoint ``.pt``).

    Every tensor of the file loads into the model, except its class-dependent tensors
    (:func:`codetr.models.base.class_dependent_tensors`) whose shape differs (another number of
    classes): those keep the model's fresh initialisation. Training-only parts missing from the file
    (an inference-weights file has no auxiliary heads) keep theirs too, and the file's training-only
    parts a plain detector lacks are skipped. Any other difference (a missing inference tensor, an
    unknown tensor, a shape) is a UserError naming it (:func:`codetr.inference.weights.load_state`);
    but a mask branch (``model.mask``) that box-only weights lack starts afresh, and a line says so.
    Returns the report lines.
    """
    lines = load_state(model, read_weights_file(path).state, str(path), cfg, reinit_classes=True)
    return [f"init from {lines[0]}", *lines[1:]]


def _changed_keys(before: Any, after: Any, prefix: str) -> list[str]:
    """Dotted keys whose values differ between two nested config dicts, as ``key: old -> new``."""
    if isinstance(before, dict) and isinstance(after, dict):
        return [change for key in sorted(before.keys() | after.keys())
                for change in _changed_keys(before.get(key), after.get(key), f"{prefix}.{key}")]
    return [] if before == after else [f"{prefix}: {before!r} -> {after!r}"]


def _category_changes(saved: list[int], current: list[int]) -> list[str]:
    """``label i: id a -> b`` for every label whose dataset category id differs."""
    return [f"label {i}: id {a} -> {b}" for i, (a, b) in enumerate(zip(saved, current)) if a != b]


def prepare_output_folder(out: Path, resume: bool, overwrite: bool, main: bool = True) -> None:
    """Check the output folder before training, and tidy it on the ``main`` process.

    Without ``resume``, a folder holding another run's results (a checkpoint, weights or metrics
    records) is an error unless ``overwrite``, which deletes its outputs (main process); the files of a
    run that ended before any result (it failed on its first batch) are replaced without it. The main
    process also removes the temporary files of interrupted saves (a kill during a checkpoint write).
    Every process checks that a file can be written there (so that all of them stop on an error).
    """
    if main:
        remove_interrupted_writes(out, [name for name in RUN_OUTPUTS if name != TENSORBOARD_DIR])
    if resume and overwrite:
        raise UserError("--resume continues the run in --out and --overwrite replaces it: pass one of them")
    ckpt = out / CHECKPOINT_NAME
    if resume and not ckpt.is_file():
        raise UserError(f"--resume: no checkpoint {ckpt}" + (" (it is a folder)" if ckpt.exists() else ""))
    previous = [name for name in RUN_OUTPUTS if (out / name).exists()]
    if not resume and previous and not overwrite and _holds_results(out):
        if ckpt.exists():
            raise UserError(f"{ckpt} exists: pass --resume to continue that run, --overwrite to start a new run "
                            "there (deleting its outputs), or choose another --out")
        raise UserError(f"{out} holds the outputs of another run ({', '.join(previous)}) but no {CHECKPOINT_NAME} to "
                        "resume from: pass --overwrite to replace them, or choose another --out")
    if not resume and previous and main:
        for name in previous:
            path = out / name
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
        log(f"--overwrite: deleted the previous run's {', '.join(previous)} in {out}" if overwrite else
            f"replaced {', '.join(previous)} in {out}: their run ended before a checkpoint, weights or metrics")
    check_writable_folder(out, "--out")


def _holds_results(out: Path) -> bool:
    """Whether the run folder ``out`` holds something of value: a checkpoint, weights or metrics records."""
    metrics = out / METRICS_NAME
    return ((out / CHECKPOINT_NAME).exists() or (out / WEIGHTS_NAME).exists()
            or (metrics.is_file() and metrics.stat().st_size > 0) or metrics.is_dir())


def train(
    cfg: Config,
    out_dir: str | Path,
    resume: bool = False,
    build_model: Callable[[ModelConfig], nn.Module] | None = None,
    overwrite: bool = False,
    extra_hooks: Sequence[Hook] = (),
) -> dict[str, float]:
    """Train ``cfg`` into ``out_dir``; returns the final COCO metrics (percent).

    Writes ``config.yaml``, ``metrics.jsonl``, ``last.pt`` (every epoch, every
    ``train.checkpoint_every`` iterations, at the end and when stopped by SIGINT / SIGTERM),
    ``training.png`` and the inference weights ``model.safetensors`` (:mod:`codetr.files`). ``resume``
    continues from ``out_dir/last.pt``; without it, a folder holding a previous run's outputs is an
    error unless ``overwrite`` (then they are deleted first). A stop signal ends training after the
    current step with a checkpoint and raises :class:`TrainingInterrupted`. ``build_model`` defaults to
    :func:`codetr.models.build.build_model`. ``extra_hooks`` run after the trainer's own, on every process.
    Launched by torchrun (WORLD_SIZE > 1), trains with DistributedDataParallel; only rank 0 writes.
    The main process holds the folder's lock (:func:`codetr.files.run_lock`) for the whole run: a
    second run there stops with a UserError naming this one.
    """
    validate_config(cfg)
    out = Path(out_dir)
    device = resolve_device(cfg.train.device, "train.device")
    if dist.init_distributed(device) and device.type == "cuda":
        device = torch.device("cuda", dist.local_rank())
    main = dist.is_main_process()
    if dist.is_distributed() and cfg.train.skip_nonfinite:
        # a process skipping the backward of its forward would leave DistributedDataParallel waiting
        raise UserError(f"train.skip_nonfinite={cfg.train.skip_nonfinite}: skipping bad steps works in single-process "
                        "training only; under torchrun set train.skip_nonfinite=0 (a bad step stops the run)")
    with run_lock(out) if main else contextlib.nullcontext():
        return _train_in_folder(cfg, out, device, main, resume, build_model, overwrite, extra_hooks)


def _train_in_folder(cfg: Config, out: Path, device: torch.device, main: bool, resume: bool,
                     build_model: Callable[[ModelConfig], nn.Module] | None, overwrite: bool,
                     extra_hooks: Sequence[Hook]) -> dict[str, float]:
    """The body of :func:`train`, once the folder is locked."""
    ckpt_path = out / CHECKPOINT_NAME
    prepare_output_folder(out, resume, overwrite, main)
    seed_everything(cfg.train.seed)

    train_set, val_loader = _datasets(cfg, main)
    names, ids = list(train_set.class_names), [int(i) for i in train_set.category_ids]
    extra = {"config": config_to_dict(cfg), "class_names": names, "category_ids": ids}
    state = _resumable_checkpoint(ckpt_path, extra["config"], ids, cfg) if resume else None

    detector = _detector(cfg, None if resume else cfg.train.init, build_model).to(device)
    amp = amp_dtype(cfg.train.amp)
    if amp is not None:
        kept = keep_float32(detector)
        log(f"mixed precision {cfg.train.amp}: {kept} modules (deformable attention, losses, auxiliary heads) kept in float32")
    optimizer = build_optimizer(detector, cfg.train)
    schedule = LrSchedule(cfg.train.lr_steps, cfg.train.warmup_iters, cfg.train.warmup_ratio)
    loss_module: nn.Module = LossForward(detector)
    if dist.is_distributed():
        loss_module = DistributedDataParallel(
            loss_module, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True)

    groups = train_set.aspect_ratio_groups() if cfg.data.group_by_aspect_ratio else None
    # an iteration (optimizer step) takes accumulate micro-batches of data.batch_size images per process
    sampler = TrainBatchSampler(len(train_set), cfg.data.batch_size * cfg.train.accumulate, cfg.train.seed,
                                dist.rank(), dist.world_size(), groups)
    loader = train_loader(train_set, sampler, cfg.data.num_workers, cfg.train.seed, cfg.data.batch_size,
                          cfg.data.pad_size_divisor)

    metrics = MetricsFile(out / METRICS_NAME)
    eval_hook = EvalHook(val_loader.dataset, val_loader, cfg.train.eval_every, metrics, write=main)
    hooks = _hooks(cfg, out, detector, eval_hook, metrics, CheckpointHook(ckpt_path, extra, cfg.train.checkpoint_every),
                   main) + list(extra_hooks)
    trainer = Trainer(detector, loss_module, optimizer, schedule, loader, sampler, device,
                      cfg.train.epochs, cfg.train.max_iters, cfg.train.grad_clip, hooks, amp, cfg.train.skip_nonfinite)
    if state is not None:
        trainer.load_state_dict(state, str(ckpt_path))
        del state
        log(f"resumed from {ckpt_path}: epoch {trainer.epoch}, iteration {trainer.iteration}")
    if main:
        save_config(cfg, out / CONFIG_NAME)
    try:
        trainer.run()
    except TrainingInterrupted as stop:
        raise TrainingInterrupted(stop.signal_name, stop.epoch, stop.iteration, ckpt_path) from None

    if main:
        with trainer.evaluation_weights():
            weights = detector.inference_state_dict()
            save_inference_weights(out / WEIGHTS_NAME, weights, names, ids, config_to_dict(cfg))
        log(f"inference weights: {out / WEIGHTS_NAME}")
    dist.barrier()
    return eval_hook.latest


def _datasets(cfg: Config, main: bool) -> tuple[CocoDetection, DataLoader]:
    """The training set and the validation loader, checked against each other and the config."""
    if not main:
        dist.barrier()  # rank 0 first: it may generate the synthetic dataset
    train_set = build_dataset(cfg.data, "train")
    val_loader = build_dataloader(cfg.data, "val", shuffle=False, seed=cfg.train.seed)
    if main:
        dist.barrier()
    val_set = val_loader.dataset
    val_loader.worker_init_fn = ignore_stop_signals  # the main process handles SIGINT / SIGTERM
    if len(train_set) == 0:
        raise UserError(f"{cfg.data.train_annotations} lists no images: nothing to train on")
    if train_set.num_classes != cfg.model.num_classes:
        raise UserError(f"model.num_classes is {cfg.model.num_classes} but {cfg.data.train_annotations} has "
                        f"{train_set.num_classes} categories")
    if val_set.category_ids != train_set.category_ids:
        raise UserError(f"category ids differ between {cfg.data.train_annotations} {train_set.category_ids} "
                        f"and {cfg.data.val_annotations} {val_set.category_ids}")
    return train_set, val_loader


def _resumable_checkpoint(ckpt_path: Path, config: dict[str, Any], ids: list[int], cfg: Config) -> dict[str, Any]:
    """The checkpoint to resume, when it was trained with the model settings of ``config`` (the run's
    config as a dict) and on the dataset category ids ``ids``; a UserError saying what changed otherwise."""
    state = read_checkpoint(ckpt_path)
    # read through the current Config, so that settings added since the run started take their defaults
    saved = config_to_dict(config_from_dict(state["config"], source=str(ckpt_path)))
    changed = _changed_keys(saved["model"], config["model"], "model")
    if changed:
        raise UserError(f"{ckpt_path} was trained with other model settings ({', '.join(changed)}); resume "
                        "with the run's own config (its config.yaml), or start a new run with another --out")
    changes = _category_changes(list(state["category_ids"]), ids)
    if changes:
        raise UserError(f"{ckpt_path} was trained on other category ids than {cfg.data.train_annotations} has now "
                        f"({', '.join(changes)}): its labels would change meaning. Resume with the run's own data, "
                        f"or fine-tune from its weights in a new run (--init {ckpt_path} --out NEW_FOLDER)")
    return state


def _detector(cfg: Config, init: str | None, build_model: Callable[[ModelConfig], nn.Module] | None) -> nn.Module:
    """The detector to train: built from the config, with the weights of ``init`` (``train.init``) when given."""
    if cfg.model.backbone.weights is None and cfg.model.backbone.norm == "frozen_bn" and init is None:
        log("warning: the backbone starts from random weights (model.backbone.weights: null) with frozen batch "
            "norm, i.e. no normalisation at all; to train it from scratch set model.backbone.norm=group_norm")
    if not init:
        return build_detector(cfg.model, build_model)
    # the file's weights replace the ImageNet backbone weights: those are not read
    detector = build_detector(without_backbone_weights(cfg.model), build_model)
    for line in init_from_file(detector, init, cfg.model):
        log(line)
    return detector


def _hooks(cfg: Config, out: Path, detector: nn.Module, eval_hook: EvalHook, metrics: MetricsFile,
           checkpoint_hook: CheckpointHook, main: bool) -> list[Hook]:
    """The trainer's own hooks, in their order: the EMA first (the other hooks see the average of the
    step just done); the checkpoint and the evaluation on every process; logging and plots on the main one."""
    hooks: list[Hook] = [EMAHook(detector, cfg.train.ema_momentum, cfg.train.ema_total_iter, cfg.train.ema_interval)
                         ] if cfg.train.ema else []
    hooks += [LoggerHook(metrics, cfg.train.log_every), checkpoint_hook, eval_hook,
              PlotHook(metrics, out / PLOT_NAME)] if main else [checkpoint_hook, eval_hook]
    if main and cfg.train.tensorboard:
        names, ids = checkpoint_hook.extra["class_names"], checkpoint_hook.extra["category_ids"]
        hooks.append(TensorBoardHook(out / TENSORBOARD_DIR, cfg.train.log_every, eval_hook, cfg, names, ids,
                                     cfg.train.tensorboard_images))
    return hooks
