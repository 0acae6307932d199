"""What the auxiliary heads share: the exported positive set, anchors and the box coder."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class PositiveSet:
    """What one auxiliary head assigned in one image, for Co-DETR's customized positive queries.

    boxes:        (N, 4) xyxy pixels: the head's anchors (ATSS) or sampled proposals (Faster R-CNN).
    labels:       (N,) int64 assigned class; ``num_classes`` for background.
    target_boxes: (N, 4) xyxy pixels of the assigned ground truth (zeros for background).
    feats:        (N, C) content feature of each box.
    """

    boxes: Tensor
    labels: Tensor
    target_boxes: Tensor
    feats: Tensor


def base_anchors(stride: int, octave_base_scale: float, scales_per_octave: int, ratios: list[float]) -> Tensor:
    """(A, 4) xyxy anchors centred at (0, 0) for one level, ratio-major then scale (mmdet order).

    Sizes are stride * octave_base_scale * 2^(i / scales_per_octave); ratio = h / w."""
    scales = torch.tensor([octave_base_scale * 2 ** (i / scales_per_octave) for i in range(scales_per_octave)])
    h_ratios = torch.tensor(ratios).sqrt()
    w_ratios = 1 / h_ratios
    ws = (stride * w_ratios[:, None] * scales[None, :]).reshape(-1)
    hs = (stride * h_ratios[:, None] * scales[None, :]).reshape(-1)
    return torch.stack([-ws / 2, -hs / 2, ws / 2, hs / 2], -1)


def grid_anchors(base: Tensor, stride: int, height: int, width: int) -> Tensor:
    """(H * W * A, 4) anchors of one level: location-major (row by row), anchor-minor; the
    anchors of location (i, j) are centred at (j * stride, i * stride)."""
    ys, xs = torch.meshgrid(torch.arange(height, dtype=base.dtype, device=base.device) * stride,
                            torch.arange(width, dtype=base.dtype, device=base.device) * stride, indexing="ij")
    shifts = torch.stack([xs, ys, xs, ys], -1).reshape(-1, 1, 4)
    return (shifts + base.to(shifts.device)).reshape(-1, 4)


def valid_locations(height: int, width: int, stride: int, image_size: tuple[int, int], num_base: int,
                    device: torch.device) -> Tensor:
    """(H * W * A,) bool: anchors at locations inside the unpadded image (h, w) of this image."""
    valid_h, valid_w = min(math.ceil(image_size[0] / stride), height), min(math.ceil(image_size[1] / stride), width)
    ys = torch.arange(height, device=device) < valid_h
    xs = torch.arange(width, device=device) < valid_w
    return (ys[:, None] & xs[None, :]).reshape(-1, 1).expand(-1, num_base).reshape(-1)


class DeltaXYWHCoder:
    """Box deltas (dx, dy, dw, dh) relative to reference boxes, scaled by ``stds`` (Faster R-CNN)."""

    def __init__(self, stds: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0)) -> None:
        self.stds = stds
        self.max_ratio = abs(math.log(16 / 1000))

    def encode(self, boxes: Tensor, targets: Tensor) -> Tensor:
        """boxes, targets (..., 4) xyxy -> deltas (..., 4)."""
        pw, ph = boxes[..., 2] - boxes[..., 0], boxes[..., 3] - boxes[..., 1]
        px, py = boxes[..., 0] + pw / 2, boxes[..., 1] + ph / 2
        gw, gh = targets[..., 2] - targets[..., 0], targets[..., 3] - targets[..., 1]
        gx, gy = targets[..., 0] + gw / 2, targets[..., 1] + gh / 2
        deltas = torch.stack([(gx - px) / pw, (gy - py) / ph, (gw / pw).log(), (gh / ph).log()], -1)
        return deltas / deltas.new_tensor(self.stds)

    def decode(self, boxes: Tensor, deltas: Tensor, image_size: tuple[int, int] | None = None) -> Tensor:
        """boxes (..., 4) xyxy, deltas (..., 4) -> xyxy, clipped to image_size (h, w) if given."""
        d = deltas * deltas.new_tensor(self.stds)
        dw, dh = d[..., 2].clamp(-self.max_ratio, self.max_ratio), d[..., 3].clamp(-self.max_ratio, self.max_ratio)
        pw, ph = boxes[..., 2] - boxes[..., 0], boxes[..., 3] - boxes[..., 1]
        px, py = boxes[..., 0] + pw / 2, boxes[..., 1] + ph / 2
        gx, gy = px + pw * d[..., 0], py + ph * d[..., 1]
        gw, gh = pw * dw.exp(), ph * dh.exp()
        out = torch.stack([gx - gw / 2, gy - gh / 2, gx + gw / 2, gy + gh / 2], -1)
        if image_size is not None:
            h, w = image_size
            out = torch.stack([out[..., 0].clamp(0, w), out[..., 1].clamp(0, h),
                               out[..., 2].clamp(0, w), out[..., 3].clamp(0, h)], -1)
        return out
