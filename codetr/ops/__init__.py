"""Tensor operations: box helpers, multi-scale deformable attention, RoIAlign and Soft-NMS."""

from codetr.ops.boxes import aligned_box_iou, box_cxcywh_to_xyxy, box_xyxy_to_cxcywh, inverse_sigmoid, rescale_boxes
from codetr.ops.deform_attn import multi_scale_deformable_attn
from codetr.ops.roi_align import roi_align
from codetr.ops.soft_nms import batched_soft_nms

__all__ = [
    "aligned_box_iou", "batched_soft_nms", "box_cxcywh_to_xyxy", "box_xyxy_to_cxcywh", "inverse_sigmoid",
    "multi_scale_deformable_attn", "rescale_boxes", "roi_align",
]
