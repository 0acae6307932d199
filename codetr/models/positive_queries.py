"""Customized positive queries (Co-DETR, Sec. 3.3), as in the released code.

Each auxiliary head exports, per image, the boxes it assigned (ATSS: its anchors; Faster R-CNN:
its sampled proposals) with their labels, targets and content features (``PositiveSet``).
Here those become one group of extra decoder queries per head:

1. ``select_positive_queries`` keeps the positives of every image (at most ``max_queries``,
   chosen at random) and pads every image to the same group size — the largest positive count
   in the batch, at least ``min_queries`` — with random negatives of the same head (background
   classification loss, no box loss), or with masked zero boxes when ``zero_padding``.
2. A query embedding turns the boxes into queries, with its own weights per auxiliary head:
   ``PositiveQueryEmbedding`` (Co-Deformable-DETR): a Linear + LayerNorm on the sine embedding of
   the box gives the positional and content parts, plus a projection of the content feature and a
   per-head embedding; ``DinoPositiveQueryEmbedding`` (Co-DINO): a Linear + LayerNorm on the sine
   embedding gives the content only, and DINO's decoder builds the position from the box.

The shared decoder then runs once per head on its group, and the targets are the auxiliary
head's assignment (no Hungarian matching).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torchvision.ops import box_convert

from codetr.models.aux.base import PositiveSet
from codetr.models.transformer.position import proposal_pos_embed
from codetr.ops.boxes import inverse_sigmoid


@dataclass
class PositiveQueries:
    """One padded group of positive queries for a batch (G queries per image).

    reference:      (B, G, 4) cxcywh normalised boxes: the queries' reference points.
    feats:          (B, G, C) content features of the boxes.
    labels:         (B, G) int64 targets; ``num_classes`` means background.
    target_boxes:   (B, G, 4) cxcywh normalised target boxes (meaningful where box_weights > 0).
    label_weights:  (B, G) float, weight of each query's classification loss.
    box_weights:    (B, G) float, 1 on positives, 0 elsewhere.
    self_attn_mask: (B, G, G) bool, True where query i may not attend to key j (zero padding), or None.
    """

    reference: Tensor
    feats: Tensor
    labels: Tensor
    target_boxes: Tensor
    label_weights: Tensor
    box_weights: Tensor
    self_attn_mask: Tensor | None = None


def _random_subset(indices: Tensor, k: int, generator: torch.Generator | None) -> Tensor:
    order = torch.randperm(indices.numel(), generator=generator)[:k].to(indices.device)
    return indices[order]


def select_positive_queries(
    sets: list[PositiveSet],
    image_sizes: Tensor,
    num_classes: int,
    max_queries: int = 300,
    min_queries: int = 9,
    zero_padding: bool = False,
    generator: torch.Generator | None = None,
) -> PositiveQueries:
    """Group the positives of one auxiliary head into padded per-image query sets.

    sets: one PositiveSet per image (boxes and target_boxes xyxy absolute pixels).
    image_sizes: (B, 2) (height, width) of the unpadded images, used to normalise boxes.
    The group size is ``clamp(max positives per image, min_queries, max_queries)``.
    """
    positives = [(s.labels >= 0) & (s.labels < num_classes) for s in sets]
    negatives = [s.labels == num_classes for s in sets]
    size = max([int(p.sum()) for p in positives] + [0])
    size = max(min_queries, min(max_queries, size))

    reference, feats, labels, targets = [], [], [], []
    label_weights = image_sizes.new_zeros((len(sets), size), dtype=torch.float32)
    box_weights = torch.zeros_like(label_weights)
    masks = []
    for i, s in enumerate(sets):
        h, w = (float(v) for v in image_sizes[i])
        scale = s.boxes.new_tensor([w, h, w, h])
        pos = torch.nonzero(positives[i]).squeeze(1)
        if pos.numel() > size:
            pos = _random_subset(pos, size, generator)
        num_pos = pos.numel()
        pad = size - num_pos
        if zero_padding:
            keep = pos
        else:
            neg = _random_subset(torch.nonzero(negatives[i]).squeeze(1), pad, generator)
            keep = torch.cat([pos, neg])
        box = box_convert(s.boxes[keep] / scale, "xyxy", "cxcywh")
        target = box_convert(s.target_boxes[keep] / scale, "xyxy", "cxcywh")
        label = s.labels[keep]
        feat = s.feats[keep]
        missing = size - keep.numel()  # zero padding, or too few negatives to pad with
        if missing:
            box = torch.cat([box, box.new_zeros((missing, 4))])
            target = torch.cat([target, target.new_zeros((missing, 4))])
            label = torch.cat([label, label.new_full((missing,), num_classes)])
            feat = torch.cat([feat, feat.new_zeros((missing, feat.shape[1]))])
        label_weights[i, : size - missing] = 1.0
        box_weights[i, :num_pos] = 1.0
        if zero_padding:
            # Padding may neither be attended to nor attend to real queries; each padding
            # query attends to itself only, so no attention row is fully masked.
            mask = torch.zeros((size, size), dtype=torch.bool, device=box.device)
            mask[:, num_pos:] = True
            mask[num_pos:, :num_pos] = True
            mask.diagonal().fill_(False)
            masks.append(mask)
        reference.append(box)
        feats.append(feat)
        labels.append(label)
        targets.append(target)

    return PositiveQueries(
        reference=torch.stack(reference),
        feats=torch.stack(feats),
        labels=torch.stack(labels),
        target_boxes=torch.stack(targets),
        label_weights=label_weights.to(reference[0].device),
        box_weights=box_weights.to(reference[0].device),
        self_attn_mask=torch.stack(masks) if zero_padding else None,
    )


def _xavier_matrices(module: nn.Module) -> None:
    """As the official transformer init: xavier-uniform for every weight matrix (Linear weights
    and the head embedding); biases and LayerNorms keep PyTorch's defaults."""
    for p in module.parameters():
        if p.dim() > 1:
            nn.init.xavier_uniform_(p)


class PositiveQueryEmbedding(nn.Module):
    """Queries from auxiliary boxes, one set of weights per auxiliary head (Co-Deformable-DETR).

    query_pos, query = split(LN(Linear(PE(box))), d); query += LN(Linear(feat));
    query_pos += head_embed[head]. PE is the 2d-wide sine embedding of the box. ``head_embed`` is one
    scalar per head added to every channel, as released (``nn.Embedding(num_co_heads, 1, 1, embed_dims)``:
    embedding_dim 1, the "bug kept on purpose"; xavier-initialised and indexed directly, so its padding
    index never acts), and it trains as one scalar.
    """

    def __init__(self, d_model: int, num_heads: int) -> None:
        super().__init__()
        self.d_model = d_model
        self.box_proj = nn.ModuleList(nn.Linear(2 * d_model, 2 * d_model) for _ in range(num_heads))
        self.box_norm = nn.ModuleList(nn.LayerNorm(2 * d_model) for _ in range(num_heads))
        self.feat_proj = nn.ModuleList(nn.Linear(d_model, d_model) for _ in range(num_heads))
        self.feat_norm = nn.ModuleList(nn.LayerNorm(d_model) for _ in range(num_heads))
        self.head_embed = nn.Embedding(num_heads, 1)
        _xavier_matrices(self)

    def forward(self, head: int, reference: Tensor, feats: Tensor) -> tuple[Tensor, Tensor]:
        """reference (B, G, 4) cxcywh normalised, feats (B, G, d) -> (query, query_pos), each (B, G, d)."""
        embed = proposal_pos_embed(inverse_sigmoid(reference), self.d_model // 2)
        query_pos, query = self.box_norm[head](self.box_proj[head](embed)).split(self.d_model, dim=-1)
        query = query + self.feat_norm[head](self.feat_proj[head](feats))
        query_pos = query_pos + self.head_embed.weight[head]
        return query, query_pos


class DinoPositiveQueryEmbedding(nn.Module):
    """Queries from auxiliary boxes for Co-DINO, one set of weights per auxiliary head.

    query = LN(Linear(PE(box))) with PE the 2d-wide sine embedding of the box; no content feature
    and no head embedding (the released ``with_coord_feat=False``); the query position is left to
    DINO's decoder, which builds it from the reference box at every layer.
    """

    def __init__(self, d_model: int, num_heads: int) -> None:
        super().__init__()
        self.d_model = d_model
        self.box_proj = nn.ModuleList(nn.Linear(2 * d_model, d_model) for _ in range(num_heads))
        self.box_norm = nn.ModuleList(nn.LayerNorm(d_model) for _ in range(num_heads))
        _xavier_matrices(self)

    def forward(self, head: int, reference: Tensor, feats: Tensor) -> tuple[Tensor, None]:
        """reference (B, G, 4) cxcywh normalised; feats unused -> (query (B, G, d), None)."""
        embed = proposal_pos_embed(inverse_sigmoid(reference), self.d_model // 2)
        return self.box_norm[head](self.box_proj[head](embed)), None
