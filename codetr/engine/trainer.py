"""The training loop, extended through hooks (checkpointing, evaluation, logging, plots).

Reproducibility: the order of training samples and the seed of each sample's augmentation
are a pure function of ``(train.seed, epoch, position)`` (see :class:`TrainBatchSampler`), and
each sample is loaded under its own torch seed without touching the main process' RNG. The
checkpoint holds the model, optimizer, position, the hooks' states (the EMA of the
weights) and the python / numpy / torch / CUDA RNG states, so a resumed run (after a kill, or after stopping at ``train.max_iters``)
continues with exactly the batches and random draws of an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import random
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from datetime import timedelta
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.transforms.v2.functional import pil_to_tensor
from tqdm import tqdm

from codetr.config import Config, ModelConfig, TrainConfig, config_from_dict, config_to_dict, save_config, validate_config
from codetr.data import build_dataloader, build_dataset, collate
from codetr.engine import distributed as dist
from codetr.engine.amp import amp_dtype, keep_float32
from codetr.engine.checkpoint import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_VERSION,
    atomic_save,
    atomic_write_text,
    capture_rng_state,
    check_writable_folder,
    load_checkpoint,
    remove_orphan_temporaries,
    restore_rng_state,
    save_inference_weights,
)
from codetr.engine.ema import ExpMomentumEMA
from codetr.engine.evaluator import METRIC_NAMES, detection_records, evaluate
from codetr.engine.layer_decay import layer_decay_param_groups
from codetr.engine.plots import plot_training, read_metrics
from codetr.engine.predictor import LoadedModel, draw_detections, resolve_device
from codetr.engine.weights import build_detector, load_weights, read_weights
from codetr.errors import UserError
from codetr.structures import Batch, Detections

CHECKPOINT_NAME = "last.pt"
WEIGHTS_NAME = "model.safetensors"
METRICS_NAME = "metrics.jsonl"
PLOT_NAME = "training.png"
TENSORBOARD_DIR = "tensorboard"
# What a run writes in its folder: another run there must resume it or be allowed to replace it.
RUN_OUTPUTS = (CHECKPOINT_NAME, WEIGHTS_NAME, METRICS_NAME, PLOT_NAME, "config.yaml", TENSORBOARD_DIR)
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def log(message: str) -> None:
    """Print a log line on the main process (through tqdm, so progress bars stay intact)."""
    if dist.is_main_process():
        tqdm.write(message)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


@contextlib.contextmanager
def preserved_rng() -> Iterator[None]:
    """Run a block without changing any RNG state (evaluation must not change training)."""
    state = capture_rng_state()
    try:
        yield
    finally:
        restore_rng_state(state)


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped by SIGINT / SIGTERM after a complete step; ``checkpoint`` holds that step
    (None on processes that write none) and ``train(..., resume=True)`` continues exactly."""

    def __init__(self, signal_name: str, epoch: int, iteration: int, checkpoint: Path | None = None) -> None:
        """``epoch``: the 1-based epoch of the last step, ``iteration`` the steps done in all."""
        self.signal_name, self.epoch, self.iteration, self.checkpoint = signal_name, epoch, iteration, checkpoint
        where = f"; checkpoint {checkpoint}" if checkpoint is not None else ""
        super().__init__(f"training stopped by {signal_name} after iteration {iteration} (epoch {epoch}){where}")


class StopSignals:
    """Within the block, SIGINT (Ctrl-C) and SIGTERM only set :attr:`received` (the signal's name),
    so the trainer can stop after the current step with a checkpoint; a second signal has its usual
    effect (Ctrl-C: KeyboardInterrupt at once; the previous checkpoint stays intact). Only in the
    main thread (signal handlers cannot be set elsewhere); a no-op in other threads."""

    def __init__(self) -> None:
        self.received: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._handle) for sig in STOP_SIGNALS}
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.received = signal.Signals(signum).name
        self._restore()
        log(f"{self.received} received: stopping after the current step with a checkpoint (again: stop at once)")

    def _restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def __exit__(self, *exc: object) -> None:
        self._restore()


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: workers ignore SIGINT / SIGTERM (a Ctrl-C reaches the whole
    process group), so they keep serving until the main process has stopped cleanly."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


# ----------------------------------------------------------------------------------- data


class TrainBatchSampler(Sampler[list[tuple[int, int]]]):
    """Shuffled batches of ``(dataset index, sample seed)`` for this process.

    Epoch ``e`` is a pure function of ``(seed, e)``: an order of the dataset and one seed per
    position. ``set_epoch(e, start_batch=k)`` makes the next iteration start at batch ``k`` (resume).

    ``groups`` (one group id per dataset index, e.g. :meth:`CocoDetection.aspect_ratio_groups`)
    batches images of one group together, as mmdet's ``DistributedGroupSampler``: each group is
    shuffled and padded by repeating its own images to a multiple of ``batch_size * world_size``,
    the groups are concatenated, the batches shuffled, and process ``rank`` takes the ``rank``-th
    of ``world_size`` equal consecutive parts. Every batch is then of one group.
    Without ``groups``, the permutation is padded by wrapping around to a multiple of
    ``world_size`` and process ``rank`` takes every ``world_size``-th item.
    """

    def __init__(self, size: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 groups: Sequence[int] | None = None) -> None:
        if size <= 0:
            raise ValueError("the training set is empty")
        if batch_size <= 0:
            raise ValueError(f"data.batch_size must be positive, got {batch_size}")
        if groups is not None and len(groups) != size:
            raise ValueError(f"{len(groups)} group ids for a dataset of {size} images")
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.groups = None if groups is None else torch.as_tensor(groups, dtype=torch.int64)
        self.epoch, self.start_batch = 0, 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def __len__(self) -> int:
        if self.groups is None:
            return math.ceil(math.ceil(self.size / self.world_size) / self.batch_size)
        per_step = self.batch_size * self.world_size
        return sum(math.ceil(int(n) / per_step) for n in torch.bincount(self.groups))

    def _grouped_order(self, generator: torch.Generator) -> list[int]:
        """All processes' items of the epoch: whole batches of one group, batches shuffled."""
        assert self.groups is not None
        per_step = self.batch_size * self.world_size
        order: list[int] = []
        for group in range(int(self.groups.max()) + 1):
            members = torch.nonzero(self.groups == group).squeeze(1)
            if len(members) == 0:
                continue
            shuffled = members[torch.randperm(len(members), generator=generator)].tolist()
            padded = math.ceil(len(shuffled) / per_step) * per_step
            order += [shuffled[i % len(shuffled)] for i in range(padded)]
        batches = torch.randperm(len(order) // self.batch_size, generator=generator).tolist()
        return [order[b * self.batch_size + i] for b in batches for i in range(self.batch_size)]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch_seed = int(np.random.SeedSequence([self.seed, self.epoch]).generate_state(1)[0])
        generator = torch.Generator().manual_seed(epoch_seed)
        if self.groups is None:
            order = torch.randperm(self.size, generator=generator).tolist()
            seeds = torch.randint(0, 2**62, (self.size,), generator=generator).tolist()
            total = math.ceil(self.size / self.world_size) * self.world_size
            items = [(order[i % self.size], seeds[i % self.size]) for i in range(total)][self.rank::self.world_size]
        else:
            order = self._grouped_order(generator)
            seeds = torch.randint(0, 2**62, (len(order),), generator=generator).tolist()
            share = len(self) * self.batch_size
            items = list(zip(order, seeds))[self.rank * share:(self.rank + 1) * share]
        for b in range(self.start_batch, len(self)):
            yield items[b * self.batch_size:(b + 1) * self.batch_size]


class SeededSamples(Dataset):
    """Wraps a dataset: item ``(index, seed)`` is ``dataset[index]`` loaded under torch seed ``seed``.

    The caller's torch RNG state is left untouched. (Training transforms must draw their
    randomness from torch, as torchvision's transforms do.)
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, item: tuple[int, int]) -> Any:
        index, seed = item
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.dataset[index]


def micro_batches(samples: Sequence[Any], size: int, size_divisor: int = 1) -> list[Batch]:
    """The samples of one iteration, collated in consecutive micro-batches of ``size`` (the last may be
    smaller), each padded to a multiple of ``size_divisor``."""
    return [collate(samples[i:i + size], size_divisor) for i in range(0, len(samples), size)]


def train_loader(dataset: Dataset, sampler: TrainBatchSampler, num_workers: int, seed: int,
                 micro_batch_size: int | None = None, size_divisor: int = 1) -> DataLoader:
    """The training DataLoader: batches from ``sampler``, each sample under its own seed, each
    batch as a list of micro-batches of ``micro_batch_size`` samples (None: one micro-batch),
    padded to a multiple of ``size_divisor``.

    The loader has its own generator, so iterating it never draws from the global torch RNG.
    """
    collate_fn = functools.partial(micro_batches, size=micro_batch_size or sampler.batch_size,
                                   size_divisor=size_divisor)
    return DataLoader(SeededSamples(dataset), batch_sampler=sampler, collate_fn=collate_fn, num_workers=num_workers,
                      persistent_workers=num_workers > 0, generator=torch.Generator().manual_seed(seed),
                      worker_init_fn=ignore_stop_signals)


# ------------------------------------------------------------------------------ optimizer


def param_groups(model: nn.Module, cfg: TrainConfig) -> list[dict[str, Any]]:
    """AdamW parameter groups: the first ``cfg.lr_mult`` key contained in a parameter's name
    sets its learning rate to ``cfg.lr * multiplier``; frozen parameters are left out.

    Each group has ``name`` (the matching key, or "default"), ``lr_mult`` and ``lr``.
    """
    grouped: dict[str, list[nn.Parameter]] = {key: [] for key in [*cfg.lr_mult, "default"]}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        key = next((k for k in cfg.lr_mult if k in name), "default")
        grouped[key].append(param)
    return [
        {"params": params, "name": key, "lr_mult": float(cfg.lr_mult.get(key, 1.0)),
         "lr": cfg.lr * float(cfg.lr_mult.get(key, 1.0))}
        for key, params in grouped.items() if params
    ]


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups`, or over the layer-wise decay groups when ``cfg.layer_decay.rate`` is set."""
    if cfg.layer_decay.rate is not None:
        groups = layer_decay_param_groups(model, cfg.lr, cfg.weight_decay, cfg.layer_decay.rate, cfg.layer_decay.num_layers)
    else:
        groups = param_groups(model, cfg)
    if not groups:
        raise ValueError("the model has no trainable parameters")
    for group in groups:
        group["initial_lr"] = group["lr"]  # the base of the schedule (LrSchedule), as torch's schedulers
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


@dataclass
class LrSchedule:
    """mmcv's ``policy='step'`` with ``warmup='linear'``: the multiplier of each group's
    ``initial_lr`` at a step, from the completed ``epoch`` and ``iteration`` before it:
    ``gamma ** (number of steps <= epoch)``, times ``1 - (1 - iteration / warmup_iters) * (1 - warmup_ratio)``
    during the first ``warmup_iters`` iterations (from ``warmup_ratio`` up towards 1).
    """

    steps: Sequence[int]
    warmup_iters: int = 0
    warmup_ratio: float = 0.1
    gamma: float = 0.1

    def __post_init__(self) -> None:
        if self.warmup_iters < 0:
            raise ValueError(f"train.warmup_iters must be >= 0, got {self.warmup_iters}")
        if not 0.0 < self.warmup_ratio <= 1.0:
            raise ValueError(f"train.warmup_ratio must be in (0, 1], got {self.warmup_ratio}")

    def factor(self, epoch: int, iteration: int) -> float:
        factor = self.gamma ** sum(epoch >= step for step in self.steps)
        if iteration < self.warmup_iters:
            factor *= 1 - (1 - iteration / self.warmup_iters) * (1 - self.warmup_ratio)
        return factor


class _LossForward(nn.Module):
    """``forward(batch) = detector.loss(batch)``, so DistributedDataParallel can wrap the loss."""

    def __init__(self, detector: nn.Module) -> None:
        super().__init__()
        self.detector = detector

    def forward(self, batch: Batch) -> dict[str, Tensor]:
        return self.detector.loss(batch)


# --------------------------------------------------------------------------------- loop


class Hook:
    """Extension point of :class:`Trainer`; every method receives the trainer."""

    def before_train(self, trainer: Trainer) -> None:
        """Called once before the first step (after a resume has restored the state)."""

    def after_step(self, trainer: Trainer) -> None:
        """Called after every optimizer step."""

    def after_epoch(self, trainer: Trainer) -> None:
        """Called after each complete epoch (``trainer.epoch`` already counts it)."""

    def after_train(self, trainer: Trainer) -> None:
        """Called once when training ends (all epochs done or ``max_iters`` reached)."""

    def on_interrupt(self, trainer: Trainer) -> None:
        """Called instead of :meth:`after_train` when a stop signal ends training after a step."""

    def state_dict(self) -> dict[str, Any] | None:
        """The hook's own training state, saved in the checkpoint under its class name (None: none)."""
        return None

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (called on resume, before ``before_train``)."""


class Trainer:
    """Runs ``detector.loss`` / backward / AdamW steps over epochs, calling hooks.

    State: ``epoch`` (completed epochs), ``iter_in_epoch`` (steps done in the current epoch)
    and ``iteration`` (steps done in all). After a step, ``losses`` holds the loss terms as
    floats, ``loss`` their sum, ``step_time`` the seconds since the previous step and
    ``step_images`` the number of images of the step in all processes.
    Hooks with a state (:meth:`Hook.state_dict`) are checkpointed with the trainer.
    """

    def __init__(
        self,
        detector: nn.Module,
        loss_module: nn.Module,
        optimizer: torch.optim.Optimizer,
        schedule: LrSchedule,
        loader: DataLoader,
        sampler: TrainBatchSampler,
        device: torch.device,
        epochs: int,
        max_iters: int | None,
        grad_clip: float | None,
        hooks: list[Hook],
        amp: torch.dtype | None = None,
    ) -> None:
        self.detector, self.loss_module = detector, loss_module
        self.optimizer, self.schedule = optimizer, schedule
        self.loader, self.sampler, self.device = loader, sampler, device
        self.epochs, self.max_iters, self.grad_clip = epochs, max_iters, grad_clip
        self.hooks = hooks
        self.amp = amp
        # fp16 gradients underflow without loss scaling; a disabled scaler is a plain optimizer step
        self.scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
        self.epoch = self.iter_in_epoch = self.iteration = 0
        self.losses: dict[str, float] = {}
        self.loss = 0.0
        self.step_time = 0.0
        self.step_images = 0
        self._tick = time.perf_counter()
        self._signals = StopSignals()
        self._stopping = False

    @property
    def total_iters(self) -> int:
        total = self.epochs * len(self.sampler)
        return total if self.max_iters is None else min(total, self.max_iters)

    @property
    def lr(self) -> float:
        """The current base learning rate (that of multiplier 1)."""
        groups = self.optimizer.param_groups
        group = next((g for g in groups if g.get("lr_mult", 1.0)), groups[0])
        return group["lr"] / (group.get("lr_mult", 1.0) or 1.0)

    def evaluation_weights(self) -> contextlib.AbstractContextManager[None]:
        """A block in which the detector holds the weights to evaluate and save: the EMA average
        when an :class:`EMAHook` trains one, else its own."""
        ema = next((h for h in self.hooks if isinstance(h, EMAHook)), None)
        return ema.ema.applied(self.detector) if ema is not None else contextlib.nullcontext()

    def run(self) -> None:
        """Train to the end; a SIGINT / SIGTERM stops after the current step (and abandons a running
        evaluation, which the resumed run does first): the hooks' :meth:`Hook.on_interrupt` (the
        checkpoint), then :class:`TrainingInterrupted`."""
        with StopSignals() as signals:
            self._signals = signals
            for hook in self.hooks:
                hook.before_train(self)
            while not self.stop_requested() and self.epoch < self.epochs and self.iteration < self.total_iters:
                self.sampler.set_epoch(self.epoch, start_batch=self.iter_in_epoch)
                steps = min(len(self.sampler) - self.iter_in_epoch, self.total_iters - self.iteration)
                self._tick = time.perf_counter()
                for batch in islice(self.loader, steps):
                    self.step(batch)
                    for hook in self.hooks:
                        hook.after_step(self)
                    if self.stop_requested():
                        break
                if self.iter_in_epoch == len(self.sampler):
                    self.epoch += 1
                    self.iter_in_epoch = 0
                    if not self.stop_requested():  # else the epoch's evaluation runs on resume
                        for hook in self.hooks:
                            hook.after_epoch(self)
            if self.stop_requested():
                for hook in self.hooks:
                    hook.on_interrupt(self)
                last_epoch = self.epoch + (self.iter_in_epoch > 0)  # 1-based epoch of the last step
                raise TrainingInterrupted(signals.received or "a stop signal on another process", last_epoch,
                                          self.iteration)
        for hook in self.hooks:
            hook.after_train(self)

    def stop_requested(self) -> bool:
        """Whether a stop signal arrived, on any process (all processes stop after the same step)."""
        if not self._stopping:
            self._stopping = dist.any_process(self._signals.received is not None, self.device)
        return self._stopping

    def step(self, batches: list[Batch]) -> None:
        """One optimizer step over the micro-batches of an iteration (``train.accumulate`` of them).

        Each micro-batch's losses are weighted by its share of the iteration's images before its
        backward pass, so the accumulated gradient is that of one batch of all the images for losses
        that are means over images (the DETR losses are normalised by each micro-batch's own number
        of boxes, which makes them an approximation there). Logged losses are weighted the same way.
        """
        factor = self.schedule.factor(self.epoch, self.iteration)
        for group in self.optimizer.param_groups:
            group["lr"] = group["initial_lr"] * factor
        self.optimizer.zero_grad(set_to_none=True)
        num_images = sum(len(b.targets) for b in batches)
        self.losses, self.loss = {}, 0.0
        for index, batch in enumerate(batches):
            batch = batch.to(self.device)
            share = len(batch.targets) / num_images
            sync: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
            if index < len(batches) - 1 and isinstance(self.loss_module, DistributedDataParallel):
                sync = self.loss_module.no_sync()  # gradients are averaged across processes after the last one only
            with sync:
                with torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None):
                    losses = self.loss_module(batch)
                total = sum(losses.values())
                if not torch.isfinite(total):
                    terms = ", ".join(f"{k}={v.item():.4g}" for k, v in losses.items())
                    raise FloatingPointError(f"loss is not finite at iteration {self.iteration + 1}: {terms}")
                self.scaler.scale(total * share).backward()
            for key, value in losses.items():
                self.losses[key] = self.losses.get(key, 0.0) + value.item() * share
            self.loss += total.item() * share
        if dist.is_distributed():  # logged: the means over the processes (the global batch's losses)
            averaged = dist.mean_over_processes({**self.losses, "": self.loss}, self.device)
            self.loss = averaged.pop("")
            self.losses = averaged
        if self.grad_clip:
            self.scaler.unscale_(self.optimizer)
            params = [p for group in self.optimizer.param_groups for p in group["params"]]
            torch.nn.utils.clip_grad_norm_(params, self.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.iteration += 1
        self.iter_in_epoch += 1
        self.step_images = num_images * dist.world_size()  # each process takes as many images
        now = time.perf_counter()
        self.step_time, self._tick = now - self._tick, now

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly: weights, optimizer, position, RNG, hook states.

        Distributed: every process must call it (``rng_per_rank``, each process' RNG states, is
        gathered on rank 0: the processes draw different numbers, e.g. for proposal sampling).
        """
        return {
            "model": self.detector.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "epoch": self.epoch,
            "iter_in_epoch": self.iter_in_epoch,
            "iteration": self.iteration,
            "batches_per_epoch": len(self.sampler),
            "rng": capture_rng_state(),
            "rng_per_rank": dist.gather_to_main([capture_rng_state()]),
            "hooks": {type(h).__name__: s for h in self.hooks if (s := h.state_dict()) is not None},
            "grad_scaler": self.scaler.state_dict(),  # empty unless fp16
        }

    def load_state_dict(self, state: dict[str, Any], source: str = "the checkpoint") -> None:
        if state["iter_in_epoch"] and state["batches_per_epoch"] != len(self.sampler):
            raise UserError(f"{source} stopped mid-epoch with {state['batches_per_epoch']} batches per epoch, but the "
                            f"data now gives {len(self.sampler)} (changed data, batch size or accumulate?)")
        self.detector.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.epoch, self.iter_in_epoch = state["epoch"], state["iter_in_epoch"]
        self.iteration = state["iteration"]
        per_rank = state.get("rng_per_rank", [])
        # resumed by as many processes as saved it: each its own states; otherwise rank 0's for all
        restore_rng_state(per_rank[dist.rank()] if len(per_rank) == dist.world_size() else state["rng"])
        if self.scaler.is_enabled() and state.get("grad_scaler"):
            self.scaler.load_state_dict(state["grad_scaler"])
        saved = state.get("hooks", {})
        for hook in self.hooks:
            if type(hook).__name__ in saved:
                hook.load_state_dict(saved[type(hook).__name__])


# -------------------------------------------------------------------------------- hooks


class MetricsFile:
    """``metrics.jsonl``: one JSON record per line (``type`` "train" or "eval", ``iter``, ...)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def append(self, record: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def records(self) -> list[dict[str, Any]]:
        return read_metrics(self.path)

    def keep_until(self, iteration: int) -> None:
        """Drop records after ``iteration`` (written after the checkpoint a run resumes from)."""
        kept = [r for r in self.records() if r["iter"] <= iteration]
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))


class LoggerHook(Hook):
    """Progress bar (iterations, iterations per second and time left, with the loss, learning
    rate and epoch), plus every ``every`` steps a metrics record and a log line with the means of
    the loss terms, learning rate, seconds per iteration, images per second (all processes) and
    the time left over those steps."""

    def __init__(self, metrics: MetricsFile, every: int) -> None:
        self.metrics, self.every = metrics, max(1, every)
        self._window: list[tuple[float, dict[str, float], float, int]] = []
        self._bar: tqdm | None = None

    def before_train(self, trainer: Trainer) -> None:
        self.metrics.keep_until(trainer.iteration)
        logged = [r for r in self.metrics.records() if r["type"] == "train"]
        if logged and logged[-1]["iter"] == trainer.iteration:
            self._window.clear()  # the checkpoint was written before its steps were logged at the end of a run
        self._bar = tqdm(total=trainer.total_iters, initial=trainer.iteration, desc="train",
                         dynamic_ncols=True, disable=None)

    def after_step(self, trainer: Trainer) -> None:
        self._window.append((trainer.loss, trainer.losses, trainer.step_time, trainer.step_images))
        assert self._bar is not None
        self._bar.set_postfix(loss=f"{trainer.loss:.4f}", lr=f"{trainer.lr:.2e}", epoch=trainer.epoch + 1, refresh=False)
        self._bar.update(1)
        if trainer.iteration % self.every == 0:
            self._flush(trainer)

    def after_train(self, trainer: Trainer) -> None:
        if self._window:
            self._flush(trainer)
        if self._bar is not None:
            self._bar.close()

    def on_interrupt(self, trainer: Trainer) -> None:
        if self._bar is not None:  # the steps not logged yet are in the checkpoint (state_dict)
            self._bar.close()

    def state_dict(self) -> dict[str, Any]:
        """The steps since the last metrics record: a resumed run logs the record they belong to
        as the uninterrupted run does."""
        return {"window": [list(w) for w in self._window]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._window = [tuple(w) for w in state["window"]]  # type: ignore[misc]

    def _flush(self, trainer: Trainer) -> None:
        n = len(self._window)
        loss = sum(w[0] for w in self._window) / n
        terms = {k: sum(w[1][k] for w in self._window) / n for k in self._window[-1][1]}
        seconds = sum(w[2] for w in self._window) / n
        throughput = sum(w[3] for w in self._window) / max(n * seconds, 1e-9)
        self._window.clear()
        epoch = trainer.epoch + (trainer.iter_in_epoch > 0)  # 1-based epoch of the last step
        self.metrics.append({"type": "train", "iter": trainer.iteration, "epoch": epoch, "lr": trainer.lr,
                             "loss": loss, "losses": terms, "time": seconds})
        shown = " ".join(f"{k} {v:.4f}" for k, v in terms.items() if k.startswith("loss_"))
        eta = timedelta(seconds=round(seconds * (trainer.total_iters - trainer.iteration)))
        log(f"epoch {epoch}/{trainer.epochs} iter {trainer.iteration}/{trainer.total_iters} "
            f"lr {trainer.lr:.2e} loss {loss:.4f} ({shown}) {seconds:.3f} s/it {throughput:.1f} img/s eta {eta}")


class EMAHook(Hook):
    """Keeps an :class:`ExpMomentumEMA` of the detector's weights, updated after every step;
    :meth:`Trainer.evaluation_weights` puts it in the detector for evaluation and saving.

    Resuming a checkpoint without an average (trained with ``train.ema`` off) starts the average
    from the resumed weights, as mmdet's hook does.
    """

    def __init__(self, detector: nn.Module, momentum: float, total_iter: int, interval: int) -> None:
        self.ema = ExpMomentumEMA(detector, momentum, total_iter, interval)
        self._restored = False

    def before_train(self, trainer: Trainer) -> None:
        if trainer.iteration and not self._restored:
            log("the checkpoint holds no EMA of the weights: the average starts from the resumed weights")
            self.ema.reset(trainer.detector)

    def after_step(self, trainer: Trainer) -> None:
        self.ema.update(trainer.detector, trainer.iteration - 1)

    def state_dict(self) -> dict[str, Any]:
        return self.ema.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.ema.load_state_dict(state)
        self._restored = True


class CheckpointHook(Hook):
    """Atomically writes ``last.pt`` after every epoch, every ``every`` iterations (0: never
    mid-epoch), when training ends and when a stop signal interrupts it. ``extra``: the config,
    class names and dataset category ids of the run. Runs on every process
    (:meth:`Trainer.state_dict` gathers their RNG states); rank 0 writes."""

    def __init__(self, path: Path, extra: dict[str, Any], every: int = 0) -> None:
        self.path, self.extra, self.every = path, extra, every
        self._saved_at = -1

    def after_step(self, trainer: Trainer) -> None:
        # an epoch's last step is saved by after_epoch, after the epoch count moves on
        if self.every and trainer.iteration % self.every == 0 and trainer.iter_in_epoch < len(trainer.sampler):
            self.save(trainer)

    def after_epoch(self, trainer: Trainer) -> None:
        self.save(trainer)

    def after_train(self, trainer: Trainer) -> None:
        if self._saved_at != trainer.iteration:
            self.save(trainer)

    def on_interrupt(self, trainer: Trainer) -> None:
        self.after_train(trainer)

    def save(self, trainer: Trainer) -> None:
        state = trainer.state_dict()
        self._saved_at = trainer.iteration
        if not dist.is_main_process():
            return
        atomic_save({"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **self.extra, **state}, self.path)
        log(f"saved checkpoint {self.path} (epoch {trainer.epoch}, iteration {trainer.iteration})")


class _EvaluationStopped(Exception):
    """A stop signal arrived during an evaluation (caught by :meth:`EvalHook.run`)."""


class EvalHook(Hook):
    """COCO evaluation every ``every`` epochs and at the end; results go to metrics.jsonl.

    Runs on every process (predictions are gathered; only ``write`` appends the results);
    RNG states are left untouched. When a resumed run starts right after an epoch whose
    evaluation is missing from the metrics (killed during evaluation), that evaluation is run first.
    """

    def __init__(self, dataset: Any, loader: DataLoader, every: int, metrics: MetricsFile, write: bool) -> None:
        self.dataset, self.loader, self.every = dataset, loader, every
        self.metrics, self.write = metrics, write
        self.latest: dict[str, float] = {}
        self.runs = 0  # evaluations run by this hook (not counting results reused on resume)
        self._evaluated_at = -1

    def before_train(self, trainer: Trainer) -> None:
        """On resume at an epoch end: reuse that iteration's recorded evaluation, or run a due one."""
        if trainer.iteration == 0 or trainer.iter_in_epoch:
            return
        recorded = [r for r in self.metrics.records() if r["type"] == "eval" and r["iter"] == trainer.iteration]
        if recorded:
            self.latest = {k: recorded[-1][k] for k in METRIC_NAMES}
            self._evaluated_at = trainer.iteration
        elif self._due(trainer):
            self.run(trainer)

    def after_epoch(self, trainer: Trainer) -> None:
        if self._due(trainer):
            self.run(trainer)

    def after_train(self, trainer: Trainer) -> None:
        if self._evaluated_at != trainer.iteration:
            self.run(trainer)

    def _due(self, trainer: Trainer) -> bool:
        return self.every > 0 and trainer.epoch % self.every == 0

    def _batches(self, trainer: Trainer) -> Iterator[Any]:
        """The evaluation batches, ending in :class:`_EvaluationStopped` once a stop signal arrived
        (on any process: all of them have the same number of batches)."""
        for batch in self.loader:
            if trainer.stop_requested():
                raise _EvaluationStopped
            yield batch

    def run(self, trainer: Trainer) -> None:
        """Evaluate now; a stop signal abandons the evaluation (a resumed run starts with it)."""
        log(f"evaluating on {len(self.dataset)} images (epoch {trainer.epoch}, iteration {trainer.iteration})")
        try:
            with preserved_rng(), trainer.evaluation_weights():
                self.latest = evaluate(trainer.detector, self.dataset, self._batches(trainer))
        except _EvaluationStopped:
            log("evaluation stopped: the resumed run evaluates first")
            return
        self._evaluated_at = trainer.iteration
        self.runs += 1
        if self.write:
            self.metrics.append({"type": "eval", "iter": trainer.iteration, "epoch": trainer.epoch, **self.latest})
            log("eval " + " ".join(f"{k} {self.latest[k]:.2f}" for k in METRIC_NAMES))


class PlotHook(Hook):
    """Redraws the training plot after every epoch and at the end."""

    def __init__(self, metrics: MetricsFile, png: Path) -> None:
        self.metrics, self.png = metrics, png

    def after_epoch(self, trainer: Trainer) -> None:
        plot_training(self.metrics.path, self.png)

    def after_train(self, trainer: Trainer) -> None:
        plot_training(self.metrics.path, self.png)

    def on_interrupt(self, trainer: Trainer) -> None:
        plot_training(self.metrics.path, self.png)


class TensorBoardHook(Hook):
    """TensorBoard event files in ``log_dir``: every ``every`` steps the loss terms
    (``loss/<term>``, ``loss/total``), the learning rate (``train/lr``) and the images per second
    of the step (``train/images_per_s``); after each evaluation
    the COCO metrics (``val/AP``, ...) and the first ``num_images`` validation images with the
    detections scoring at least ``score_thr`` drawn (``val/image_<i>``), by the evaluated weights
    (the EMA when on). A resumed run hides the events logged after its checkpoint (purge_step).
    """

    def __init__(self, log_dir: Path, every: int, eval_hook: EvalHook, cfg: Config, class_names: list[str],
                 category_ids: list[int], num_images: int, score_thr: float = 0.3) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:
            raise ImportError("train.tensorboard needs the tensorboard package: pip install tensorboard") from err
        self._writer_class = SummaryWriter
        self.log_dir, self.every, self.eval_hook, self.cfg = log_dir, max(1, every), eval_hook, cfg
        self.class_names, self.category_ids = class_names, category_ids
        self.num_images, self.score_thr = num_images, score_thr
        self.writer: Any = None
        self._logged_runs = 0

    def before_train(self, trainer: Trainer) -> None:
        self.writer = self._writer_class(str(self.log_dir), purge_step=trainer.iteration + 1 if trainer.iteration else None)
        self._log_evaluation(trainer)  # one run on resume, before the first step

    def after_step(self, trainer: Trainer) -> None:
        if trainer.iteration % self.every == 0:
            for key, value in {**trainer.losses, "total": trainer.loss}.items():
                self.writer.add_scalar(f"loss/{key}", value, trainer.iteration)
            self.writer.add_scalar("train/lr", trainer.lr, trainer.iteration)
            self.writer.add_scalar("train/images_per_s", trainer.step_images / max(trainer.step_time, 1e-9),
                                   trainer.iteration)

    def after_epoch(self, trainer: Trainer) -> None:
        self._log_evaluation(trainer)

    def after_train(self, trainer: Trainer) -> None:
        self._log_evaluation(trainer)
        self.writer.close()

    def on_interrupt(self, trainer: Trainer) -> None:
        self.writer.close()

    def _log_evaluation(self, trainer: Trainer) -> None:
        if self.eval_hook.runs == self._logged_runs:
            return
        self._logged_runs = self.eval_hook.runs
        for key, value in self.eval_hook.latest.items():
            self.writer.add_scalar(f"val/{key}", value, trainer.iteration)
        self._draw_predictions(trainer)
        self.writer.flush()

    @torch.no_grad()
    def _draw_predictions(self, trainer: Trainer) -> None:
        dataset = self.eval_hook.dataset
        model = LoadedModel(trainer.detector, self.cfg, self.class_names, self.category_ids)
        was_training = trainer.detector.training
        trainer.detector.eval()
        try:
            with preserved_rng(), trainer.evaluation_weights():
                for index in range(min(self.num_images, len(dataset))):
                    image = dataset.load_image(index)
                    det = model.detect(pil_to_tensor(image))
                    keep = det.scores >= self.score_thr
                    records = detection_records(Detections(det.boxes[keep], det.scores[keep], det.labels[keep]), 0,
                                                self.category_ids)
                    drawn = draw_detections(image, records, self.class_names, self.category_ids)
                    self.writer.add_image(f"val/image_{index}", np.asarray(drawn), trainer.iteration, dataformats="HWC")
        finally:
            trainer.detector.train(was_training)


# ---------------------------------------------------------------------------------- train


def load_init_weights(model: nn.Module, path: str | Path, cfg: ModelConfig | None = None) -> list[str]:
    """Start fine-tuning from the weights in ``path`` (.safetensors, or a codetr checkpoint ``.pt``).

    Every tensor of the file loads into the model, except tensors of :data:`CLASS_LAYERS` whose
    shape differs (another number of classes): those keep the model's fresh initialisation.
    Training-only parts missing from the file (an inference-weights file has no auxiliary heads)
    keep theirs too, and the file's training-only parts a plain detector lacks are skipped. Any
    other difference (a missing inference tensor, an unknown tensor, a shape) is a UserError naming
    it (:func:`codetr.engine.weights.load_weights`). Returns the report lines.
    """
    lines = load_weights(model, read_weights(path).state, str(path), cfg, reinit_classes=True)
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

    Without ``resume``, a folder holding another run's outputs is an error unless ``overwrite``,
    which deletes them (main process). The main process also removes the temporary files of
    interrupted saves (a kill during a checkpoint write). Every process checks that a file can be
    written there (so that all of them stop on an error).
    """
    if main:
        removed = remove_orphan_temporaries(out, [CHECKPOINT_NAME, WEIGHTS_NAME, METRICS_NAME])
        if removed:
            megabytes = sum(size for _, size in removed) / 2**20
            log(f"removed {len(removed)} temporary file(s) of interrupted saves in {out} ({megabytes:.1f} MB): "
                f"{', '.join(path.name for path, _ in removed[:3])}{' ...' if len(removed) > 3 else ''}")
    if resume and overwrite:
        raise UserError("--resume continues the run in --out and --overwrite replaces it: pass one of them")
    ckpt = out / CHECKPOINT_NAME
    if resume and not ckpt.is_file():
        raise UserError(f"--resume: no checkpoint {ckpt}" + (" (it is a folder)" if ckpt.exists() else ""))
    previous = [name for name in RUN_OUTPUTS if (out / name).exists()]
    if not resume and previous and not overwrite:
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
        log(f"--overwrite: deleted the previous run's {', '.join(previous)} in {out}")
    check_writable_folder(out, "--out")


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
    ``training.png`` and the inference weights ``model.safetensors``. ``resume`` continues from
    ``out_dir/last.pt``; without it, a folder holding a previous run's outputs is an error unless
    ``overwrite`` (then they are deleted first). A stop signal ends training after the current step
    with a checkpoint and raises :class:`TrainingInterrupted`. ``build_model`` defaults to
    :func:`codetr.models.build.build_model`. ``extra_hooks`` run after the trainer's own, on every process.
    Launched by torchrun (WORLD_SIZE > 1), trains with DistributedDataParallel; only rank 0 writes.
    """
    validate_config(cfg)
    out = Path(out_dir)
    ckpt_path = out / CHECKPOINT_NAME

    device = resolve_device(cfg.train.device, "train.device")
    if dist.init_distributed(device) and device.type == "cuda":
        device = torch.device("cuda", dist.local_rank())
    main = dist.is_main_process()
    prepare_output_folder(out, resume, overwrite, main)
    seed_everything(cfg.train.seed)

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
    names, ids = list(train_set.class_names), [int(i) for i in train_set.category_ids]
    extra = {"config": config_to_dict(cfg), "class_names": names, "category_ids": ids}

    state = None
    if resume:
        state = load_checkpoint(ckpt_path)
        # read through the current Config, so that settings added since the run started take their defaults
        saved = config_to_dict(config_from_dict(state["config"], source=str(ckpt_path)))
        changed = _changed_keys(saved["model"], extra["config"]["model"], "model")
        if changed:
            raise UserError(f"{ckpt_path} was trained with other model settings ({', '.join(changed)}); resume "
                            "with the run's own config (its config.yaml), or start a new run with another --out")
        changes = _category_changes(list(state["category_ids"]), ids)
        if changes:
            raise UserError(f"{ckpt_path} was trained on other category ids than {cfg.data.train_annotations} has now "
                            f"({', '.join(changes)}): its labels would change meaning. Resume with the run's own data, "
                            f"or fine-tune from its weights in a new run (--init {ckpt_path} --out NEW_FOLDER)")

    init = cfg.train.init if not resume else None
    if cfg.model.backbone.weights is None and cfg.model.backbone.norm == "frozen_bn" and init is None:
        log("warning: the backbone starts from random weights (model.backbone.weights: null) with frozen batch "
            "norm, i.e. no normalisation at all; to train it from scratch set model.backbone.norm=group_norm")
    # With train.init the ImageNet backbone weights would be overwritten: not loaded.
    model_cfg = replace(cfg.model, backbone=replace(cfg.model.backbone, weights=None)) if init else cfg.model
    detector = build_detector(model_cfg, build_model)
    if init:
        for line in load_init_weights(detector, init, cfg.model):
            log(line)
    detector = detector.to(device)
    amp = amp_dtype(cfg.train.amp)
    if amp is not None:
        kept = keep_float32(detector)
        log(f"mixed precision {cfg.train.amp}: {kept} modules (deformable attention, losses, auxiliary heads) kept in float32")
    optimizer = build_optimizer(detector, cfg.train)
    schedule = LrSchedule(cfg.train.lr_steps, cfg.train.warmup_iters, cfg.train.warmup_ratio)
    loss_module: nn.Module = _LossForward(detector)
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
    eval_hook = EvalHook(val_set, val_loader, cfg.train.eval_every, metrics, write=main)
    # the EMA first: the other hooks see the average of the step just done
    hooks: list[Hook] = [EMAHook(detector, cfg.train.ema_momentum, cfg.train.ema_total_iter, cfg.train.ema_interval)
                         ] if cfg.train.ema else []
    # on every process, before the evaluation as on rank 0
    checkpoint_hook = CheckpointHook(ckpt_path, extra, cfg.train.checkpoint_every)
    hooks += [LoggerHook(metrics, cfg.train.log_every), checkpoint_hook, eval_hook,
              PlotHook(metrics, out / PLOT_NAME)] if main else [checkpoint_hook, eval_hook]
    if main and cfg.train.tensorboard:
        hooks.append(TensorBoardHook(out / TENSORBOARD_DIR, cfg.train.log_every, eval_hook, cfg, names, ids,
                                     cfg.train.tensorboard_images))

    hooks += extra_hooks
    trainer = Trainer(detector, loss_module, optimizer, schedule, loader, sampler, device,
                      cfg.train.epochs, cfg.train.max_iters, cfg.train.grad_clip, hooks, amp)
    if state is not None:
        trainer.load_state_dict(state, str(ckpt_path))
        del state
        log(f"resumed from {ckpt_path}: epoch {trainer.epoch}, iteration {trainer.iteration}")
    if main:
        save_config(cfg, out / "config.yaml")
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
