"""codetr: Co-DETR (collaborative hybrid assignments training) in pure PyTorch.

``from codetr import Detector`` is the Python API (:mod:`codetr.api`); it is imported on first
use, so that ``import codetr`` (and the ``codetr`` command's start) stays light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["Detector", "Prediction", "__version__"]

if TYPE_CHECKING:
    from codetr.api import Detector, Prediction


def __getattr__(name: str) -> Any:
    if name in ("Detector", "Prediction"):
        from codetr import api

        return getattr(api, name)
    raise AttributeError(f"module 'codetr' has no attribute {name!r}")
