"""Region proposal network: the first stage of the Faster R-CNN auxiliary head."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import batched_nms

from codetr.models.aux.base import DeltaXYWHCoder, base_anchors, grid_anchors, valid_locations
from codetr.models.assigners import MaxIoUAssigner, RandomSampler
from codetr.structures import Target


class RPNHead(nn.Module):
    """3x3 conv + ReLU, then objectness (A) and box deltas (4A) per location; 9 anchors
    (3 scales from octave base 4, ratios 0.5/1/2). Max-IoU 0.7/0.3 (low-quality matches on),
    256 random samples at 1/2 positive, BCE + L1 normalised by the samples."""

    def __init__(self, channels: int = 256, strides: list[int] | None = None, loss_scale: float = 1.0,
                 octave_base_scale: float = 4.0, scales_per_octave: int = 3,
                 ratios: tuple[float, ...] = (0.5, 1.0, 2.0)) -> None:
        super().__init__()
        self.strides, self.loss_scale = strides or [8, 16, 32, 64, 128], loss_scale
        base = [base_anchors(s, octave_base_scale, scales_per_octave, list(ratios)) for s in self.strides]
        self.num_base = base[0].shape[0]
        self.register_buffer("_base", torch.stack(base), persistent=False)
        self.rpn_conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.rpn_cls = nn.Conv2d(channels, self.num_base, 1)
        self.rpn_reg = nn.Conv2d(channels, self.num_base * 4, 1)
        for m in (self.rpn_conv, self.rpn_cls, self.rpn_reg):
            nn.init.normal_(m.weight, std=0.01)
            nn.init.zeros_(m.bias)
        self.coder = DeltaXYWHCoder((1.0, 1.0, 1.0, 1.0))
        self.assigner = MaxIoUAssigner(0.7, 0.3, 0.3, match_low_quality=True)
        self.sampler = RandomSampler(256, 0.5, add_gt_as_proposals=False)

    def forward(self, feats: list[Tensor]) -> tuple[Tensor, Tensor, Tensor, list[int]]:
        """-> objectness logits (B, N), deltas (B, N, 4), anchors (N, 4) xyxy over all levels
        (location-major, anchor-minor), and anchors per level."""
        logits, deltas, anchors, counts = [], [], [], []
        for level, x in enumerate(feats):
            h = F.relu(self.rpn_conv(x))
            batch, _, height, width = x.shape
            logits.append(self.rpn_cls(h).permute(0, 2, 3, 1).reshape(batch, -1))
            deltas.append(self.rpn_reg(h).permute(0, 2, 3, 1).reshape(batch, -1, 4))
            anchors.append(grid_anchors(self._base[level], self.strides[level], height, width))
            counts.append(anchors[-1].shape[0])
        return torch.cat(logits, 1), torch.cat(deltas, 1), torch.cat(anchors), counts

    def loss(self, logits: Tensor, deltas: Tensor, anchors: Tensor, feats: list[Tensor], image_sizes: Tensor,
             targets: list[Target]) -> dict[str, Tensor]:
        """``rpn.loss_cls`` (BCE) and ``rpn.loss_bbox`` (L1 on deltas), both over the samples."""
        cls_losses, box_losses, num_samples = [], [], 0
        for b, target in enumerate(targets):
            valid = torch.cat([valid_locations(x.shape[-2], x.shape[-1], s, tuple(image_sizes[b].tolist()),
                                               self.num_base, x.device) for x, s in zip(feats, self.strides)])
            idx = torch.nonzero(valid).squeeze(1)
            assignment = self.assigner(anchors[idx], target.boxes)
            sample = self.sampler(anchors[idx], assignment, target.boxes)
            chosen, gt = idx[sample.index], sample.gt
            is_pos = gt >= 0
            cls_losses.append(F.binary_cross_entropy_with_logits(logits[b, chosen], is_pos.float(), reduction="sum"))
            if is_pos.any():
                wanted = self.coder.encode(anchors[chosen[is_pos]], target.boxes[gt[is_pos]])
                box_losses.append((deltas[b, chosen[is_pos]] - wanted).abs().sum())
            # as released (mmdet's anchor-head targets): no positive, or no negative, counts as one
            num_samples += max(int(is_pos.sum()), 1) + max(int((~is_pos).sum()), 1)
        norm = num_samples
        loss_bbox = torch.stack(box_losses).sum() if box_losses else deltas.sum() * 0
        return {"rpn.loss_cls": torch.stack(cls_losses).sum() / norm * self.loss_scale,
                "rpn.loss_bbox": loss_bbox / norm * self.loss_scale}

    @torch.no_grad()
    def proposals(self, logits: Tensor, deltas: Tensor, anchors: Tensor, counts: list[int], image_sizes: Tensor,
                  pre_nms: int, max_per_image: int = 1000, iou_thr: float = 0.7) -> list[Tensor]:
        """Per image: per level the top ``pre_nms`` anchors by objectness, decoded and clipped,
        NMS within each level, the best ``max_per_image`` overall. -> list of (P, 4) xyxy."""
        out = []
        for b in range(logits.shape[0]):
            size = tuple(image_sizes[b].tolist())
            boxes, scores, levels, start = [], [], [], 0
            for level, count in enumerate(counts):
                s, top = logits[b, start:start + count].sigmoid().topk(min(pre_nms, count))
                boxes.append(self.coder.decode(anchors[start + top], deltas[b, start + top], size))
                scores.append(s)
                levels.append(torch.full_like(top, level))
                start += count
            boxes, scores, levels = torch.cat(boxes), torch.cat(scores), torch.cat(levels)
            keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
            boxes, scores, levels = boxes[keep], scores[keep], levels[keep]
            keep = batched_nms(boxes, scores, levels, iou_thr)[:max_per_image]
            out.append(boxes[keep])
        return out
