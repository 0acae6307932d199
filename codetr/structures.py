"""Typed data passed between the parts of codetr.

Box formats are always named:
- ``xyxy`` absolute: (x1, y1, x2, y2) in pixels of the image the tensor belongs to.
- ``cxcywh`` normalised: (cx, cy, w, h) divided by the *unpadded* image size (w, h, w, h),
  as used by the DETR heads.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class Target:
    """Ground truth of one image, in the coordinates of the (transformed) input image.

    boxes:   (N, 4) float, xyxy absolute pixels.
    labels:  (N,) int64, contiguous labels 0..num_classes-1.
    image_id: the dataset's own image id.
    orig_size: (height, width) of the image as stored on disk; (0, 0): unknown (masks at inference are
             then pasted into the input image).
    content_size: (height, width) of the resized image inside the input when the input is a canvas
             padded around it (LSJ test transform), which maps boxes back to ``orig_size``;
             None: the input is the resized image itself (``Batch.image_sizes``).
    masks:   (N, h, w) bool instance masks aligned with ``boxes``, in the same pixel frame (h, w: the
             transformed, unpadded input image), or None for box-only data.
    """

    boxes: Tensor
    labels: Tensor
    image_id: int = -1
    orig_size: tuple[int, int] = (0, 0)
    content_size: tuple[int, int] | None = None
    masks: Tensor | None = None

    def to(self, device: torch.device | str) -> "Target":
        masks = None if self.masks is None else self.masks.to(device)
        return Target(self.boxes.to(device), self.labels.to(device), self.image_id, self.orig_size,
                      self.content_size, masks)


@dataclass
class Batch:
    """A padded batch of images.

    images:      (B, 3, H, W) float, normalised, zero-padded at the bottom/right.
    masks:       (B, H, W) bool, True on padding pixels.
    image_sizes: (B, 2) int64, (height, width) of each unpadded image.
    targets:     one Target per image (empty boxes for background images).
    """

    images: Tensor
    masks: Tensor
    image_sizes: Tensor
    targets: list[Target] = field(default_factory=list)

    def to(self, device: torch.device | str) -> "Batch":
        return Batch(
            self.images.to(device),
            self.masks.to(device),
            self.image_sizes.to(device),
            [t.to(device) for t in self.targets],
        )


@dataclass
class Detections:
    """Detections of one image.

    boxes:  (K, 4) float, xyxy absolute pixels of the unpadded input image
            (the caller rescales to the original image with ``orig_size``).
    scores: (K,) float in [0, 1].
    labels: (K,) int64, contiguous labels 0..num_classes-1.
    masks:  (K, H, W) bool instance masks in the image as stored (``Target.orig_size``; the input image
            when that is unknown): pasted there from the boxes mapped as the caller maps ``boxes``, as the
            release's ``simple_test_mask`` pastes into ``ori_shape``; or None (box-only model).
    mask_scores: (K,) float in [0, 1], the masks' own scores (the released Co-DINO-Inst: box score x
            predicted mask IoU; its segm results are ranked by them), or None (``scores`` rank the masks).
    """

    boxes: Tensor
    scores: Tensor
    labels: Tensor
    masks: Tensor | None = None
    mask_scores: Tensor | None = None


@dataclass
class DetrOutput:
    """Predictions of a DETR decoder for every layer.

    logits:     (L, B, Q, C) raw class logits (sigmoid classification, no background class);
                ``logits[-1]`` is the final prediction.
    boxes:      (L, B, Q, 4) cxcywh normalised boxes in [0, 1].
    enc_logits: (B, S, C) two-stage encoder proposal logits over all S memory tokens, or None.
    enc_boxes:  (B, S, 4) cxcywh normalised encoder proposal boxes, or None.
    """

    logits: Tensor
    boxes: Tensor
    enc_logits: Tensor | None = None
    enc_boxes: Tensor | None = None
