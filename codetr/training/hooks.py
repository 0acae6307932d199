"""The trainer's hooks: metrics file and log, EMA of the weights, checkpoints, evaluation, plots, TensorBoard."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from torchvision.transforms.v2.functional import pil_to_tensor
from tqdm import tqdm

from codetr import distributed as dist
from codetr.config import Config
from codetr.distributed import log
from codetr.files import atomic_save, atomic_write_text
from codetr.inference.evaluate import METRIC_NAMES, SEGM_PREFIX, detection_records, evaluate
from codetr.inference.loading import LoadedModel
from codetr.inference.predict import select_detections
from codetr.inference.visualize import draw_detections
from codetr.inference.weights import CHECKPOINT_FORMAT, CHECKPOINT_VERSION
from codetr.training.ema import ExpMomentumEMA
from codetr.training.loop import Hook, Trainer
from codetr.training.plots import plot_training, read_metrics
from codetr.training.rng import preserved_rng


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
    its :meth:`evaluation_weights` are those the trainer evaluates and saves.

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

    def evaluation_weights(self, detector: nn.Module) -> contextlib.AbstractContextManager[None]:
        """The average in ``detector`` for the block."""
        return self.ema.applied(detector)


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
            self.latest = {k: v for k, v in recorded[-1].items() if k not in ("type", "iter", "epoch")}
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
            shown = [k for k in (*METRIC_NAMES, *(SEGM_PREFIX + k for k in METRIC_NAMES)) if k in self.latest]
            log("eval " + " ".join(f"{k} {self.latest[k]:.2f}" for k in shown))


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
                    records = detection_records(select_detections(det, det.scores >= self.score_thr), 0,
                                                self.category_ids)
                    drawn = draw_detections(image, records, self.class_names, self.category_ids)
                    self.writer.add_image(f"val/image_{index}", np.asarray(drawn), trainer.iteration, dataformats="HWC")
        finally:
            trainer.detector.train(was_training)
