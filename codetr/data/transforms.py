"""Data augmentation with torchvision transforms v2: the DETR policy and large-scale jitter (LSJ).

Transforms are called as ``t(image, {"boxes": BoundingBoxes (N, 4) xyxy, "labels": (N,) int64})``
and return the same structure, boxes following every geometric change of the image. The LSJ
test transform adds ``"content_size"`` to the dict: the (height, width) of the resized image
inside the padded canvas.
"""

from __future__ import annotations

from typing import Any

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from codetr.config import DataConfig

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
LSJ_PAD_VALUE = 114  # pixel value (0-255, before normalisation) of the LSJ canvas padding, as released
AUGMENTS = ("detr", "lsj")


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


class KeepRatioResize(v2.Transform):
    """Resize keeping the aspect ratio so that the longer side becomes ``int(size * ratio)``, with
    ``ratio`` uniform in ``scale_range`` (fixed when both ends are equal): mmdet's
    ``Resize(img_scale=(size, size), ratio_range=scale_range, keep_ratio=True)``. The new height
    and width are rounded to the nearest pixel (mmcv's ``rescale_size``) and the image is resized
    bilinearly without antialiasing (mmcv's cv2 backend).

    torchvision's ``ScaleJitter`` draws the same scale but floors the sizes and does not round
    the scaled side to whole pixels first, so its sizes can be a pixel off the released ones.
    """

    def __init__(self, size: int, scale_range: tuple[float, float] = (1.0, 1.0)) -> None:
        super().__init__()
        if size <= 0 or not 0 < scale_range[0] <= scale_range[1]:
            raise ValueError(f"resize needs size > 0 and 0 < min <= max scale, got {size} and {list(scale_range)}")
        self.size, self.scale_range = size, (float(scale_range[0]), float(scale_range[1]))

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = v2.query_size(flat_inputs)
        low, high = self.scale_range
        ratio = low if low == high else low + float(torch.rand(())) * (high - low)
        factor = int(self.size * ratio) / max(height, width)
        return {"size": [max(1, int(height * factor + 0.5)), max(1, int(width * factor + 0.5))]}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return self._call_kernel(F.resize, inpt, size=params["size"], antialias=False)


class PadToCanvas(v2.Transform):
    """Pad at the bottom and right to a ``size`` x ``size`` canvas with ``fill`` (pixel value of
    the uint8 image), as mmdet's ``Pad(size=(size, size))``; boxes keep their coordinates."""

    def __init__(self, size: int, fill: int = LSJ_PAD_VALUE) -> None:
        super().__init__()
        self.size, self.fill = size, fill

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = v2.query_size(flat_inputs)
        if height > self.size or width > self.size:
            raise ValueError(f"a {height}x{width} image does not fit the {self.size}x{self.size} canvas")
        return {"padding": [0, 0, self.size - width, self.size - height]}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return self._call_kernel(F.pad, inpt, padding=params["padding"], fill=self.fill)


class FilterSmallBoxes(v2.Transform):
    """Drops the boxes (xyxy) whose width or height is not above ``min_size`` pixels, with their
    labels, as mmdet's ``FilterAnnotations(min_gt_bbox_wh)``; called with (image, target dict).
    (torchvision's ``SanitizeBoundingBoxes`` accepts no minimum below 1 px.)"""

    def __init__(self, min_size: float) -> None:
        super().__init__()
        self.min_size = min_size

    def forward(self, image: Any, target: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        boxes = target["boxes"]
        keep = ((boxes[:, 2:] - boxes[:, :2]) > self.min_size).all(1).as_subclass(torch.Tensor)
        return image, {**target, "boxes": tv_tensors.wrap(boxes[keep], like=boxes), "labels": target["labels"][keep]}


class RecordContentSize(v2.Transform):
    """Adds the image's current (height, width) to the target dict as ``"content_size"`` (placed
    before :class:`PadToCanvas`, it tells which part of the canvas is the image)."""

    def forward(self, image: Any, target: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        return image, {**target, "content_size": tuple(v2.query_size([image]))}


def _lsj_transforms(cfg: DataConfig, train: bool) -> list[v2.Transform]:
    """Large-scale jitter on a ``cfg.lsj_size`` square canvas, as the released LSJ configs
    (without copy-paste). train: random keep-ratio resize of the longer side to ``ratio * lsj_size``
    (ratio in ``cfg.lsj_scale_range``), a random crop of at most the canvas (boxes clipped to it,
    emptied boxes removed, crops without boxes allowed), flip, pad to the canvas with 114.
    val: keep-ratio resize of the longer side to the canvas, pad to it with 114."""
    size = cfg.lsj_size
    if not isinstance(size, int) or size <= 0:
        raise ValueError(f"data.lsj_size must be a positive integer, got {size!r}")
    if len(cfg.lsj_scale_range) != 2 or not 0 < cfg.lsj_scale_range[0] <= cfg.lsj_scale_range[1]:
        raise ValueError(f"data.lsj_scale_range must be [min, max] with 0 < min <= max, got {cfg.lsj_scale_range}")
    if not train:
        return [KeepRatioResize(size), RecordContentSize(), PadToCanvas(size)]
    return [
        KeepRatioResize(size, (cfg.lsj_scale_range[0], cfg.lsj_scale_range[1])),
        RandomSizeCrop(size, size),
        FilterSmallBoxes(0.01),  # the released min_gt_bbox_wh: drops the boxes the crop emptied
        v2.RandomHorizontalFlip(0.5),
        PadToCanvas(size),
    ]


def build_transforms(cfg: DataConfig, train: bool) -> v2.Compose:
    """The augmentation policy ``cfg.augment`` (train) or its test-time resize (val), then
    normalisation: output image (3, H, W) float32, normalised with ImageNet mean/std.

    "detr", train: flip (p=0.5); then, with equal chance, either a multi-scale resize (shorter
    side from ``cfg.train_scales``, longer side capped at ``cfg.max_size``) or a resize of the
    shorter side to one of ``cfg.crop_resize_scales`` (longer side capped at
    ``cfg.crop_max_size``), a random crop of size in ``cfg.crop_size`` and the same multi-scale
    resize; boxes are clipped to the image and those made degenerate (width or height < 1 px)
    are removed with their labels.
    "detr", val: shorter side resized to ``cfg.test_scale``, longer side capped at
    ``cfg.max_size`` (as ``v2.Resize``; a cap at or below ``test_scale`` resizes the longer side to it).
    "lsj": see :func:`_lsj_transforms`; every output image is the ``cfg.lsj_size`` square canvas.
    """
    normalize = [v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    if cfg.augment not in AUGMENTS:
        raise ValueError(f"data.augment must be one of {list(AUGMENTS)}, got {cfg.augment!r}")
    if cfg.augment == "lsj":
        return v2.Compose([v2.ToImage(), *_lsj_transforms(cfg, train), *normalize])
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
