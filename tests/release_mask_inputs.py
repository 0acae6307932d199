"""The fixed inputs of the mask-branch parity comparison with the released Co-DINO-Inst (shared by
``bench/release_reference/record_mask.py``, in the release's environment, and
tests/models/test_mask_release_parity.py), so it needs nothing but torch.

Sizes: the released instance config's branch at a small width (``CHANNELS``), ``NUM_CLASSES`` classes
and a narrow mask IoU FC (``IOU_FC``); everything else (stages, dilations, RoI levels, loss weights) as
released. Weights come from :func:`release_parity.release_tensor` by their release names.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

CHANNELS = 32
NUM_CLASSES = 3
IOU_FC = 64
STRIDES = (4, 8, 16, 32, 64)  # the mask RoI extractor's featmap_strides (the semantic map: the first)
FCN_STRIDES = (8, 16, 32, 64)  # the Co-Deformable-DETR mask config's RoI head
CANVAS = (256, 288)  # the padded training batch (h, w)
# test time: (input h, w), (original h, w): scale factors 0.64 and 1.6 (the release's img_shape / ori_shape)
TEST_IMAGES = (((96, 128), (150, 200)), ((112, 144), (70, 90)))


def feature_maps(batch: int, height: int, width: int, seed: int, strides: tuple[int, ...] = STRIDES) -> list[Tensor]:
    """Encoder levels (batch, CHANNELS, ceil(height / s), ceil(width / s)) for each stride s, N(0, 1)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, CHANNELS, math.ceil(height / s), math.ceil(width / s), generator=g) for s in strides]


def _grid(height: int, width: int) -> tuple[Tensor, Tensor]:
    return torch.meshgrid(torch.arange(height) + 0.5, torch.arange(width) + 0.5, indexing="ij")


def _objects(height: int, width: int, shapes: list[tuple[str, tuple[float, ...]]]) -> Tensor:
    """(N, height, width) bool masks of ellipses (cx, cy, rx, ry), rectangles (x1, y1, x2, y2) and
    triangles (x1, y1, x2, y2: the lower-left half of that box), on pixel centres."""
    ys, xs = _grid(height, width)
    masks = []
    for kind, p in shapes:
        if kind == "ellipse":
            masks.append(((xs - p[0]) / p[2]) ** 2 + ((ys - p[1]) / p[3]) ** 2 <= 1)
        elif kind == "rect":
            masks.append((xs >= p[0]) & (xs < p[2]) & (ys >= p[1]) & (ys < p[3]))
        else:
            inside = (xs >= p[0]) & (xs < p[2]) & (ys >= p[1]) & (ys < p[3])
            masks.append(inside & ((xs - p[0]) / (p[2] - p[0]) <= (ys - p[1]) / (p[3] - p[1])))
    return torch.stack(masks) if masks else torch.zeros(0, height, width, dtype=torch.bool)


def _candidates(boxes: Tensor, height: int, width: int, g: torch.Generator, extra: int = 4) -> Tensor:
    """The detached DETR predictions that are the RoI candidates (K, 5): xyxy pixels clamped to the
    image, and a score. Three jittered copies of each object's box (most overlap it by IoU >= 0.5, some
    not) and ``extra`` boxes anywhere, at fractional coordinates."""
    out = []
    for box in boxes:
        size = (box[2:] - box[:2]).repeat(2)
        for spread in (0.08, 0.15, 0.4):
            out.append(box + (torch.rand(4, generator=g) * 2 - 1) * spread * size)
    for _ in range(extra):
        x1, y1 = torch.rand(2, generator=g) * torch.tensor([width * 0.7, height * 0.7])
        w, h = 8 + torch.rand(2, generator=g) * torch.tensor([width * 0.4, height * 0.4])
        out.append(torch.stack([x1, y1, x1 + w, y1 + h]))
    cand = torch.stack(out)
    cand = torch.stack([cand[:, 0].clamp(0, width), cand[:, 1].clamp(0, height),
                        cand[:, 2].clamp(0, width), cand[:, 3].clamp(0, height)], 1)
    return torch.cat([cand, torch.rand(len(cand), 1, generator=g)], 1)


def train_inputs() -> dict:
    """The training batch on the CANVAS: three images (the first the whole canvas, the second smaller, the
    third without objects). Per image: ``sizes`` (h, w), ``masks`` (N, h, w) bool, ``boxes`` (N, 4)
    xyxy pixels (a box may be looser than its mask, as an annotated box is), ``labels`` (N,),
    ``candidates`` (K, 5); and ``maps``, the encoder levels of the batch."""
    g = torch.Generator().manual_seed(31)
    images = [  # objects on RoI levels 0, 1 and 2 (floor(log2(sqrt(area) / 56)))
        ((256, 288), [("ellipse", (50.0, 44.0, 30.0, 22.5)), ("rect", (96.0, 60.0, 250.0, 200.0)),
                      ("tri", (10.0, 20.0, 270.0, 250.0))], [[20.0, 21.5, 80.5, 66.5], [95.0, 58.75, 251.0, 200.0],
                                                             [10.0, 20.0, 270.0, 250.0]], [0, 2, 1]),
        ((200, 240), [("ellipse", (100.0, 40.0, 25.0, 30.0)), ("tri", (5.0, 30.0, 170.0, 190.0))],
         [[75.0, 10.0, 125.0, 70.0], [4.25, 29.5, 170.0, 190.0]], [1, 1]),
        ((96, 128), [], [], []),
    ]
    out = {"sizes": [], "masks": [], "boxes": [], "labels": [], "candidates": []}
    for (h, w), shapes, boxes, labels in images:
        boxes = torch.tensor(boxes).reshape(-1, 4)
        out["sizes"].append((h, w))
        out["masks"].append(_objects(h, w, shapes))
        out["boxes"].append(boxes)
        out["labels"].append(torch.tensor(labels, dtype=torch.int64))
        out["candidates"].append(_candidates(boxes, h, w, g, extra=4 if len(boxes) else 6))
    out["maps"] = feature_maps(len(images), *CANVAS, seed=32)
    return out


def inference_inputs() -> list[dict]:
    """Per test image: ``input_size`` and ``orig_size`` (h, w), ``scale`` (input / original, the same on
    both axes), ``maps`` (its encoder levels, batch 1), the final detections ``boxes`` (K, 4) xyxy pixels of
    the input (one at the image border, one a few pixels small), ``scores`` (K,) descending, ``labels`` (K,)."""
    g = torch.Generator().manual_seed(41)
    out = []
    for i, ((h, w), (oh, ow)) in enumerate(TEST_IMAGES):
        k = 6
        x1y1 = torch.rand(k, 2, generator=g) * torch.tensor([w * 0.6, h * 0.6])
        wh = 10 + torch.rand(k, 2, generator=g) * torch.tensor([w * 0.4, h * 0.4])
        boxes = torch.cat([x1y1, x1y1 + wh], 1)
        boxes[0] = torch.tensor([0.0, h * 0.3, w * 0.45, float(h)])  # on the border
        boxes[1, 2:] = boxes[1, :2] + torch.tensor([3.5, 4.25])  # a few pixels
        boxes = torch.minimum(boxes, torch.tensor([w, h, w, h], dtype=torch.float32))
        scores = torch.sort(torch.rand(k, generator=g), descending=True).values
        labels = torch.randint(0, NUM_CLASSES, (k,), generator=g)
        out.append({"input_size": (h, w), "orig_size": (oh, ow), "scale": h / oh, "boxes": boxes, "scores": scores,
                    "labels": labels, "maps": feature_maps(1, h, w, seed=42 + i)})
    return out
