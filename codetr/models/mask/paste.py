"""Instance masks between RoIs and images: ground-truth masks cropped to RoIs (training targets) and
RoI mask probabilities pasted back into the image (inference), as the release does both."""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor

from codetr.ops.boxes import rescale_boxes
from codetr.structures import Target

# Pasting budget: detections x image pixels per grid_sample call (bounds the memory of inference).
PASTE_CHUNK_PIXELS = 1 << 25


def crop_masks(masks: Tensor, boxes: Tensor, gt_index: Tensor, size: int) -> Tensor:
    """Ground-truth masks (N, h, w) bool cropped to RoI boxes (R, 4) xyxy pixels (clipped to the mask)
    and resized to (R, size, size) 0/1 floats: aligned RoIAlign of the mask of each RoI's object
    (``gt_index`` (R,)), binarised at 0.5 (mmdet's ``BitmapMasks.crop_and_resize``)."""
    if not len(boxes):
        return boxes.new_zeros((0, size, size))
    h, w = masks.shape[-2:]
    limits = boxes.new_tensor([w, h, w, h])
    clipped = boxes.detach().clamp(min=0).minimum(limits)
    rois = torch.cat([gt_index[:, None].to(boxes.dtype), clipped], 1)
    resized = torchvision.ops.roi_align(masks[:, None].to(boxes.dtype), rois, (size, size), 1.0, 0, aligned=True)
    return (resized[:, 0] >= 0.5).to(boxes.dtype)


def paste_masks(probs: Tensor, boxes: Tensor, height: int, width: int, threshold: float = 0.5) -> Tensor:
    """RoI mask probabilities (K, S, S) of boxes (K, 4) xyxy pixels -> (K, height, width) bool masks
    of the image: each pixel centre mapped into its box, sampled bilinearly (zero outside the box's
    grid), kept where >= ``threshold`` (the release's ``_do_paste_mask`` + ``mask_thr_binary``)."""
    out = torch.zeros((len(boxes), height, width), dtype=torch.bool, device=probs.device)
    if not len(boxes):
        return out
    step = max(1, PASTE_CHUNK_PIXELS // max(height * width, 1))
    ys = torch.arange(height, device=probs.device, dtype=torch.float32) + 0.5
    xs = torch.arange(width, device=probs.device, dtype=torch.float32) + 0.5
    for start in range(0, len(boxes), step):
        b = boxes[start:start + step].float()
        gy = (ys[None] - b[:, 1:2]) / (b[:, 3:4] - b[:, 1:2]) * 2 - 1  # (n, height)
        gx = (xs[None] - b[:, 0:1]) / (b[:, 2:3] - b[:, 0:1]) * 2 - 1  # (n, width)
        gy, gx = (g.nan_to_num(float("nan"), 0.0, 0.0) for g in (gy, gx))  # an empty box: +-inf -> 0, as released
        grid = torch.stack([gx[:, None, :].expand(-1, height, -1), gy[:, :, None].expand(-1, -1, width)], -1)
        pasted = F.grid_sample(probs[start:start + step, None].float(), grid, align_corners=False)
        out[start:start + step] = pasted[:, 0] >= threshold
    return out


def paste_into_image(probs: Tensor, boxes: Tensor, input_size: tuple[int, int], target: Target,
                     threshold: float = 0.5) -> Tensor:
    """RoI mask probabilities (K, S, S) of boxes (K, 4) xyxy pixels of a model input of ``input_size``
    (h, w) -> (K, H, W) bool masks of the image as stored, ``target.orig_size`` (the input itself when
    that is unknown, (0, 0)): the boxes mapped there as :func:`codetr.ops.boxes.rescale_boxes` maps them
    (``target.content_size``: the resized image inside an LSJ canvas), the probabilities pasted there
    (the release's ``simple_test_mask`` with ``rescale=True``: its ``get_seg_masks`` pastes into
    ``ori_shape`` with the boxes divided by the scale factor)."""
    size = tuple(target.orig_size) if min(target.orig_size) > 0 else tuple(input_size)
    boxes = rescale_boxes(boxes.float(), tuple(input_size), size, target.content_size)
    return paste_masks(probs, boxes, size[0], size[1], threshold)
