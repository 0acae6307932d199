"""Contrastive denoising queries of DINO (Co-DINO's ``CdnQueryGenerator`` and its DN targets).

Every ground-truth box of the batch is copied into ``num_groups`` groups; each group holds one
positive copy (corners moved by less than the noise scale, to be reconstructed) and one negative
copy (corners moved by one to two times the noise scale, to be classified as background) of every
box. The copies are decoded beside the matching queries, with an attention mask that keeps the
groups and the matching queries from seeing the answers of the other groups.

Layout of the D = 2 * max_gt * num_groups denoising slots of one image (max_gt: the largest
number of boxes of an image in the batch): group g occupies slots [2 g max_gt, 2 (g + 1) max_gt);
its first max_gt slots are the positive copies, the next max_gt the negative copies; box j of the
image sits at offset j of both halves, and the slots j >= N_b of an image with N_b < max_gt boxes
are padding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from codetr.ops.boxes import box_cxcywh_to_xyxy, box_xyxy_to_cxcywh, inverse_sigmoid


@dataclass
class DenoisingGroups:
    """Denoising queries of a batch and their fixed (unmatched) loss targets.

    query: (B, D, d) label embedding of the noised labels (zeros on padding slots).
    reference: (B, D, 4) noised boxes, cxcywh normalised, sigmoid space (0.5 on padding slots).
    attn_mask: (D + Q, D + Q) bool, True = blocked; the D denoising queries first, then the Q matching ones.
    labels: (B, D) int64 class targets; num_classes (background) on negative and padding slots.
    target_boxes: (B, D, 4) cxcywh normalised ground truth of the positive slots, zeros elsewhere.
    label_weights: (B, D) float, 1 on every slot (negatives and padding included, as released).
    box_weights: (B, D) float, 1 on positive slots, 0 elsewhere.
    num_groups: number of groups.
    """

    query: Tensor
    reference: Tensor
    attn_mask: Tensor
    labels: Tensor
    target_boxes: Tensor
    label_weights: Tensor
    box_weights: Tensor
    num_groups: int


def denoising_attn_mask(num_denoising: int, group_size: int, num_matching: int, device: torch.device) -> Tensor:
    """(D + Q, D + Q) bool self-attention mask, True = blocked.

    Matching queries cannot see any denoising query; a denoising query cannot see the other
    groups but sees its own group and every matching query (as released).
    """
    mask = torch.zeros(num_denoising + num_matching, num_denoising + num_matching, dtype=torch.bool, device=device)
    mask[num_denoising:, :num_denoising] = True
    group = torch.arange(num_denoising, device=device) // group_size
    mask[:num_denoising, :num_denoising] = group[:, None] != group[None, :]
    return mask


class ContrastiveDenoising(nn.Module):
    """Builds the contrastive denoising groups of a batch (dynamic number of groups).

    num_dn_queries: budget of positive copies: num_groups = max(num_dn_queries // max_gt, 1).
    label_noise: a copy's label is replaced by a uniformly drawn class with probability
        label_noise / 2 (the draw may give back the true class, so fewer labels actually change).
    box_noise: each xyxy corner coordinate moves by box_noise * (w or h) / 2 times a random factor
        in (-1, 1) for positive copies and in (-2, -1] U [1, 2) for negative copies.
    """

    class_layers = ("label_embedding",)  # follow the number of classes (codetr.models.base)

    def __init__(self, num_classes: int, d_model: int, num_dn_queries: int = 100,
                 label_noise: float = 0.5, box_noise: float = 1.0) -> None:
        super().__init__()
        if num_dn_queries < 1:
            raise ValueError(f"num_dn_queries must be >= 1, got {num_dn_queries}")
        self.num_classes = num_classes
        self.num_dn_queries = num_dn_queries
        self.label_noise = label_noise
        self.box_noise = box_noise
        # num_classes rows: no "unknown" class embedding (the released head's choice)
        self.label_embedding = nn.Embedding(num_classes, d_model)

    def num_groups(self, max_gt: int) -> int:
        """Number of groups for a batch whose largest image has ``max_gt`` boxes."""
        return max(self.num_dn_queries // max_gt, 1) if max_gt > 0 else 1

    def forward(self, labels: list[Tensor], boxes: list[Tensor], num_matching: int,
                generator: torch.Generator | None = None) -> DenoisingGroups | None:
        """labels: per image (N_b,) int64; boxes: per image (N_b, 4) cxcywh normalised.

        Returns None when no image of the batch has a ground-truth box.
        """
        if len(labels) != len(boxes):
            raise ValueError(f"denoising: {len(labels)} label tensors but {len(boxes)} box tensors")
        for b, (lab, box) in enumerate(zip(labels, boxes)):
            if box.ndim != 2 or box.shape[-1] != 4 or lab.shape != box.shape[:1]:
                raise ValueError(f"denoising: image {b} has labels {tuple(lab.shape)} and boxes {tuple(box.shape)}, "
                                 "expected (N,) and (N, 4)")
        counts = [len(lab) for lab in labels]
        max_gt = max(counts, default=0)
        if max_gt == 0:
            return None
        gt_labels = torch.cat(labels).long()
        gt_boxes = torch.cat(boxes)
        if gt_labels.min() < 0 or gt_labels.max() >= self.num_classes:
            raise ValueError(f"denoising: labels must lie in [0, {self.num_classes}), got "
                             f"[{int(gt_labels.min())}, {int(gt_labels.max())}]")
        device, batch_size = gt_boxes.device, len(labels)
        num_groups = self.num_groups(max_gt)
        num_copies = 2 * num_groups  # copy k: positive when k is even, negative when odd

        noisy_labels = self._noisy_labels(gt_labels, num_copies, generator)
        noisy_boxes = self._noisy_boxes(gt_boxes, num_copies, generator)

        # slot of copy k of box j of image b: k * max_gt + j
        image = torch.cat([torch.full((n,), b, dtype=torch.long, device=device) for b, n in enumerate(counts)])
        within = torch.cat([torch.arange(n, device=device) for n in counts])
        slot = torch.arange(num_copies, device=device)[:, None] * max_gt + within
        image = image.expand_as(slot)
        num_dn = num_copies * max_gt

        embedding = self.label_embedding(noisy_labels)
        query = embedding.new_zeros(batch_size, num_dn, embedding.shape[-1]).index_put((image, slot), embedding)
        # padding slots carry zero logits in the released code, hence 0.5 here
        reference = gt_boxes.new_full((batch_size, num_dn, 4), 0.5)
        reference[image, slot] = noisy_boxes

        positive = slot[0::2]
        targets = gt_labels.new_full((batch_size, num_dn), self.num_classes)
        targets[image[0::2], positive] = gt_labels.expand_as(positive)
        target_boxes = gt_boxes.new_zeros(batch_size, num_dn, 4)
        target_boxes[image[0::2], positive] = gt_boxes.expand(num_groups, -1, -1)
        box_weights = gt_boxes.new_zeros(batch_size, num_dn)
        box_weights[image[0::2], positive] = 1.0
        return DenoisingGroups(
            query=query,
            reference=reference,
            attn_mask=denoising_attn_mask(num_dn, 2 * max_gt, num_matching, device),
            labels=targets,
            target_boxes=target_boxes,
            label_weights=gt_boxes.new_ones(batch_size, num_dn),
            box_weights=box_weights,
            num_groups=num_groups,
        )

    def _noisy_labels(self, gt_labels: Tensor, num_copies: int, generator: torch.Generator | None) -> Tensor:
        """(T,) labels -> (num_copies, T): each replaced by a uniform class with probability label_noise / 2."""
        copies = gt_labels.expand(num_copies, -1)
        shape, device = copies.shape, gt_labels.device
        chosen = torch.rand(shape, generator=generator, device=device) < self.label_noise * 0.5
        drawn = torch.randint(0, self.num_classes, shape, generator=generator, device=device)
        return torch.where(chosen, drawn, copies)

    def _noisy_boxes(self, gt_boxes: Tensor, num_copies: int, generator: torch.Generator | None) -> Tensor:
        """(T, 4) cxcywh normalised -> (num_copies, T, 4) noised cxcywh normalised (sigmoid space)."""
        copies = gt_boxes.expand(num_copies, -1, -1)
        if self.box_noise > 0:
            shape, device = copies.shape, gt_boxes.device
            half_size = gt_boxes[:, 2:].repeat(1, 2) / 2  # (w/2, h/2, w/2, h/2)
            sign = torch.randint(0, 2, shape, generator=generator, device=device).to(gt_boxes.dtype) * 2 - 1
            factor = torch.rand(shape, generator=generator, device=device, dtype=gt_boxes.dtype)
            factor[1::2] += 1.0  # negatives: [1, 2)
            corners = box_cxcywh_to_xyxy(copies) + sign * factor * half_size * self.box_noise
            copies = box_xyxy_to_cxcywh(corners.clamp(0.0, 1.0))
        # the released queries are logits (eps 1e-3) that the decoder sigmoids back: a negative copy whose
        # corners crossed over (width or height < 0) thereby gets width / height ~1e-3
        return inverse_sigmoid(copies, eps=1e-3).sigmoid()
