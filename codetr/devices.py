"""The device a model runs on: ``--device``, ``train.device`` and ``Detector(device=)`` resolved and checked."""

from __future__ import annotations

import torch

from codetr.errors import UserError

DEVICE_CHOICES = "auto, cpu, cuda, cuda:N or mps"


def resolve_device(name: str | torch.device, source: str = "--device") -> torch.device:
    """The device of ``--device``, ``train.device`` or ``Detector(device=)`` (named ``source`` in
    errors): "auto" (CUDA when available, else the CPU; MPS only when asked for), "cpu", "cuda",
    "cuda:N" or "mps". A device this machine lacks is a UserError saying why."""
    if isinstance(name, str) and name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise UserError(f"{source} {name!r} is not a device: use {DEVICE_CHOICES}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"{source} {name}: cuda requested but torch.cuda.is_available() is False (no usable "
                            "GPU, or a CPU-only PyTorch build); use cpu or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"{source} {name}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                            f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise UserError(f"{source} {name}: mps requested but torch.backends.mps.is_available() is False "
                            "(Apple-silicon GPUs only); use cpu or auto")
    elif device.type != "cpu":
        raise UserError(f"{source} {name!r}: unsupported device type {device.type!r}; use {DEVICE_CHOICES}")
    return device
