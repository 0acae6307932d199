"""Box helpers not provided by torchvision.ops (use box_convert, box_iou, generalized_box_iou there)."""

import torch
from torch import Tensor
from torchvision.ops import box_convert


def box_cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    """(..., 4) cxcywh -> (..., 4) xyxy, in the same units."""
    return box_convert(boxes, "cxcywh", "xyxy")


def box_xyxy_to_cxcywh(boxes: Tensor) -> Tensor:
    """(..., 4) xyxy -> (..., 4) cxcywh, in the same units."""
    return box_convert(boxes, "xyxy", "cxcywh")


def inverse_sigmoid(x: Tensor, eps: float = 1e-5) -> Tensor:
    """logit(x) with x clamped to [0, 1] and both x and 1 - x clamped to at least ``eps``."""
    x = x.clamp(0.0, 1.0)
    return (x.clamp(min=eps) / (1 - x).clamp(min=eps)).log()


def aligned_box_iou(boxes1: Tensor, boxes2: Tensor, eps: float = 1e-6) -> Tensor:
    """IoU of each pair (boxes1[i], boxes2[i]), (N, 4) xyxy each -> (N,); the union is clamped to
    at least ``eps`` (as mmdet's ``bbox_overlaps(..., is_aligned=True)``)."""
    lt = torch.max(boxes1[:, :2], boxes2[:, :2])
    rb = torch.min(boxes1[:, 2:], boxes2[:, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    area1 = (boxes1[:, 2:] - boxes1[:, :2]).prod(-1)
    area2 = (boxes2[:, 2:] - boxes2[:, :2]).prod(-1)
    return inter / (area1 + area2 - inter).clamp(min=eps)


def rescale_boxes(boxes: Tensor, from_size: tuple[int, int], to_size: tuple[int, int],
                  content_size: tuple[int, int] | None = None) -> Tensor:
    """(K, 4) xyxy pixels of a model input of ``from_size`` (h, w) -> xyxy pixels of the image as
    stored, of ``to_size`` (h, w). Boxes are clipped to the model input, then scaled by stored /
    resized size; ``content_size`` (h, w) is the resized image inside a padded canvas (LSJ),
    by default the whole input."""
    (h, w), (to_h, to_w) = from_size, to_size
    content_h, content_w = content_size or from_size
    clipped = boxes.clamp(min=0).minimum(boxes.new_tensor([w, h, w, h]))
    return clipped * boxes.new_tensor([to_w / content_w, to_h / content_h, to_w / content_w, to_h / content_h])
