"""The data section the end-to-end tests share: a 64 px built-in synthetic dataset."""

from pathlib import Path
from typing import Any


def synthetic_data(root: Path) -> dict[str, Any]:
    """``data`` config keys for 4 training and 2 validation synthetic images of 64 px under
    ``root`` (generated on first use), at matching small scales."""
    return {"train_images": str(root / "train"), "train_annotations": str(root / "annotations/instances_train.json"),
            "val_images": str(root / "val"), "val_annotations": str(root / "annotations/instances_val.json"),
            "synthetic": True, "synthetic_train": 4, "synthetic_val": 2, "synthetic_size": 64,
            "train_scales": [64], "max_size": 80, "crop_resize_scales": [64], "crop_size": [48, 64],
            "test_scale": 64, "batch_size": 2, "num_workers": 0}
