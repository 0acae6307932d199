"""Batching of variable-size detection samples."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from codetr.structures import Batch, Target


def collate(samples: Sequence[tuple[Tensor, Target]], size_divisor: int = 1) -> Batch:
    """Pad images (3, H_i, W_i) at the bottom/right with zeros to the largest H, W of the batch,
    rounded up to a multiple of ``size_divisor`` (mmdet's ``Pad(size_divisor=...)``).

    Returns a Batch: images (B, 3, H, W), masks (B, H, W) True on padding, image_sizes (B, 2)
    int64 (h, w) of the unpadded images, and the targets unchanged (xyxy absolute boxes).
    """
    if not samples:
        raise ValueError("collate needs at least one sample")
    images = [image for image, _ in samples]
    height = math.ceil(max(image.shape[-2] for image in images) / size_divisor) * size_divisor
    width = math.ceil(max(image.shape[-1] for image in images) / size_divisor) * size_divisor
    batch = images[0].new_zeros((len(images), images[0].shape[0], height, width))
    masks = torch.ones((len(images), height, width), dtype=torch.bool)
    for i, image in enumerate(images):
        h, w = image.shape[-2:]
        batch[i, :, :h, :w] = image
        masks[i, :h, :w] = False
    sizes = torch.tensor([image.shape[-2:] for image in images], dtype=torch.int64)
    return Batch(batch, masks, sizes, [target for _, target in samples])
