"""Reading official Co-DETR (mmdet) checkpoint files: the weights and their metadata, unpickled
with only plain numpy types allowed besides tensors."""

from __future__ import annotations

import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from codetr.inference.weights import torch_load_failure


def _numpy_globals() -> list[tuple[Any, str]]:
    """Plain numpy number and array types, under the module paths numpy 1.x and 2.x pickle them with.

    mmcv checkpoints keep run metadata next to the weights (``meta``: epoch, config text, class
    names, and evaluation scores that may be numpy scalars). Unpickling these rebuilds a number or a
    numeric array from bytes and a dtype; none of them calls code named by the file, so they are
    allowed on top of ``weights_only``. Any other global is refused.
    """
    import importlib

    import numpy as np

    try:
        multiarray = importlib.import_module("numpy._core.multiarray")
    except ImportError:  # numpy < 2
        multiarray = importlib.import_module("numpy.core.multiarray")
    allowed: list[tuple[Any, str]] = []
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed += [(multiarray.scalar, f"{module}.scalar"), (multiarray._reconstruct, f"{module}._reconstruct")]
    allowed += [(np.dtype, "numpy.dtype"), (np.ndarray, "numpy.ndarray")]
    for name in dir(getattr(np, "dtypes", None)):
        dtype_class = getattr(np.dtypes, name)
        if isinstance(dtype_class, type) and issubclass(getattr(dtype_class, "type", type), (np.number, np.bool_)):
            allowed.append((dtype_class, f"numpy.dtypes.{name}"))
    return allowed


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model; the message says why."""


@dataclass
class OfficialCheckpoint:
    """state_dict: name -> tensor; meta: mmcv run metadata (may be empty); numpy_globals: the plain
    numpy types the file needed beyond ``weights_only`` (allowed, see :func:`_numpy_globals`)."""

    state_dict: dict[str, Tensor]
    meta: dict[str, Any]
    numpy_globals: list[str]


def load_mmdet_checkpoint(path: str | Path) -> OfficialCheckpoint:
    """An mmdet checkpoint ``{"state_dict": ..., "meta": ...}`` or a bare state_dict, loaded with
    ``torch.load(weights_only=True)`` (plus plain numpy types in ``meta``); anything that would need
    other Python objects is refused, naming them."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found")
    numpy_globals: list[str] = []
    try:
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            unsafe = _unsafe_globals(path, err)
            if not unsafe:
                raise CheckpointError(f"cannot read checkpoint {path}: it is truncated, corrupted or not a PyTorch "
                                      f"file ({torch_load_failure(err)})") from err
            refused = [name for name in unsafe if name not in {name for _, name in _numpy_globals()}]
            try:
                if refused:
                    raise err
                with torch.serialization.safe_globals(_numpy_globals()):
                    ckpt = torch.load(path, map_location="cpu", weights_only=True)
            except pickle.UnpicklingError as again:
                raise CheckpointError(
                    f"{path} holds Python objects that torch.load(weights_only=True) refuses to rebuild, since "
                    f"unpickling them could run code: {refused or _unsafe_globals(path, again)}. Re-save its tensors "
                    "alone where that code is installed and trusted, e.g. "
                    "torch.save(torch.load(PATH)['state_dict'], 'clean.pth')") from again
            numpy_globals = sorted(unsafe)
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        if isinstance(err, CheckpointError):
            raise
        raise CheckpointError(f"cannot read checkpoint {path}: it is truncated, corrupted or not a PyTorch file "
                              f"({type(err).__name__}: {torch_load_failure(err)})") from err
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path} holds a {type(ckpt).__name__}, not a state_dict or an mmdet checkpoint")
    state, meta = (ckpt["state_dict"], ckpt.get("meta") or {}) if "state_dict" in ckpt else (ckpt, {})
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: 'state_dict' is a {type(state).__name__}, not a mapping of tensors")
    bad = [k for k, v in state.items() if not isinstance(v, Tensor)]
    if bad:
        raise CheckpointError(f"{path}: state_dict entries that are not tensors: {bad[:5]}")
    return OfficialCheckpoint(dict(state), meta if isinstance(meta, dict) else {}, numpy_globals)


def _unsafe_globals(path: Path, err: Exception) -> list[str]:
    """The Python globals a checkpoint needs beyond weights_only: all of them for a zip checkpoint,
    else the one named by the unpickler's error; [] when the file is not a readable pickle."""
    try:
        found = list(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # a legacy (non-zip) or unreadable file
        found = []
    return found or re.findall(r"Unsupported global: GLOBAL (\S+)", str(err))
