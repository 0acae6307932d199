"""Instance masks: COCO segmentations decoded to bitmaps and encoded back to RLE, mask boxes, and
masks mapped from a model input back to the image as stored.

Segmentations are read and written with faster-coco-eval's mask API (``faster_coco_eval.core.mask``,
pycocotools' RLE format and functions): codetr already evaluates with faster-coco-eval, so masks need
no other library; pycocotools stays the independent reference of the tests.

A COCO ``segmentation`` is one of: polygons ``[[x1, y1, x2, y2, ...], ...]`` (pixel-edge
coordinates of the image as stored; the parts are merged), uncompressed RLE ``{"size": [h, w],
"counts": [int, ...]}`` or compressed RLE ``{"size": [h, w], "counts": "..."}`` (column-major runs).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from faster_coco_eval.core import mask as coco_mask
from torch import Tensor

MIN_POLYGON_NUMBERS = 6  # three points: fewer make no area (and pycocotools reads four numbers as a box)


def polygon_parts(segmentation: list[Any]) -> list[list[float]]:
    """The parts of a polygon segmentation that make an area: at least three points (six numbers)."""
    return [part for part in segmentation if len(part) >= MIN_POLYGON_NUMBERS]


def rle_runs(counts: str) -> list[int]:
    """The run lengths of a compressed RLE ``counts`` string (pycocotools' format: each number in
    5-bit groups, characters from 48 on, a continuation bit 0x20 and a sign bit 0x10 in the last
    group; from the fourth run on, the difference to the run two before). A ValueError for a
    string that is not one (a character out of range, a number cut off, a negative run):
    pycocotools' C decoder does not check, and writes past the mask on such input."""
    runs: list[int] = []
    position = 0
    while position < len(counts):
        value = shift = 0
        more = True
        while more:
            if position == len(counts):
                raise ValueError("the string ends inside a number")
            code = ord(counts[position]) - 48
            if not 0 <= code < 64:
                raise ValueError(f"character {counts[position]!r} at {position} is not part of the encoding")
            value |= (code & 0x1F) << shift
            more = bool(code & 0x20)
            position += 1
            shift += 5
            if not more and code & 0x10:
                value |= -1 << shift
        if len(runs) > 2:
            value += runs[-2]
        if value < 0:
            raise ValueError(f"run {len(runs)} is negative ({value})")
        runs.append(value)
    return runs


def segmentation_to_rle(segmentation: list[Any] | dict[str, Any], height: int, width: int) -> dict[str, Any]:
    """One compressed RLE (``counts`` bytes) of a COCO segmentation in an image of ``height`` x
    ``width``: polygon parts merged (parts of fewer than three points left out), uncompressed RLE
    compressed, compressed RLE as it is (its ``size`` is not checked here: see :mod:`codetr.data.check`)."""
    if isinstance(segmentation, list):
        parts = polygon_parts(segmentation)
        if not parts:
            return coco_mask.encode(np.zeros((height, width, 1), dtype=np.uint8, order="F"))[0]
        return coco_mask.merge(coco_mask.frPyObjects([[float(v) for v in part] for part in parts], height, width))
    if isinstance(segmentation.get("counts"), list):
        return coco_mask.frPyObjects(segmentation, height, width)
    return segmentation


def decode_segmentation(segmentation: list[Any] | dict[str, Any], height: int, width: int) -> np.ndarray:
    """(height, width) bool mask of a COCO segmentation (see :func:`segmentation_to_rle`)."""
    return coco_mask.decode(segmentation_to_rle(segmentation, height, width)).astype(bool)


def encode_masks(masks: Tensor) -> list[dict[str, Any]]:
    """COCO compressed RLE of each mask of (K, H, W) bool: ``{"size": [H, W], "counts": str}`` (the
    results format of COCO, ``counts`` decoded to text so that it can be written as JSON)."""
    if len(masks) == 0:
        return []
    array = np.asfortranarray(masks.detach().cpu().numpy().astype(np.uint8).transpose(1, 2, 0))
    return [{"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}
            for rle in coco_mask.encode(array)]


def mask_boxes(masks: Tensor) -> Tensor:
    """(N, 4) float xyxy pixel-edge boxes of (N, H, W) masks: the first and one past the last row and
    column holding a pixel (as mmdet's ``BitmapMasks.get_bboxes``); (0, 0, 0, 0) for an empty mask."""
    boxes = torch.zeros((len(masks), 4), dtype=torch.float32)
    if len(masks) == 0:
        return boxes
    columns, rows = masks.any(1), masks.any(2)  # (N, W), (N, H)
    width, height = masks.shape[-1], masks.shape[-2]
    x = torch.arange(width, device=masks.device)
    y = torch.arange(height, device=masks.device)
    filled = columns.any(1)
    x1 = torch.where(columns, x, width).amin(1)
    x2 = torch.where(columns, x, -1).amax(1) + 1
    y1 = torch.where(rows, y, height).amin(1)
    y2 = torch.where(rows, y, -1).amax(1) + 1
    found = torch.stack([x1, y1, x2, y2], 1).float().cpu()
    boxes[filled.cpu()] = found[filled.cpu()]
    return boxes
