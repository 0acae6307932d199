"""Test-time augmentation for any detector: several test scales, each also flipped, merged.

This follows mmdetection 3.x's generic ``DetTTAModel`` (``mmdet/models/test_time_augs/det_tta.py``),
not a Co-DETR recipe: the released Co-DETR has no working TTA (its ``aug_test_bboxes`` raises).
Each view is the image resized to one test scale, flipped or not; the detector runs on it with
its whole post-processing (DINO's Soft-NMS included) and its boxes are mapped back to the
original image (rescaled, then un-flipped). The union of every view's detections is merged
class-wise:

- "nms" (mmdet's TTA configs): class-wise NMS at ``data.tta.iou``, best first;
- "soft_nms": class-wise linear Soft-NMS at ``data.tta.iou`` (mmcv's ``soft_nms`` defaults:
  sigma 0.5, minimum score 1e-3), as mmdet's ``nms=dict(type='soft_nms')``;
- "wbf": weighted box fusion (Solovyev et al. 2021) by the ``ensemble-boxes`` package, each view
  one "model" of equal weight, fused scores averaged over the views (``conf_type='avg'``).

Detections scoring below ``data.tta.min_score`` are left out before the merge; then the best
``max_detections`` are kept (``data.tta.max_detections``, else ``model.max_detections``).

Boxes only: the released Co-DETR's ``aug_test`` merges boxes and returns no masks, so the merged
detections of a model that yields masks have none (a warning says so once).
"""

from __future__ import annotations

import copy
import dataclasses
import warnings
from typing import Any

import torch
from torch import Tensor
from torchvision.ops import batched_nms

from codetr.config import DataConfig, TTAConfig
from codetr.ops.soft_nms import batched_soft_nms
from codetr.structures import Detections

MERGES = ("nms", "soft_nms", "wbf")
MASKS_DROPPED = ("test-time augmentation merges boxes only (as the released Co-DETR's aug_test): the masks are "
                 "dropped; run without --tta / tta=False for masks")


@dataclasses.dataclass(frozen=True)
class View:
    """One test-time view: the data config whose evaluation resize gives its scale, and whether
    the image is flipped horizontally before it."""

    data: DataConfig
    flip: bool


def tta_views(data: DataConfig, tta: TTAConfig) -> list[View]:
    """The views of ``tta``: every scale (outer), unflipped then flipped (inner), as mmdet's
    ``TestTimeAug`` lists them. A scale is the shorter side (``data.test_scale``) for the "detr"
    resize, with ``data.max_size`` capping the longer side, or the canvas side (``data.lsj_size``)
    for "lsj"."""
    key = "lsj_size" if data.augment == "lsj" else "test_scale"
    scales = list(tta.scales) or [getattr(data, key)]
    if not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in scales):
        raise ValueError(f"data.tta.scales must be positive integers, got {tta.scales!r}")
    flips = (False, True) if tta.flip else (False,)
    return [View(dataclasses.replace(data, **{key: s}), flip) for s in scales for flip in flips]


def flip_boxes(boxes: Tensor, width: int) -> Tensor:
    """Mirror (K, 4) xyxy boxes of an image ``width`` pixels wide about its vertical axis."""
    return torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], 1)


def merge_detections(views: list[Detections], size: tuple[int, int], tta: TTAConfig,
                     max_detections: int) -> Detections:
    """Merge the detections of every view (boxes xyxy in pixels of the original image of
    ``size`` (height, width)) scoring at least ``tta.min_score`` by ``tta.merge`` at ``tta.iou``;
    the best ``max_detections``, scores descending."""
    views = [Detections(d.boxes[d.scores >= tta.min_score], d.scores[d.scores >= tta.min_score],
                        d.labels[d.scores >= tta.min_score]) for d in views]
    boxes = torch.cat([d.boxes.float() for d in views])
    scores = torch.cat([d.scores.float() for d in views])
    labels = torch.cat([d.labels for d in views])
    if tta.merge == "nms":
        keep = batched_nms(boxes, scores, labels, tta.iou)[:max_detections]
        return Detections(boxes[keep], scores[keep], labels[keep])
    if tta.merge == "soft_nms":
        keep, new_scores = batched_soft_nms(boxes, scores, labels, tta.iou)
        return Detections(boxes[keep][:max_detections], new_scores[:max_detections], labels[keep][:max_detections])
    if tta.merge == "wbf":
        return _weighted_box_fusion(views, size, tta.iou, max_detections)
    raise ValueError(f"data.tta.merge must be one of {list(MERGES)}, got {tta.merge!r}")


def _weighted_box_fusion(views: list[Detections], size: tuple[int, int], iou: float,
                         max_detections: int) -> Detections:
    """ensemble-boxes' ``weighted_boxes_fusion`` over the views (boxes normalised to [0, 1] by
    the image size and back; boxes without area left out, as it would drop them)."""
    try:
        from ensemble_boxes import weighted_boxes_fusion
    except ImportError:
        raise ImportError("data.tta.merge=wbf needs the package ensemble-boxes: pip install ensemble-boxes") from None
    height, width = size
    scale = torch.tensor([width, height, width, height], dtype=torch.float32)
    boxes_list, scores_list, labels_list = [], [], []
    for det in views:
        normalised = (det.boxes.float().cpu() / scale).clamp(0, 1)
        keep = (normalised[:, 2] > normalised[:, 0]) & (normalised[:, 3] > normalised[:, 1])
        boxes_list.append(normalised[keep].numpy())
        scores_list.append(det.scores.float().cpu()[keep].numpy())
        labels_list.append(det.labels.cpu()[keep].numpy())
    boxes, scores, labels = weighted_boxes_fusion(boxes_list, scores_list, labels_list, iou_thr=iou, conf_type="avg")
    boxes = torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4)[:max_detections] * scale
    return Detections(boxes, torch.as_tensor(scores, dtype=torch.float32)[:max_detections],
                      torch.as_tensor(labels).long()[:max_detections])


class TTADetector:
    """A detector run with test-time augmentation; ``detect`` and ``labels`` behave as the
    wrapped detector's, so ``predict_images``, ``codetr.Detector`` and the evaluation run it.

    ``detector`` is a :class:`codetr.inference.loading.LoadedModel` or a
    :class:`codetr.export.OnnxDetector` (any object with ``cfg``, ``labels()`` and a ``detect``
    that pre-processes with ``self.cfg.data``); ``tta`` defaults to its ``cfg.data.tta``.
    """

    def __init__(self, detector: Any, tta: TTAConfig | None = None) -> None:
        self.detector = detector
        self.cfg = detector.cfg
        self.tta = detector.cfg.data.tta if tta is None else tta
        if self.tta.merge not in MERGES:
            raise ValueError(f"data.tta.merge must be one of {list(MERGES)}, got {self.tta.merge!r}")
        if not 0 <= self.tta.iou <= 1:
            raise ValueError(f"data.tta.iou must be in [0, 1], got {self.tta.iou!r}")
        if not 0 <= self.tta.min_score < 1:
            raise ValueError(f"data.tta.min_score must be in [0, 1), got {self.tta.min_score!r}")
        if self.tta.max_detections is not None and self.tta.max_detections <= 0:
            raise ValueError(f"data.tta.max_detections must be positive or null, got {self.tta.max_detections!r}")
        self.max_detections = self.tta.max_detections or detector.cfg.model.max_detections
        self.views = tta_views(detector.cfg.data, self.tta)
        self._runners = []
        for view in self.views:  # a shallow copy of the detector per view, pre-processing with its data config
            runner = copy.copy(detector)
            runner.cfg = dataclasses.replace(detector.cfg, data=view.data)
            self._runners.append(runner)

    def labels(self) -> tuple[list[str], list[int]]:
        return self.detector.labels()

    def view_detections(self, image: Tensor) -> list[Detections]:
        """Each view's detections in ``image`` (3, H, W) RGB, boxes xyxy in pixels of ``image``."""
        width = image.shape[-1]
        found = []
        for view, runner in zip(self.views, self._runners):
            det = runner.detect(image.flip(-1) if view.flip else image)
            found.append(Detections(flip_boxes(det.boxes, width), det.scores, det.labels) if view.flip else det)
        return found

    def detect(self, image: Tensor) -> Detections:
        """The merged detections of every view in ``image`` (3, H, W) RGB, uint8 or float in
        [0, 1]; boxes xyxy in pixels of ``image``, scores descending; no masks."""
        views = self.view_detections(image)
        if any(det.masks is not None for det in views):
            warnings.warn(MASKS_DROPPED, stacklevel=2)
        return merge_detections(views, tuple(image.shape[-2:]), self.tta, self.max_detections)
