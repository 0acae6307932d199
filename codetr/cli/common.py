"""What several commands share: help texts, test-time augmentation, resuming an interrupted run."""

from __future__ import annotations

import signal
import sys
from typing import Any

from codetr.errors import UserError

CONFIG_HELP = "config file, or the name of a packaged config (e.g. deformable_detr_tiny)"
OVERRIDE_HELP = "config overrides, e.g. train.epochs=2 model.co.aux_heads=[atss]"
DEVICE_HELP = "auto (CUDA when available, else the CPU), cpu, cuda, cuda:N or mps"
WEIGHTS_HELP = "model.safetensors or a training checkpoint (last.pt)"
TTA_HELP = ("test-time augmentation: every scale of data.tta.scales, also flipped (data.tta.flip), merged by "
            "data.tta.merge (nms, soft_nms or wbf)")
INTERRUPTED_EXIT = 130  # 128 + SIGINT, as shells report a run stopped by Ctrl-C


def with_tta(detector: Any) -> Any:
    """``detector`` with test-time augmentation (``data.tta``); config errors as UserError."""
    from codetr.inference.tta import TTADetector

    try:
        return TTADetector(detector)
    except ValueError as err:
        raise UserError(str(err)) from err


def report_interruption(stop: Any, resume_command: str) -> int:
    """Print how a run stopped by a signal (a ``TrainingInterrupted``) resumes; returns the exit code
    (128 + the signal number, as shells report it)."""
    print(f"codetr: {stop}", file=sys.stderr)
    print(f"resume with: {resume_command}", file=sys.stderr)
    received = signal.Signals.__members__.get(stop.signal_name)  # None: a signal on another process
    return 128 + received.value if received is not None else INTERRUPTED_EXIT
