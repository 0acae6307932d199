"""Simple copy-paste (Ghiasi et al. 2021), the augmentation of the released LSJ recipe.

The released LSJ configs wrap the dataset in mmdet's ``MultiImageMixDataset`` with
``CopyPaste(max_num_pasted=100)``: each training image and a second one drawn from the dataset go
through the same LSJ pipeline (resize, crop, flip, pad to the square canvas), then objects of the
second (the source) are pasted onto the first (the destination) with their masks:

1. a number of source objects is drawn uniformly from 0 .. min(N, max_pasted - 1) (N source
   objects), and that many distinct objects are chosen at random;
2. the union of their masks replaces the destination's pixels by the source's;
3. every destination mask loses the pasted pixels; its box becomes the box of what is left;
4. a destination object is kept if each side of its new box moved at most ``box_occluded_thr`` px,
   or if more than ``mask_occluded_thr`` pixels of its mask are left; the others are dropped;
5. the pasted objects are appended (boxes, labels, masks as they were in the source).

Without a chosen object the destination is unchanged.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torchvision import tv_tensors

from codetr.data.masks import mask_boxes
from codetr.structures import Target

MAX_PASTED = 100  # the released max_num_pasted
BOX_OCCLUDED_THR = 10  # px (mmdet's bbox_occluded_thr)
MASK_OCCLUDED_THR = 300  # pixels (mmdet's mask_occluded_thr)


def select_objects(target: Target, max_pasted: int = MAX_PASTED) -> Target:
    """A random subset of the objects of ``target`` (which has masks): its size uniform in
    0 .. min(N, max_pasted - 1), its members distinct, in random order."""
    count = len(target.labels)
    chosen = torch.randperm(count)[:int(torch.randint(min(count + 1, max_pasted), ()))]
    return Target(target.boxes[chosen], target.labels[chosen], target.image_id, target.orig_size,
                  target.content_size, target.masks[chosen])


def paste_objects(image: Tensor, target: Target, src_image: Tensor, src: Target,
                  box_occluded_thr: float = BOX_OCCLUDED_THR,
                  mask_occluded_thr: int = MASK_OCCLUDED_THR) -> tuple[Tensor, Target]:
    """The objects of ``src`` (boxes xyxy, masks (M, H, W) bool, on ``src_image`` (3, H, W)) pasted
    onto ``image`` (3, H, W) with ``target``: steps 2-5 of the module docstring. Both images must
    have the same size (both on the LSJ canvas)."""
    if image.shape != src_image.shape:
        raise ValueError(f"copy-paste needs images of one size, got {tuple(image.shape)} and {tuple(src_image.shape)}")
    if len(src.labels) == 0:
        return image, target
    pasted = src.masks.any(0)  # (H, W)
    masks = target.masks & ~pasted
    boxes = mask_boxes(masks).to(target.boxes)
    kept = ((boxes - target.boxes).abs() <= box_occluded_thr).all(1) | (masks.sum((1, 2)) > mask_occluded_thr)
    mixed = torch.where(pasted, src_image, image)
    return mixed, Target(torch.cat([boxes[kept], src.boxes.to(boxes)]), torch.cat([target.labels[kept], src.labels]),
                         target.image_id, target.orig_size, target.content_size,
                         torch.cat([masks[kept], src.masks]))


class CopyPaste:
    """The copy-paste mix of :class:`codetr.data.CocoDetection` (its ``mix``): called with the
    destination sample and a source sample, each (image (3, H, W) uint8, Target with masks), both
    before normalisation; returns the mixed sample with ``finish`` (the normalisation) applied to
    its image."""

    def __init__(self, finish: Callable[[Tensor], Tensor], max_pasted: int = MAX_PASTED) -> None:
        self.finish = finish
        self.max_pasted = max_pasted

    def __call__(self, dst: tuple[Tensor, Target], src: tuple[Tensor, Target]) -> tuple[Tensor, Target]:
        if dst[1].masks is None or src[1].masks is None:
            raise ValueError("copy-paste needs instance masks (data.with_masks: true)")
        image, target = paste_objects(dst[0], dst[1], src[0], select_objects(src[1], self.max_pasted))
        return self.finish(tv_tensors.Image(image)).as_subclass(Tensor), target
