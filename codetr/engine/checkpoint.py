"""Atomic training checkpoints, RNG state capture, and safetensors inference weights.

Training checkpoints (``last.pt``) hold only tensors and plain Python values so that they
load with ``torch.load(weights_only=True)``. Inference weights (``model.safetensors``) carry
the class names, dataset category ids and the config in their metadata, so a model can be
used without its dataset.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
import yaml
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_bytes
from torch import Tensor

from codetr.errors import UserError

CHECKPOINT_VERSION = 1
CHECKPOINT_FORMAT = "codetr-checkpoint"
# What a checkpoint must hold besides its format and version (Trainer.state_dict and the run's labels).
CHECKPOINT_KEYS = ("model", "optimizer", "epoch", "iter_in_epoch", "iteration", "rng", "config", "class_names",
                   "category_ids")
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


def capture_rng_state() -> dict[str, Any]:
    """RNG states of python, numpy, torch (CPU) and every CUDA device, as tensors and lists."""
    version, internal, gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    return {
        "python": [version, list(internal), gauss],
        "numpy": [np_kind, torch.from_numpy(np_keys.astype(np.int64)), np_pos, np_has_gauss, np_gauss],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = state["numpy"]
    np.random.set_state((np_kind, np_keys.numpy().astype(np.uint32), np_pos, np_has_gauss, np_gauss))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _existing_file(path: Path, what: str) -> None:
    if path.is_dir():
        raise UserError(f"{what} {path} is a folder, not a file")
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} not found")


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a training checkpoint written by the trainer (``weights_only=True``); a UserError naming
    the file when it is not one (another pickle, a plain state dict, a truncated or corrupt file)."""
    path = Path(path)
    _existing_file(path, "checkpoint")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as err:
        reason = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise UserError(f"{path} is not a codetr training checkpoint (torch.load failed: {reason})") from err
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        hint = (": it looks like an mmdet checkpoint; convert it with `codetr convert mmdet`"
                if isinstance(ckpt, dict) and "state_dict" in ckpt else "")
        raise UserError(f"{path} is not a codetr training checkpoint (no 'format': '{CHECKPOINT_FORMAT}'){hint}")
    if ckpt.get("version") != CHECKPOINT_VERSION:
        raise UserError(f"{path}: checkpoint version {ckpt.get('version')} is not supported "
                        f"(expected {CHECKPOINT_VERSION})")
    missing = [key for key in CHECKPOINT_KEYS if key not in ckpt]
    if missing:
        raise UserError(f"{path}: incomplete codetr checkpoint, no {', '.join(missing)}")
    return ckpt


def save_inference_weights(
    path: str | Path,
    state_dict: dict[str, Tensor],
    class_names: list[str],
    category_ids: list[int],
    config: dict[str, Any],
) -> None:
    """Write ``state_dict`` as safetensors (atomically) with class names, category ids and config."""
    metadata = {
        "format": "codetr",
        "class_names": json.dumps(class_names),
        "category_ids": json.dumps(category_ids),
        "config": yaml.safe_dump(config, sort_keys=False),
    }
    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    data = safetensors_bytes(tensors, metadata=metadata)
    atomic_write(path, lambda f: f.write(data))


def read_safetensors(path: str | Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Tensors and metadata of a safetensors file."""
    path = Path(path)
    _existing_file(path, "weights file")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except SafetensorError as err:
        raise UserError(f"{path} is not a safetensors weights file ({err})") from err
    return tensors, metadata
