"""What several commands share: help texts, test-time augmentation, resuming an interrupted run."""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
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


class Terminated(KeyboardInterrupt):
    """SIGTERM received by the ``codetr`` command: raised where the program is, as Ctrl-C's
    KeyboardInterrupt is, so that cleanup runs (temporary files removed, locks released)."""


@contextlib.contextmanager
def sigterm_as_exception() -> Iterator[None]:
    """Within the block, SIGTERM raises :class:`Terminated` instead of ending the process at once
    (training replaces this with its own stop-after-the-step handler while it runs)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(signum: int, frame: Any) -> None:
        raise Terminated(signal.Signals(signum).name)

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


PACKAGE_DIR = str(Path(__file__).resolve().parents[1])


@contextlib.contextmanager
def short_warnings() -> Iterator[None]:
    """Within the block, codetr's own warnings (data checks, fallbacks) print as one line
    ``codetr: warning: MESSAGE``, without Python's file, line number and source line; other
    libraries' warnings keep their usual form (only the formatting changes: recorded warnings stay)."""
    formatted = warnings.formatwarning

    def short(message: Warning | str, category: type[Warning], filename: str, lineno: int,
              line: str | None = None) -> str:
        if not str(Path(filename).resolve()).startswith(PACKAGE_DIR):
            return formatted(message, category, filename, lineno, line)
        return f"codetr: warning: {str(message).removeprefix('codetr: ')}\n"

    warnings.formatwarning = short
    try:
        yield
    finally:
        warnings.formatwarning = formatted


def report_interruption(stop: Any, resume_command: str) -> int:
    """Print how a run stopped by a signal (a ``TrainingInterrupted``) resumes; returns the exit code
    (128 + the signal number, as shells report it)."""
    print(f"codetr: {stop}", file=sys.stderr)
    print(f"resume with: {resume_command}", file=sys.stderr)
    received = signal.Signals.__members__.get(stop.signal_name)  # None: a signal on another process
    return 128 + received.value if received is not None else INTERRUPTED_EXIT
