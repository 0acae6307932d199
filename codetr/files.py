"""The files codetr writes: the names of a run folder's files, and writing them atomically (a kill
during a save leaves the previous file intact)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import torch

from codetr.errors import UserError

# What a training run writes in its --out folder (and Detector.save_pretrained: config + weights).
CHECKPOINT_NAME = "last.pt"
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.yaml"
METRICS_NAME = "metrics.jsonl"
PLOT_NAME = "training.png"
TENSORBOARD_DIR = "tensorboard"
# Another run in a folder holding these must resume it or be allowed to replace it.
RUN_OUTPUTS = (CHECKPOINT_NAME, WEIGHTS_NAME, METRICS_NAME, PLOT_NAME, CONFIG_NAME, TENSORBOARD_DIR)


TEMPORARY_SUFFIX = ".tmp"


def _file_mode() -> int:
    """Permissions of a newly created file under the current umask (mkstemp uses 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None]) -> None:
    """Write ``path`` through ``write(file)`` into a temporary file, then ``os.replace`` it.

    A failure (or a kill) at any point leaves the previous content of ``path`` intact and no
    temporary file behind (for an exception; a kill may leave a ``.tmp`` file next to it).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=_temporary_prefix(path.name), suffix=TEMPORARY_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _file_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _temporary_prefix(name: str) -> str:
    """Start of the name of :func:`atomic_write`'s temporary files for a file ``name``: ``.<name>.``
    (then mkstemp's random characters and ``.tmp``)."""
    return f".{name}."


def remove_orphan_temporaries(folder: str | Path, names: list[str]) -> list[tuple[Path, int]]:
    """Delete the temporary files that interrupted :func:`atomic_write` calls (a kill, a power cut)
    left in ``folder`` for the files ``names``; returns the removed paths and their sizes in bytes."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for path in sorted(folder.iterdir()):
        if (path.name.endswith(TEMPORARY_SUFFIX) and path.is_file()
                and any(path.name.startswith(_temporary_prefix(name)) for name in names)):
            size = path.stat().st_size
            path.unlink()
            removed.append((path, size))
    return removed


def check_writable_folder(folder: str | Path, what: str) -> Path:
    """Create ``folder`` if needed and check that a file can be written in it, before long work;
    a UserError naming the folder (``what``: e.g. "--out") otherwise. Returns the folder."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        raise UserError(f"{what} {folder}: cannot write there ({err.strerror or err})") from err
    return folder


def atomic_save(obj: Any, path: str | Path) -> None:
    """``torch.save(obj, path)``, atomically."""
    atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode()))
