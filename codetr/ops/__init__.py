"""Tensor operations: box helpers, multi-scale deformable attention and RoIAlign."""

from codetr.ops.boxes import box_cxcywh_to_xyxy, box_xyxy_to_cxcywh, inverse_sigmoid, rescale_boxes
from codetr.ops.deform_attn import multi_scale_deformable_attn
from codetr.ops.roi_align import roi_align

__all__ = ["box_cxcywh_to_xyxy", "box_xyxy_to_cxcywh", "inverse_sigmoid", "multi_scale_deformable_attn", "rescale_boxes",
           "roi_align"]
