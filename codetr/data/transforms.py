"""Data augmentation with torchvision transforms v2: the DETR policy and large-scale jitter (LSJ).

Transforms are called as ``t(image, {"boxes": BoundingBoxes (N, 4) xyxy, "labels": (N,) int64})``
and return the same structure, boxes following every geometric change of the image. Instance
masks, ``"masks": tv_tensors.Mask (N, H, W) bool`` when present, follow the image too (resized
by nearest neighbour, as mmdet's ``BitmapMasks``; padded with False) and are dropped with their
boxes. The LSJ test transform adds ``"content_size"`` to the dict: the (height, width) of the
resized image inside the padded canvas.

``DataConfig.resize`` picks the resize arithmetic: torchvision's, or the released pipeline's
("mmcv": mmcv 1.x ``Resize(keep_ratio=True)`` sizes, cv2 ``INTER_LINEAR`` pixels computed here
in integer arithmetic, mmcv's ``Normalize``), so converted official weights see the same input.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from codetr.config import DataConfig
from codetr.data.masks import mask_boxes

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
LSJ_PAD_VALUE = 114  # pixel value (0-255, before normalisation) of the LSJ canvas padding, as released
AUGMENTS = ("detr", "lsj")
RESIZE_MODES = ("torchvision", "mmcv")
CV2_COEF_BITS = 11  # cv2's INTER_RESIZE_COEF_BITS: interpolation weights in units of 1 / 2048


def mmcv_rescale_size(height: int, width: int, scale: tuple[int, int]) -> tuple[int, int]:
    """(new height, new width) of mmcv 1.x ``rescale_size`` for a keep-ratio resize into ``scale``
    (two sides in any order): factor ``min(max(scale) / max(h, w), min(scale) / min(h, w))``, each
    side ``int(side * factor + 0.5)``."""
    factor = min(max(scale) / max(height, width), min(scale) / min(height, width))
    return int(height * factor + 0.5), int(width * factor + 0.5)


def _cv2_linear_taps(out_size: int, in_size: int, clamp_weights: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Source indices i0, i1 and fixed-point weights w0, w1 (sum 2048) of cv2's INTER_LINEAR along
    one axis: source position ``(d + 0.5) * scale - 0.5`` in float32, ``scale = 1 / (out / in)``.
    Columns (``clamp_weights``) outside the image take the border pixel with full weight; rows keep
    their fraction and clamp only the indices, as cv2 does."""
    scale = 1.0 / (out_size / in_size)
    pos = ((torch.arange(out_size, dtype=torch.float64) + 0.5) * scale - 0.5).float()
    first = torch.floor(pos)
    frac = pos - first
    first = first.long()
    if clamp_weights:
        frac = torch.where((first < 0) | (first >= in_size - 1), torch.zeros_like(frac), frac)
    one = 1 << CV2_COEF_BITS
    w1 = torch.round(frac * one).to(torch.int32)
    w0 = torch.round((1.0 - frac) * one).to(torch.int32)
    return first.clamp(0, in_size - 1), (first + 1).clamp(0, in_size - 1), w0, w1


def resize_bilinear_cv2(image: Tensor, size: tuple[int, int]) -> Tensor:
    """``cv2.resize(image, (w, h), interpolation=cv2.INTER_LINEAR)`` of a uint8 image (..., H, W)
    -> (..., h, w) uint8, bit for bit: half-pixel centres, no antialiasing, 11-bit weights, a
    horizontal pass kept in integers and cv2's vertical rounding ``((w0 * (a >> 4)) >> 16 +
    (w1 * (b >> 4)) >> 16 + 2) >> 2`` (what mmcv 1.x's ``imresize`` computes; checked against
    OpenCV 4.5.5 and 5.0 in the tests when OpenCV is installed)."""
    if image.dtype != torch.uint8:
        raise TypeError(f"resize_bilinear_cv2 needs a uint8 image, got {image.dtype}")
    height, width = image.shape[-2:]
    x0, x1, wx0, wx1 = (t.to(image.device) for t in _cv2_linear_taps(size[1], width, clamp_weights=True))
    y0, y1, wy0, wy1 = (t.to(image.device) for t in _cv2_linear_taps(size[0], height, clamp_weights=False))
    pixels = image.to(torch.int32)
    rows = (pixels.index_select(-1, x0) * wx0 + pixels.index_select(-1, x1) * wx1) >> 4  # (..., H, w), 1 / 128 units
    out = ((rows.index_select(-2, y0) * wy0[:, None]) >> 16) + ((rows.index_select(-2, y1) * wy1[:, None]) >> 16)
    return ((out + 2) >> 2).clamp_(0, 255).to(torch.uint8)  # clamp: cv2's saturate_cast


def _resize(inpt: Any, size: list[int], transform: v2.Transform, mode: str) -> Any:
    """Resize one input of a v2 transform to ``size`` (h, w): uint8 images with cv2's arithmetic
    in "mmcv" mode, everything else (boxes, float images) with torchvision's bilinear without
    antialiasing."""
    image = isinstance(inpt, Tensor) and not isinstance(inpt, (tv_tensors.BoundingBoxes, tv_tensors.Mask))
    if mode != "mmcv" or not image or inpt.dtype != torch.uint8:
        return transform._call_kernel(F.resize, inpt, size=size, antialias=False)
    resized = resize_bilinear_cv2(inpt.as_subclass(Tensor), (size[0], size[1]))
    return tv_tensors.wrap(resized, like=inpt) if isinstance(inpt, tv_tensors.TVTensor) else resized


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
    bilinearly without antialiasing (mmcv's cv2 backend; ``mode="mmcv"``: bit for bit).

    torchvision's ``ScaleJitter`` draws the same scale but floors the sizes and does not round
    the scaled side to whole pixels first, so its sizes can be a pixel off the released ones.
    """

    def __init__(self, size: int, scale_range: tuple[float, float] = (1.0, 1.0), mode: str = "torchvision") -> None:
        super().__init__()
        if size <= 0 or not 0 < scale_range[0] <= scale_range[1]:
            raise ValueError(f"resize needs size > 0 and 0 < min <= max scale, got {size} and {list(scale_range)}")
        self.size, self.scale_range, self.mode = size, (float(scale_range[0]), float(scale_range[1])), mode

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = v2.query_size(flat_inputs)
        low, high = self.scale_range
        ratio = low if low == high else low + float(torch.rand(())) * (high - low)
        side = int(self.size * ratio)
        new_h, new_w = mmcv_rescale_size(height, width, (side, side))
        return {"size": [max(1, new_h), max(1, new_w)]}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return _resize(inpt, params["size"], self, self.mode)


class MmcvMultiScaleResize(v2.Transform):
    """mmcv 1.x ``Resize(img_scale=[(max_size, s) for s in scales], multiscale_mode="value",
    keep_ratio=True)``: a shorter-side target drawn uniformly from ``scales``, the size of
    :func:`mmcv_rescale_size` (rounded; the longer side at most ``max_size``), the image resized as
    cv2 ``INTER_LINEAR`` does, boxes scaled by the new / old size of each axis."""

    def __init__(self, scales: list[int], max_size: int) -> None:
        super().__init__()
        if not scales or min(scales) <= 0 or max_size <= 0:
            raise ValueError(f"resize needs positive scales and max size, got {list(scales)} and {max_size}")
        self.scales, self.max_size = list(scales), max_size

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = v2.query_size(flat_inputs)
        short = self.scales[int(torch.randint(len(self.scales), ()))] if len(self.scales) > 1 else self.scales[0]
        new_h, new_w = mmcv_rescale_size(height, width, (self.max_size, short))
        return {"size": [max(1, new_h), max(1, new_w)]}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return _resize(inpt, params["size"], self, "mmcv")


class MmcvNormalize(v2.Transform):
    """mmcv 1.x ``imnormalize`` of an image (3, H, W) RGB, uint8 or float in [0, 1] (scaled by 255):
    float32 ``x - mean`` (mean rounded to float32, as cv2.subtract converts its scalar), then
    ``* (1 / std)`` in float64 rounded to float32 (cv2.multiply); mean and std are ImageNet's in
    0-255. torchvision's ``Normalize`` after ``/ 255`` agrees with it to a few float32 ulp only."""

    def __init__(self) -> None:
        super().__init__()
        self.mean = torch.tensor([255 * m for m in IMAGENET_MEAN], dtype=torch.float64).float()[:, None, None]
        self.inv_std = (1 / torch.tensor([255 * v for v in IMAGENET_STD], dtype=torch.float64))[:, None, None]

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if not isinstance(inpt, tv_tensors.Image):
            return inpt
        image = inpt.as_subclass(Tensor)
        image = image.float() if image.dtype == torch.uint8 else image.float() * 255
        centred = (image - self.mean.to(image.device)).double()
        return tv_tensors.wrap((centred * self.inv_std.to(image.device)).float(), like=inpt)


class PadToCanvas(v2.Transform):
    """Pad at the bottom and right to a ``size`` x ``size`` canvas with ``fill`` (pixel value of
    the uint8 image; masks are padded with False), as mmdet's ``Pad(size=(size, size))``; boxes keep
    their coordinates."""

    def __init__(self, size: int, fill: int = LSJ_PAD_VALUE) -> None:
        super().__init__()
        self.size, self.fill = size, fill

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = v2.query_size(flat_inputs)
        if height > self.size or width > self.size:
            raise ValueError(f"a {height}x{width} image does not fit the {self.size}x{self.size} canvas")
        return {"padding": [0, 0, self.size - width, self.size - height]}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        fill = 0 if isinstance(inpt, tv_tensors.Mask) else self.fill
        return self._call_kernel(F.pad, inpt, padding=params["padding"], fill=fill)


class FilterSmallBoxes(v2.Transform):
    """Drops the boxes (xyxy) whose width or height is not above ``min_size`` pixels, with their
    labels and masks, as mmdet's ``FilterAnnotations(min_gt_bbox_wh)``; called with (image, target
    dict). (torchvision's ``SanitizeBoundingBoxes`` accepts no minimum below 1 px.)"""

    def __init__(self, min_size: float) -> None:
        super().__init__()
        self.min_size = min_size

    def forward(self, image: Any, target: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        boxes = target["boxes"]
        keep = ((boxes[:, 2:] - boxes[:, :2]) > self.min_size).all(1).as_subclass(torch.Tensor)
        kept = {**target, "boxes": tv_tensors.wrap(boxes[keep], like=boxes), "labels": target["labels"][keep]}
        if "masks" in target:
            kept["masks"] = tv_tensors.wrap(target["masks"][keep], like=target["masks"])
        return image, kept


class BoxesFromMasks(v2.Transform):
    """Replaces each box by the box of its mask (:func:`codetr.data.masks.mask_boxes`; an emptied
    mask gives an empty box), as mmdet's ``RandomCrop(recompute_bbox=True)`` does after cropping
    the masks; without masks in the target dict, nothing changes."""

    def forward(self, image: Any, target: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        if "masks" not in target:
            return image, target
        boxes = mask_boxes(target["masks"].as_subclass(torch.Tensor)).to(target["boxes"].device)
        return image, {**target, "boxes": tv_tensors.wrap(boxes, like=target["boxes"])}


class RecordContentSize(v2.Transform):
    """Adds the image's current (height, width) to the target dict as ``"content_size"`` (placed
    before :class:`PadToCanvas`, it tells which part of the canvas is the image)."""

    def forward(self, image: Any, target: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        return image, {**target, "content_size": tuple(v2.query_size([image]))}


def _lsj_transforms(cfg: DataConfig, train: bool) -> list[v2.Transform]:
    """Large-scale jitter on a ``cfg.lsj_size`` square canvas, as the released LSJ configs (their
    copy-paste: :mod:`codetr.data.copy_paste`). train: random keep-ratio resize of the longer side
    to ``ratio * lsj_size`` (ratio in ``cfg.lsj_scale_range``), a random crop of at most the canvas
    (boxes clipped to it, emptied boxes removed, crops without boxes allowed; with masks, the boxes
    of the boxes kept become their cropped masks' boxes, as the released ``recompute_bbox=True``),
    flip, pad to the canvas with 114. val: keep-ratio resize of the longer side to the canvas, pad
    to it with 114."""
    size = cfg.lsj_size
    if not isinstance(size, int) or size <= 0:
        raise ValueError(f"data.lsj_size must be a positive integer, got {size!r}")
    if len(cfg.lsj_scale_range) != 2 or not 0 < cfg.lsj_scale_range[0] <= cfg.lsj_scale_range[1]:
        raise ValueError(f"data.lsj_scale_range must be [min, max] with 0 < min <= max, got {cfg.lsj_scale_range}")
    if not train:
        return [KeepRatioResize(size, mode=cfg.resize), RecordContentSize(), PadToCanvas(size)]
    recompute = [FilterSmallBoxes(0.0), BoxesFromMasks()] if cfg.with_masks else []
    return [
        KeepRatioResize(size, (cfg.lsj_scale_range[0], cfg.lsj_scale_range[1]), mode=cfg.resize),
        RandomSizeCrop(size, size),
        *recompute,  # the crop's own filter (boxes emptied by it), then the boxes of the cropped masks
        FilterSmallBoxes(0.01),  # the released min_gt_bbox_wh: drops the boxes the crop emptied
        v2.RandomHorizontalFlip(0.5),
        PadToCanvas(size),
    ]


def normalize_transforms(cfg: DataConfig) -> list[v2.Transform]:
    """The normalisation of ``cfg.resize``: a (3, H, W) uint8 image to float32 normalised with
    ImageNet mean / std (mmcv's arithmetic for "mmcv")."""
    if cfg.resize == "mmcv":
        return [MmcvNormalize()]
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]


def build_transforms(cfg: DataConfig, train: bool, normalize: bool = True) -> v2.Compose:
    """The augmentation policy ``cfg.augment`` (train) or its test-time resize (val), then
    normalisation: output image (3, H, W) float32, normalised with ImageNet mean/std (without
    ``normalize``: the uint8 image, for a step before it such as copy-paste).

    "detr", train: flip (p=0.5); then, with equal chance, either a multi-scale resize (shorter
    side from ``cfg.train_scales``, longer side capped at ``cfg.max_size``) or a resize of the
    shorter side to one of ``cfg.crop_resize_scales`` (longer side capped at
    ``cfg.crop_max_size``), a random crop of size in ``cfg.crop_size`` and the same multi-scale
    resize; boxes are clipped to the image and those made degenerate (width or height < 1 px)
    are removed with their labels.
    "detr", val: shorter side resized to ``cfg.test_scale``, longer side capped at
    ``cfg.max_size`` (as ``v2.Resize``; a cap at or below ``test_scale`` resizes the longer side to it;
    "mmcv": mmcv's ``Resize(img_scale=(max_size, test_scale), keep_ratio=True)``).
    "lsj": see :func:`_lsj_transforms`; every output image is the ``cfg.lsj_size`` square canvas.
    ``cfg.resize``: "torchvision" or "mmcv" arithmetic of every resize and of the normalisation.
    """
    if cfg.augment not in AUGMENTS:
        raise ValueError(f"data.augment must be one of {list(AUGMENTS)}, got {cfg.augment!r}")
    if cfg.resize not in RESIZE_MODES:
        raise ValueError(f"data.resize must be one of {list(RESIZE_MODES)}, got {cfg.resize!r}")
    mmcv = cfg.resize == "mmcv"
    normalize = normalize_transforms(cfg) if normalize else []
    if cfg.augment == "lsj":
        return v2.Compose([v2.ToImage(), *_lsj_transforms(cfg, train), *normalize])

    def multi_scale(scales: list[int], max_size: int) -> v2.Transform:
        return MmcvMultiScaleResize(scales, max_size) if mmcv else v2.RandomShortestSize(scales, max_size=max_size)

    if not train:
        if mmcv:
            resize = MmcvMultiScaleResize([cfg.test_scale], cfg.max_size)
        else:  # v2.Resize needs max_size > size; a cap at or below test_scale sets the longer side alone
            resize = (v2.Resize(cfg.test_scale, max_size=cfg.max_size) if cfg.max_size > cfg.test_scale
                      else v2.RandomShortestSize([cfg.test_scale], max_size=cfg.max_size))
        return v2.Compose([
            v2.ToImage(),
            resize,
            v2.ClampBoundingBoxes(),
            *normalize,
        ])
    crop = v2.Compose([
        multi_scale(cfg.crop_resize_scales, cfg.crop_max_size),
        RandomSizeCrop(cfg.crop_size[0], cfg.crop_size[1]),
        multi_scale(cfg.train_scales, cfg.max_size),
    ])
    return v2.Compose([
        v2.ToImage(),
        v2.RandomHorizontalFlip(0.5),
        v2.RandomChoice([multi_scale(cfg.train_scales, cfg.max_size), crop]),
        # Resizing scales boxes by float ratios: a box touching the right/bottom border can end a
        # hair outside the image, and SanitizeBoundingBoxes would drop it. Clamp first.
        v2.ClampBoundingBoxes(),
        v2.SanitizeBoundingBoxes(),
        *normalize,
    ])
