"""DETR data augmentation with torchvision transforms v2.

Transforms are called as ``t(image, {"boxes": BoundingBoxes (N, 4) xyxy, "labels": (N,) int64})``
and return the same structure, boxes following every geometric change of the image.
"""

from __future__ import annotations

from typing import Any

import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from codetr.config import DataConfig

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


class RandomSizeCrop(v2.Transform):
    """Crop a random region whose height and width are drawn independently from
    ``[min_size, max_size]`` (absolute pixels, clipped to the image), at a random position.

    Boxes partly inside the crop are clipped to it; boxes outside become degenerate (remove
    them with ``SanitizeBoundingBoxes``). Same as DETR's ``RandomSizeCrop`` and mmdet's
    ``RandomCrop(crop_type="absolute_range")``.
    """

    def __init__(self, min_size: int, max_size: int) -> None:
        super().__init__()
        if not 0 < min_size <= max_size:
            raise ValueError(f"crop size range must satisfy 0 < min <= max, got [{min_size}, {max_size}]")
        self.min_size = min_size
        self.max_size = max_size

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = v2.query_size(flat_inputs)
        h = int(torch.randint(min(self.min_size, height), min(self.max_size, height) + 1, ()))
        w = int(torch.randint(min(self.min_size, width), min(self.max_size, width) + 1, ()))
        top = int(torch.randint(0, height - h + 1, ()))
        left = int(torch.randint(0, width - w + 1, ()))
        return {"top": top, "left": left, "height": h, "width": w}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return F.crop(inpt, **params)


def build_transforms(cfg: DataConfig, train: bool) -> v2.Compose:
    """The DETR augmentation policy (train) or the test-time resize (val), then normalisation.

    train: flip (p=0.5); then, with equal chance, either a multi-scale resize (shorter side from
    ``cfg.train_scales``, longer side capped at ``cfg.max_size``) or a resize of the shorter
    side to one of ``cfg.crop_resize_scales`` (longer side capped at ``cfg.crop_max_size``), a random crop of size in
    ``cfg.crop_size`` and the same multi-scale resize; boxes are clipped to the image and those
    made degenerate (width or height < 1 px) are removed with their labels.
    val: shorter side resized to ``cfg.test_scale``, longer side capped at ``cfg.max_size`` (as
    ``v2.Resize``; a cap at or below ``test_scale`` resizes the longer side to it).
    Output image: (3, H, W) float32, normalised with ImageNet mean/std.
    """
    normalize = [v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    if not train:
        # v2.Resize needs max_size > size; a cap at or below test_scale sets the longer side alone
        resize = (v2.Resize(cfg.test_scale, max_size=cfg.max_size) if cfg.max_size > cfg.test_scale
                  else v2.RandomShortestSize([cfg.test_scale], max_size=cfg.max_size))
        return v2.Compose([
            v2.ToImage(),
            resize,
            v2.ClampBoundingBoxes(),
            *normalize,
        ])
    multi_scale = v2.RandomShortestSize(cfg.train_scales, max_size=cfg.max_size)
    crop = v2.Compose([
        v2.RandomShortestSize(cfg.crop_resize_scales, max_size=cfg.crop_max_size),
        RandomSizeCrop(cfg.crop_size[0], cfg.crop_size[1]),
        v2.RandomShortestSize(cfg.train_scales, max_size=cfg.max_size),
    ])
    return v2.Compose([
        v2.ToImage(),
        v2.RandomHorizontalFlip(0.5),
        v2.RandomChoice([multi_scale, crop]),
        # Resizing scales boxes by float ratios: a box touching the right/bottom border can end a
        # hair outside the image, and SanitizeBoundingBoxes would drop it. Clamp first.
        v2.ClampBoundingBoxes(),
        v2.SanitizeBoundingBoxes(),
        *normalize,
    ])
