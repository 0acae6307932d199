"""COCO-format data: dataset, DETR transforms, batching and the built-in synthetic dataset."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import torch
from torch.utils.data import DataLoader, DistributedSampler

from codetr.config import DataConfig
from codetr.data.batch import collate
from codetr.data.coco import CocoDetection, transformed_sample
from codetr.data.synthetic import generate_synthetic_coco, synthetic_is_current
from codetr.data.transforms import build_transforms
from codetr.errors import DatasetError

__all__ = [
    "CocoDetection",
    "build_dataloader",
    "build_dataset",
    "build_transforms",
    "collate",
    "generate_synthetic_coco",
    "transformed_sample",
]

SPLITS = ("train", "val")


def _split_paths(cfg: DataConfig, split: str) -> tuple[Path, Path]:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return Path(getattr(cfg, f"{split}_images")), Path(getattr(cfg, f"{split}_annotations"))


def _ensure_synthetic(cfg: DataConfig) -> None:
    """Generate the synthetic dataset into the common parent of the configured paths.

    The paths must follow the generator's layout: ``ROOT/train``, ``ROOT/val``,
    ``ROOT/annotations/instances_{train,val}.json``.
    """
    configured = {key: Path(getattr(cfg, key)) for key in
                  ("train_images", "train_annotations", "val_images", "val_annotations")}
    root = Path(os.path.commonpath([str(p) for p in configured.values()]))
    expected = {
        "train_images": root / "train",
        "train_annotations": root / "annotations" / "instances_train.json",
        "val_images": root / "val",
        "val_annotations": root / "annotations" / "instances_val.json",
    }
    wrong = [f"data.{key}={configured[key]} (expected {path})"
             for key, path in expected.items() if configured[key] != path]
    if wrong:
        raise ValueError("data.synthetic=true needs the generator's layout under one folder: " + "; ".join(wrong))
    generate_synthetic_coco(root, cfg.synthetic_train, cfg.synthetic_val, cfg.synthetic_size, cfg.synthetic_seed)


def build_dataset(cfg: DataConfig, split: str) -> CocoDetection:
    """The dataset of ``split`` ("train" | "val") with its transforms.

    A dataset without any usable box is refused (:class:`codetr.errors.DatasetError`): always for
    "val", for "train" unless ``cfg.allow_empty``.

    With ``cfg.synthetic``, the synthetic dataset is generated first (both splits) at the
    configured paths when its annotation file is missing or was written with other
    ``synthetic_*`` settings (image count, size, seed).
    """
    images, annotations = _split_paths(cfg, split)
    count = cfg.synthetic_train if split == "train" else cfg.synthetic_val
    if cfg.synthetic and not synthetic_is_current(annotations, split, count, cfg.synthetic_size, cfg.synthetic_seed):
        _ensure_synthetic(cfg)
    dataset = CocoDetection(images, annotations, build_transforms(cfg, train=split == "train"), cfg.max_image_pixels)
    if dataset.num_boxes == 0 and (split == "val" or not cfg.allow_empty):
        reason = dataset.report.examples.get("no_annotations", ["no usable box"])[0]
        use = ("training would learn nothing (set data.allow_empty=true to train on images without objects)"
               if split == "train" else "evaluation needs ground-truth boxes (every metric would be -1)")
        raise DatasetError(f"data.{split}_annotations {annotations}: {reason}: {use}")
    return dataset


def build_dataloader(
    cfg: DataConfig, split: str, shuffle: bool | None = None, seed: int = 0
) -> DataLoader:
    """A DataLoader of :class:`codetr.structures.Batch` for ``split``.

    Batches hold ``cfg.batch_size`` images for "train" and ``cfg.eval_batch_size`` for "val".
    ``shuffle`` defaults to True for "train". Shuffling is seeded by ``seed``. When
    torch.distributed is initialised, a DistributedSampler splits the data across processes
    (call ``loader.sampler.set_epoch(epoch)`` each epoch to reshuffle).
    """
    key = "batch_size" if split == "train" else "eval_batch_size"
    batch_size = getattr(cfg, key)
    if not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"data.{key} must be a positive integer, got {batch_size!r}")
    dataset = build_dataset(cfg, split)
    shuffle = split == "train" if shuffle is None else shuffle
    generator = torch.Generator().manual_seed(seed)
    sampler = None
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        sampler = DistributedSampler(dataset, shuffle=shuffle, seed=seed, drop_last=False)
        shuffle = False
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        sampler=sampler,
        num_workers=cfg.num_workers,
        collate_fn=functools.partial(collate, size_divisor=cfg.pad_size_divisor),
        generator=generator,
        drop_last=False,
        persistent_workers=cfg.num_workers > 0,
    )
