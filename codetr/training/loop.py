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
import time
from itertools import islice
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from codetr import distributed as dist
from codetr.data.samplers import TrainBatchSampler
from codetr.distributed import log
from codetr.errors import TrainingDiverged, UserError
from codetr.structures import Batch
from codetr.training.optim import LrSchedule
from codetr.training.rng import capture_rng_state, restore_rng_state
from codetr.training.signals import StopSignals, TrainingInterrupted


class LossForward(nn.Module):
    """``forward(batch) = detector.loss(batch)``, so DistributedDataParallel can wrap the loss."""

    def __init__(self, detector: nn.Module) -> None:
        super().__init__()
        self.detector = detector

    def forward(self, batch: Batch) -> dict[str, Tensor]:
        return self.detector.loss(batch)


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

    def evaluation_weights(self, detector: nn.Module) -> contextlib.AbstractContextManager[None] | None:
        """A block in which ``detector`` holds the weights this hook keeps for evaluation and saving
        (an average of the weights, ...); None: the hook keeps none."""
        return None


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
        skip_nonfinite: int = 0,
    ) -> None:
        self.detector, self.loss_module = detector, loss_module
        self.optimizer, self.schedule = optimizer, schedule
        self.loader, self.sampler, self.device = loader, sampler, device
        self.epochs, self.max_iters, self.grad_clip = epochs, max_iters, grad_clip
        self.hooks = hooks
        self.amp = amp
        self.skip_nonfinite = skip_nonfinite  # bad steps skipped before a divergence stops the run
        self.skipped = 0  # bad steps skipped so far (checkpointed)
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
        """A block in which the detector holds the weights to evaluate and save: those the first
        hook that keeps some hands over (:meth:`Hook.evaluation_weights`, e.g. an EMA average),
        else its own."""
        held = (h.evaluation_weights(self.detector) for h in self.hooks)
        return next((weights for weights in held if weights is not None), contextlib.nullcontext())

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
                    skipped = self.skipped
                    self.step(batch)
                    if self.skipped == skipped:  # the hooks do not see a skipped step
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
        """One optimizer step over the micro-batches of an iteration (``train.accumulate`` of them),
        or a skipped one (a non-finite loss or gradient, within ``skip_nonfinite``: the weights stay,
        the iteration counts, ``skipped`` counts it and the hooks do not see it).

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
                problem = None
                with torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None):
                    try:
                        losses = self.loss_module(batch)
                    except FloatingPointError as err:
                        problem = str(err)
                if problem is None:
                    total = sum(losses.values())
                    if not torch.isfinite(total):
                        bad = ", ".join(f"{k}={v.item():.4g}" for k, v in losses.items() if not torch.isfinite(v))
                        problem = f"non-finite loss terms {bad}"
                # every process stops together: one going on alone would wait in the backward's all-reduce
                if dist.any_process(problem is not None, self.device):
                    self._skip_or_stop(problem or "non-finite losses in another process")
                    return
                self.scaler.scale(total * share).backward()
            for key, value in losses.items():
                self.losses[key] = self.losses.get(key, 0.0) + value.item() * share
            self.loss += total.item() * share
        if dist.is_distributed():  # logged: the means over the processes (the global batch's losses)
            averaged = dist.mean_over_processes({**self.losses, "": self.loss}, self.device)
            self.loss = averaged.pop("")
            self.losses = averaged
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        if self.grad_clip:
            self.scaler.unscale_(self.optimizer)
            norm = torch.nn.utils.clip_grad_norm_(params, self.grad_clip)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
        if not self.scaler.is_enabled() and not torch.isfinite(norm):  # fp16's scaler skips such steps itself
            self._skip_or_stop(f"non-finite gradients (norm {norm.item():.4g}) of finite loss terms")
            return
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self._count_step()
        self.step_images = num_images * dist.world_size()  # each process takes as many images

    def _count_step(self) -> None:
        self.iteration += 1
        self.iter_in_epoch += 1
        now = time.perf_counter()
        self.step_time, self._tick = now - self._tick, now

    def _skip_or_stop(self, what: str) -> None:
        """A bad step (``what`` went wrong), before the weights change: skipped while
        fewer than ``skip_nonfinite`` were, else the run stops with :class:`TrainingDiverged` (the last
        checkpoint stays good)."""
        if self.skipped >= self.skip_nonfinite:
            clip = f"train.grad_clip (now {self.grad_clip:g})" if self.grad_clip else "enable train.grad_clip"
            skipped = f" (after skipping {self.skipped}, train.skip_nonfinite)" if self.skip_nonfinite else ""
            raise TrainingDiverged(f"training diverged at iteration {self.iteration + 1}{skipped}: {what}; lower "
                                   f"train.lr or {clip}")
        self.skipped += 1
        self.optimizer.zero_grad(set_to_none=True)
        log(f"skipped iteration {self.iteration + 1}: {what} ({self.skipped} of train.skip_nonfinite="
            f"{self.skip_nonfinite} skipped)")
        self._count_step()

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
            "skipped": self.skipped,
        }

    def load_state_dict(self, state: dict[str, Any], source: str = "the checkpoint") -> None:
        if state["iter_in_epoch"] and state["batches_per_epoch"] != len(self.sampler):
            raise UserError(f"{source} stopped mid-epoch with {state['batches_per_epoch']} batches per epoch, but the "
                            f"data now gives {len(self.sampler)} (changed data, batch size or accumulate?)")
        self.detector.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.epoch, self.iter_in_epoch = state["epoch"], state["iter_in_epoch"]
        self.iteration = state["iteration"]
        self.skipped = state.get("skipped", 0)
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


# ---------------------------------------------------------------------------------- train


