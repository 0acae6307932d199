"""Box helpers not provided by torchvision.ops (use box_convert, box_iou, generalized_box_iou there)."""

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


def rescale_boxes(boxes: Tensor, from_size: tuple[int, int], to_size: tuple[int, int]) -> Tensor:
    """(K, 4) xyxy pixels of an image of ``from_size`` (h, w) -> xyxy pixels of the same image
    resized to ``to_size`` (h, w), clipped to it."""
    (h, w), (to_h, to_w) = from_size, to_size
    scaled = boxes * boxes.new_tensor([to_w / w, to_h / h, to_w / w, to_h / h])
    return scaled.clamp(min=0).minimum(scaled.new_tensor([to_w, to_h, to_w, to_h]))
