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

CHECKPOINT_VERSION = 1


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
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
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


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a training checkpoint written by the trainer (``weights_only=True``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as err:
        raise ValueError(f"{path} is not a codetr training checkpoint (torch.load failed: {type(err).__name__})") from err
    if not isinstance(ckpt, dict) or ckpt.get("format") != "codetr-checkpoint":
        raise ValueError(f"{path} is not a codetr training checkpoint (no 'format': 'codetr-checkpoint')")
    if ckpt.get("version") != CHECKPOINT_VERSION:
        raise ValueError(f"{path}: checkpoint version {ckpt.get('version')} is not supported "
                         f"(expected {CHECKPOINT_VERSION})")
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
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except SafetensorError as err:
        raise ValueError(f"{path} is not a safetensors weights file ({err})") from err
    return tensors, metadata
