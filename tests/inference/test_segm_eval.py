"""Mask AP (``segm_*``) beside box AP: pycocotools' and the lvis package's numbers as the reference,
and the evaluation path from a model's masks (pasted into the stored image) to RLE."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from faster_coco_eval import COCO
from PIL import Image

from codetr.config import DataConfig
from codetr.data import build_dataloader
from codetr.data.masks import encode_masks
from codetr.inference.evaluate import (METRIC_NAMES, coco_metrics, dataset_metrics, detection_records, evaluate,
                                      lvis_metrics)
from codetr.models.mask.paste import crop_masks, paste_into_image
from codetr.structures import Batch, Detections

SIZE = (60, 80)  # (height, width) of every image


def _blob(gen: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A random union of two rectangles, at least 3 px on a side."""
    mask = np.zeros((height, width), dtype=bool)
    for _ in range(2):
        x1, y1 = gen.integers(0, width - 12), gen.integers(0, height - 12)
        mask[y1:y1 + gen.integers(3, 30), x1:x1 + gen.integers(3, 40)] = True
    return mask


def _box(mask: np.ndarray) -> list[float]:
    ys, xs = np.nonzero(mask)
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1 - xs.min()), float(ys.max() + 1 - ys.min())]


def _ground_truth(lvis: bool = False, seed: int = 0) -> tuple[dict[str, Any], list[np.ndarray]]:
    """4 images, 3 categories, 3-5 objects each with a mask (polygons for the rectangles-only ones,
    else RLE); one crowd region. LVIS: categories with frequencies, images with negative lists."""
    gen = np.random.default_rng(seed)
    categories = [{"id": c, "name": f"c{c}"} for c in (1, 2, 3)]
    images = [{"id": i, "file_name": f"{i}.png", "height": SIZE[0], "width": SIZE[1]} for i in (1, 2, 3, 4)]
    if lvis:
        for cat, freq in zip(categories, "rcf"):
            cat["frequency"] = freq
        for img in images:
            img.update(neg_category_ids=[], not_exhaustive_category_ids=[])
    annotations, masks = [], []
    for img in images:
        for _ in range(int(gen.integers(3, 6))):
            mask = _blob(gen, *SIZE)
            rle = encode_masks(torch.from_numpy(mask)[None])[0]
            annotations.append({"id": len(annotations) + 1, "image_id": img["id"], "category_id": int(gen.integers(1, 4)),
                                "bbox": _box(mask), "area": float(mask.sum()), "iscrowd": 0, "segmentation": rle})
            masks.append(mask)
    if not lvis:
        annotations[2]["iscrowd"] = 1
    return {"images": images, "categories": categories, "annotations": annotations}, masks


def _results(gt: dict[str, Any], masks: list[np.ndarray], seed: int = 1) -> list[dict[str, Any]]:
    """Each object found with a mask shifted by 0-3 px (some also a wrong class), plus false
    positives; a box and a mask per record, as codetr writes them."""
    gen = np.random.default_rng(seed)
    records = []
    for ann, mask in zip(gt["annotations"], masks):
        shifted = np.roll(mask, (int(gen.integers(0, 4)), int(gen.integers(0, 4))), axis=(0, 1))
        category = ann["category_id"] if gen.random() > 0.2 else 1 + ann["category_id"] % 3
        records.append({"image_id": ann["image_id"], "category_id": category, "bbox": _box(shifted),
                        "score": float(gen.random()), "segmentation": encode_masks(torch.from_numpy(shifted)[None])[0]})
    for img in gt["images"]:
        for _ in range(3):
            mask = _blob(gen, *SIZE)
            records.append({"image_id": img["id"], "category_id": int(gen.integers(1, 4)), "bbox": _box(mask),
                            "score": float(gen.random()), "segmentation": encode_masks(torch.from_numpy(mask)[None])[0]})
    return records


@pytest.mark.parametrize("seed", [0, 1])
def test_segm_metrics_equal_pycocotools(seed):
    coco_reference = pytest.importorskip("pycocotools.coco")
    cocoeval_reference = pytest.importorskip("pycocotools.cocoeval")
    gt, masks = _ground_truth(seed=seed)
    results = _results(gt, masks, seed + 10)
    reference_gt = coco_reference.COCO()
    reference_gt.dataset = copy.deepcopy(gt)
    reference_gt.createIndex()
    reference = cocoeval_reference.COCOeval(reference_gt, reference_gt.loadRes(copy.deepcopy(results)), "segm")
    reference.evaluate()
    reference.accumulate()
    reference.summarize()
    expected = {k: round(float(v) * 100, 3) if v >= 0 else -1.0 for k, v in zip(METRIC_NAMES, reference.stats[:6])}
    ours = coco_metrics(COCO(copy.deepcopy(gt)), copy.deepcopy(results), [1, 2, 3, 4], "segm")
    assert ours == pytest.approx(expected, abs=1e-3)
    assert 10 < ours["AP"] < 90  # neither trivial nor empty
    boxes = coco_metrics(COCO(copy.deepcopy(gt)), copy.deepcopy(results), [1, 2, 3, 4])
    assert boxes != ours  # the boxes are evaluated by boxes (two rectangles: box IoU != mask IoU)


def test_segm_metrics_equal_the_lvis_package(tmp_path, monkeypatch):
    pytest.importorskip("pycocotools")
    lvis = pytest.importorskip("lvis")
    monkeypatch.setattr(np, "float", float, raising=False)  # lvis 0.5.3 still uses the alias numpy 1.24 removed
    gt, masks = _ground_truth(lvis=True, seed=2)
    results = _results(gt, masks, 12)
    gt_file = tmp_path / "lvis.json"
    gt_file.write_text(json.dumps(gt))
    reference_gt = lvis.LVIS(str(gt_file))
    reference = lvis.LVISEval(reference_gt, lvis.LVISResults(reference_gt, copy.deepcopy(results), max_dets=300),
                              iou_type="segm")
    reference.run()
    expected = {k: round(float(v) * 100, 3) if v >= 0 else -1.0 for k, v in reference.get_results().items()
                if not k.startswith("AR")}
    ours = lvis_metrics(COCO(copy.deepcopy(gt)), copy.deepcopy(results), [1, 2, 3, 4], "segm")
    assert ours == pytest.approx(expected, abs=1e-3)


class _Dataset:
    """What dataset_metrics reads of a CocoDetection."""

    def __init__(self, gt: dict[str, Any]) -> None:
        self.coco = COCO(copy.deepcopy(gt))
        self.annotations_file = Path("gt.json")


def test_box_and_mask_metrics_side_by_side_and_a_note_without_ground_truth_masks(capsys):
    gt, masks = _ground_truth()
    results = _results(gt, masks)
    both = dataset_metrics(_Dataset(gt), copy.deepcopy(results), [1, 2, 3, 4])
    assert set(both) == set(METRIC_NAMES) | {f"segm_{k}" for k in METRIC_NAMES}
    assert both["segm_AP"] == coco_metrics(COCO(copy.deepcopy(gt)), copy.deepcopy(results), [1, 2, 3, 4], "segm")["AP"]
    boxes_only = dataset_metrics(_Dataset(gt), [{k: v for k, v in r.items() if k != "segmentation"} for r in results],
                                 [1, 2, 3, 4])
    assert set(boxes_only) == set(METRIC_NAMES) and boxes_only["AP"] == both["AP"]
    for ann in gt["annotations"]:
        del ann["segmentation"]
    capsys.readouterr()
    assert set(dataset_metrics(_Dataset(gt), copy.deepcopy(results), [1, 2, 3, 4])) == set(METRIC_NAMES)
    missing = f"no mask metrics: {len(gt['annotations'])} annotations of gt.json have no 'segmentation'"
    assert missing in capsys.readouterr().out


def test_masks_are_ranked_by_their_own_scores():
    """Records with a ``mask_score`` (the release's box score x predicted IoU) are ranked by it in the segm
    evaluation, as the release's ``_segm2json`` does, and by ``score`` in the bbox one."""
    gt, masks = _ground_truth(seed=4)
    results = _results(gt, masks, 14)
    gen = np.random.default_rng(5)
    scored = [{**r, "mask_score": float(gen.random())} for r in results]
    both = dataset_metrics(_Dataset(gt), copy.deepcopy(scored), [1, 2, 3, 4])
    by_mask_score = [{k: v for k, v in r.items() if k != "mask_score"} | {"score": r["mask_score"]} for r in scored]
    expected = coco_metrics(COCO(copy.deepcopy(gt)), copy.deepcopy(by_mask_score), [1, 2, 3, 4], "segm")
    assert {k: both["segm_" + k] for k in METRIC_NAMES} == expected
    assert expected != coco_metrics(COCO(copy.deepcopy(gt)), copy.deepcopy(results), [1, 2, 3, 4], "segm")
    assert both["AP"] == coco_metrics(COCO(copy.deepcopy(gt)), copy.deepcopy(results), [1, 2, 3, 4])["AP"]
    det = Detections(torch.tensor([[1.0, 2.0, 5.0, 6.0]]), torch.tensor([0.9]), torch.tensor([0]),
                     torch.ones(1, 8, 8, dtype=torch.bool), torch.tensor([0.25]))
    [record] = detection_records(det, 1, [3])
    assert record["score"] == 0.9 and record["mask_score"] == 0.25


class _GroundTruthModel(torch.nn.Module):
    """Predicts each image's targets with score 1: their boxes (input frame) and masks, cropped to the boxes
    at 112 x 112 and pasted into the stored image as the mask branch pastes them."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def predict(self, batch: Batch) -> list[Detections]:
        out = []
        for t, size in zip(batch.targets, batch.image_sizes.tolist()):
            probs = crop_masks(t.masks, t.boxes, torch.arange(len(t.boxes)), 112)
            out.append(Detections(t.boxes, torch.ones(len(t.boxes)), t.labels,
                                  paste_into_image(probs, t.boxes, tuple(size), t)))
        return out


@pytest.mark.parametrize(("augment", "scale"), [("detr", 60), ("detr", 90), ("lsj", 96)])
def test_masks_from_the_model_input_are_evaluated_in_the_stored_image(tmp_path, augment, scale):
    """The model's masks (of boxes in the input frame, resized and for LSJ on a padded canvas) are pasted into
    the stored image: ground truth predicted as such scores (almost) 100 mask AP."""
    gt, _ = _ground_truth(seed=3)
    gt["annotations"] = [a for a in gt["annotations"] if not a["iscrowd"]]
    (tmp_path / "val").mkdir()
    for img in gt["images"]:
        Image.new("RGB", (SIZE[1], SIZE[0]), (90, 90, 90)).save(tmp_path / "val" / img["file_name"])
    (tmp_path / "val.json").write_text(json.dumps(gt))
    cfg = DataConfig(val_images=str(tmp_path / "val"), val_annotations=str(tmp_path / "val.json"), num_workers=0,
                     augment=augment, test_scale=scale, max_size=1000, lsj_size=scale, with_masks=True)
    loader = build_dataloader(cfg, "val", shuffle=False)
    metrics = evaluate(_GroundTruthModel(), loader.dataset, loader)
    assert metrics["AP"] == pytest.approx(100.0, abs=0.5)
    if scale == SIZE[0]:  # no resize: the exact masks
        assert metrics["segm_AP"] == 100.0
    else:  # nearest resize there, the box's crop pasted back: borders move by under a pixel
        assert metrics["segm_AP"] > 90 and metrics["segm_AP50"] == 100.0
