"""COCO and LVIS evaluation with faster-coco-eval (pycocotools- and lvis-compatible numbers): box
AP, and mask AP beside it when the model yields masks.

Metrics are returned in percent (0-100): ``AP``, ``AP50``, ... of the boxes, and with masks the
same names prefixed ``segm_`` (``segm_AP``, ...) of the masks, evaluated on the same result
records (their ``segmentation``, RLE in the image as stored), as mmdet's ``metric=['bbox', 'segm']``.
A metric without any ground truth in its range (e.g. APl on a dataset of small objects) is -1,
following the COCO convention.

LVIS (``data.eval_style``, detected by the categories' ``frequency`` field) is evaluated as the
``lvis`` package's ``LVISEval`` does: at most 300 detections per image (the best by score, over
all categories), AP over at most 300 detections, federated rules per image (a detection of a
category neither annotated in the image nor listed in its ``neg_category_ids`` is not evaluated;
an unmatched detection of a category in its ``not_exhaustive_category_ids`` is ignored), and AP
per frequency group: APr (rare), APc (common), APf (frequent).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from faster_coco_eval import COCO, COCOeval_faster
from torch import Tensor, nn
from torchvision.transforms.v2 import functional as F

from codetr import distributed as dist
from codetr.config import DataConfig
from codetr.data import build_dataloader
from codetr.data.masks import encode_masks
from codetr.ops.boxes import rescale_boxes
from codetr.structures import Batch, Detections

METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")
LVIS_METRIC_NAMES = (*METRIC_NAMES, "APr", "APc", "APf")
EVAL_STYLES = ("auto", "coco", "lvis")
LVIS_MAX_DETECTIONS = 300  # per image, over all categories (lvis' LVISResults and LVISEval)
LVIS_FREQUENCIES = ("r", "c", "f")
SEGM_PREFIX = "segm_"  # mask metrics: segm_AP, segm_AP50, ...


def coco_results(
    detections: Sequence[Detections], batch: Batch, category_ids: Sequence[int]
) -> list[dict[str, Any]]:
    """COCO result records of one batch.

    Boxes (xyxy in the model input) are clipped to the input image (``batch.image_sizes``) and
    divided by the resize scale, ``Target.content_size`` (the resized image inside a padded
    canvas; by default the input image itself) over ``Target.orig_size``, as the released heads
    rescale; written as xywh in the image as stored. (With a padded canvas a box may reach
    beyond the stored image, as released.) Masks are in the image as stored already (the model
    pastes them there, as the release does). Labels are mapped to the dataset's category ids
    (``category_ids[label]``).
    """
    records = []
    for det, (h, w), target in zip(detections, batch.image_sizes.tolist(), batch.targets):
        boxes = rescale_boxes(det.boxes.detach().float().cpu(), (h, w), target.orig_size, target.content_size)
        masks = None if det.masks is None else det.masks.detach().cpu()
        mask_scores = None if det.mask_scores is None else det.mask_scores.detach().float().cpu()
        records += detection_records(Detections(boxes, det.scores, det.labels, masks, mask_scores), target.image_id,
                                     category_ids)
    return records


def detection_records(det: Detections, image_id: int, category_ids: Sequence[int]) -> list[dict[str, Any]]:
    """COCO result records (``image_id``, ``category_id``, ``bbox`` xywh, ``score``, and with
    masks ``segmentation``: compressed RLE, ``counts`` a string; with mask scores ``mask_score``, the
    score of the mask's ``segm`` result) of the detections of one image, boxes xyxy and masks
    (K, H, W) in pixels of the image as stored."""
    xywh = det.boxes.detach().float().cpu().clone()
    xywh[:, 2:] -= xywh[:, :2]
    records = [{"image_id": image_id, "category_id": int(category_ids[label]), "bbox": [round(v, 3) for v in box],
                "score": round(float(score), 5)}
               for box, score, label in zip(xywh.tolist(), det.scores.tolist(), det.labels.tolist())]
    if det.masks is not None:
        for record, rle in zip(records, encode_masks(det.masks)):
            record["segmentation"] = rle
    if det.masks is not None and det.mask_scores is not None:
        for record, score in zip(records, det.mask_scores.tolist()):
            record["mask_score"] = round(float(score), 5)
    return records


def coco_metrics(coco_gt: COCO, results: list[dict[str, Any]], image_ids: Iterable[int],
                 iou_type: str = "bbox") -> dict[str, float]:
    """Evaluate ``results`` on ``image_ids`` of ``coco_gt`` by their boxes (``iou_type`` "bbox") or
    masks ("segm"); prints the 12-number table.

    Returns AP, AP50, AP75, APs, APm, APl in percent.
    """
    lines: list[str] = []
    coco_dt = coco_gt.loadRes(results) if results else _empty_results(coco_gt)
    evaluator = COCOeval_faster(coco_gt, coco_dt, iouType=iou_type, print_function=lines.append)
    evaluator.params.imgIds = sorted(image_ids)
    evaluator.evaluate()
    evaluator.accumulate()
    lines.clear()
    evaluator.summarize()
    table = [line for line in lines if line.lstrip().startswith("Average")]
    print("\n".join(table[:12]))  # the standard COCO table (faster-coco-eval adds AR50, AR75)
    return {name: _percent(value) for name, value in zip(METRIC_NAMES, evaluator.stats[:6])}


def lvis_metrics(lvis_gt: COCO, results: list[dict[str, Any]], image_ids: Iterable[int],
                 iou_type: str = "bbox") -> dict[str, float]:
    """Evaluate ``results`` on ``image_ids`` of the LVIS-format ``lvis_gt`` as the ``lvis``
    package does (see the module docstring), by boxes (``iou_type`` "bbox") or masks ("segm");
    prints the LVIS table.

    Returns AP, AP50, AP75, APs, APm, APl, APr, APc, APf in percent.
    """
    lines: list[str] = []
    results = best_per_image(results, LVIS_MAX_DETECTIONS)
    lvis_dt = lvis_gt.loadRes(results) if results else _empty_results(lvis_gt)
    evaluator = COCOeval_faster(lvis_gt, lvis_dt, iouType=iou_type, lvis_style=True, print_function=lines.append)
    evaluator.params.imgIds = sorted(image_ids)
    evaluator.params.maxDets = [LVIS_MAX_DETECTIONS]
    evaluator.evaluate()
    evaluator.accumulate()
    lines.clear()
    evaluator.summarize()
    print("\n".join(line for line in lines if line.lstrip().startswith("Average Precision")))
    stats = evaluator.stats_as_dict
    keys = ("AP_all", "AP_50", "AP_75", "AP_small", "AP_medium", "AP_large", "APr", "APc", "APf")
    return {name: _percent(stats[key]) for name, key in zip(LVIS_METRIC_NAMES, keys)}


def best_per_image(results: list[dict[str, Any]], limit: int) -> list[dict[str, Any]]:
    """The ``limit`` best-scored result records of each image (over all categories)."""
    by_image: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for record in results:
        by_image[record["image_id"]].append(record)
    return [r for records in by_image.values() for r in sorted(records, key=lambda r: -r["score"])[:limit]]


def eval_style(gt: COCO, style: str, source: Any) -> str:
    """The metrics for the ground truth ``gt`` (read from ``source``, named in errors): ``style``
    ("coco" or "lvis") itself, or for "auto" "lvis" when every category has a ``frequency``
    field, else "coco". LVIS needs every category's ``frequency`` to be "r", "c" or "f"."""
    if style not in EVAL_STYLES:
        raise ValueError(f"data.eval_style must be one of {list(EVAL_STYLES)}, got {style!r}")
    categories = list(gt.dataset["categories"])
    if style == "auto":
        style = "lvis" if categories and all("frequency" in c for c in categories) else "coco"
    if style == "lvis":
        for cat in categories:
            if cat.get("frequency") not in LVIS_FREQUENCIES:
                raise ValueError(f"{source}: LVIS evaluation needs the field 'frequency' (one of "
                                 f"{list(LVIS_FREQUENCIES)}) in every category; category id {cat['id']} has "
                                 f"{cat.get('frequency')!r}")
    return style


def dataset_metrics(dataset: Any, results: list[dict[str, Any]], image_ids: Iterable[int],
                    style: str = "auto") -> dict[str, float]:
    """COCO or LVIS metrics (:func:`eval_style`) of ``results`` on ``image_ids`` of ``dataset``
    (a CocoDetection): of the boxes, and of the masks (``segm_`` names) when the results have
    masks and every annotation of the ground truth a ``segmentation`` (else a printed note)."""
    metrics = lvis_metrics if eval_style(dataset.coco, style, dataset.annotations_file) == "lvis" else coco_metrics
    image_ids = list(image_ids)
    masks = any("segmentation" in r for r in results)  # before loadRes gives box results a box polygon
    found = metrics(dataset.coco, results, image_ids)
    if not masks:
        return found
    missing = sum(ann.get("segmentation") is None for ann in dataset.coco.dataset["annotations"])
    if missing:
        print(f"segm: no mask metrics: {missing} annotations of {dataset.annotations_file} have no 'segmentation'")
        return found
    print("segm:")
    # the masks' own scores rank the segm results (the release's _segm2json: box score x predicted mask IoU)
    segm = [{**r, "score": r["mask_score"]} if "mask_score" in r else r for r in results]
    return {**found, **{SEGM_PREFIX + k: v for k, v in metrics(dataset.coco, segm, image_ids, "segm").items()}}


def _empty_results(coco_gt: COCO) -> COCO:
    res = COCO()
    res.dataset = {"images": list(coco_gt.dataset["images"]), "annotations": [],
                   "categories": list(coco_gt.dataset["categories"])}
    res.createIndex()
    return res


def _percent(value: float) -> float:
    return -1.0 if value < 0 else round(float(value) * 100, 3)


@torch.no_grad()
def evaluate(model: nn.Module, dataset: Any, dataloader: Iterable[Batch], style: str = "auto") -> dict[str, float]:
    """Run ``model.predict`` over ``dataloader`` and evaluate on ``dataset`` (a CocoDetection)
    with COCO or LVIS metrics (``style``, see :func:`eval_style`).

    The model runs on the device of its parameters in eval mode (its mode is restored after).
    With torch.distributed, every process predicts its part and rank 0 evaluates; the other
    ranks return an empty dict.
    """
    detector = getattr(model, "module", model)  # unwrap DistributedDataParallel
    device = next(detector.parameters()).device
    was_training = detector.training
    detector.eval()
    per_image: list[tuple[int, list[dict[str, Any]]]] = []  # (image id, its records)
    try:
        for batch in dataloader:
            batch = batch.to(device)
            records = coco_results(detector.predict(batch), batch, dataset.category_ids)
            per_image += [(t.image_id, [r for r in records if r["image_id"] == t.image_id])
                          for t in batch.targets]
    finally:
        detector.train(was_training)
    return _metrics_on_main(per_image, dataset, style)


@torch.no_grad()
def evaluate_images(detect: Callable[[Tensor], Detections], dataset: Any, style: str = "auto") -> dict[str, float]:
    """Run ``detect`` on every image of ``dataset`` (a CocoDetection) as stored and evaluate, as
    :func:`evaluate`. ``detect`` takes an image (3, H, W) uint8 RGB and returns its detections,
    boxes xyxy in pixels of it (as ``LoadedModel.detect`` and test-time augmentation do). With
    torch.distributed, each process takes every ``world_size``-th image and rank 0 evaluates."""
    per_image = []
    for index in range(dist.rank(), len(dataset), dist.world_size()):
        image_id = dataset.image_ids[index]
        det = detect(F.pil_to_tensor(dataset.load_image(index)))
        per_image.append((image_id, detection_records(det, image_id, dataset.category_ids)))
    return _metrics_on_main(per_image, dataset, style)


def _metrics_on_main(per_image: list[tuple[int, list[dict[str, Any]]]], dataset: Any, style: str) -> dict[str, float]:
    """Gather every process's (image id, result records) on rank 0 and evaluate them there on
    ``dataset`` (:func:`dataset_metrics`); an empty dict on the other ranks."""
    gathered = dist.gather_to_main(per_image)
    if not dist.is_main_process():
        return {}
    unique = dict(gathered)  # a DistributedSampler may repeat images: keep one copy
    return dataset_metrics(dataset, [r for records in unique.values() for r in records], unique, style)


def evaluate_on_val(model: nn.Module, cfg: DataConfig, category_ids: Sequence[int] | None,
                    source: str, detect: Callable[[Tensor], Detections] | None = None) -> dict[str, float]:
    """What ``codetr eval`` computes: :func:`evaluate` on the validation split of ``cfg``, COCO
    or LVIS metrics by ``cfg.eval_style``; with ``detect`` (e.g. test-time augmentation,
    :class:`codetr.inference.tta.TTADetector`), :func:`evaluate_images` with it instead.

    ``category_ids`` are the dataset ids the model was trained for (None: not known); they
    must be the validation set's, else a ValueError names ``source`` (the weights file).
    """
    loader = build_dataloader(cfg, "val", shuffle=False)
    dataset = loader.dataset
    if category_ids is not None and list(category_ids) != list(dataset.category_ids):
        raise ValueError(f"{source} was trained for category ids {list(category_ids)}, but "
                         f"{cfg.val_annotations} has {list(dataset.category_ids)}")
    eval_style(dataset.coco, cfg.eval_style, cfg.val_annotations)  # a bad style or LVIS file fails before inference
    if detect is not None:
        return evaluate_images(detect, dataset, cfg.eval_style)
    return evaluate(model, dataset, loader, cfg.eval_style)
