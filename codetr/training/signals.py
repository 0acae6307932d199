"""Stopping training cleanly: SIGINT / SIGTERM end the run after the current step, with a checkpoint."""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import Any

from codetr.data.samplers import STOP_SIGNALS
from codetr.distributed import log


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
