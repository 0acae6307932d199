"""LVIS-style evaluation on a tiny hand-made LVIS-format set: hand-computed numbers and the
``lvis`` package's, with a negative and a not-exhaustive category and the 300-detection cap."""

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
from codetr.data import build_dataset
from codetr.inference.evaluate import eval_style, evaluate_images, evaluate_on_val, lvis_metrics
from codetr.structures import Detections

CATEGORIES = [{"id": 1, "name": "rare", "frequency": "r"}, {"id": 2, "name": "common", "frequency": "c"},
              {"id": 3, "name": "frequent", "frequency": "f"}, {"id": 4, "name": "common2", "frequency": "c"}]
# Image 1 lists category 2 as negative (absent) and category 3 as not exhaustively annotated;
# image 2 lists category 1 as negative; image 3 lists nothing.
IMAGES = [{"id": 1, "file_name": "1.png", "width": 100, "height": 100, "neg_category_ids": [2],
           "not_exhaustive_category_ids": [3]},
          {"id": 2, "file_name": "2.png", "width": 100, "height": 100, "neg_category_ids": [1],
           "not_exhaustive_category_ids": []},
          {"id": 3, "file_name": "3.png", "width": 100, "height": 100, "neg_category_ids": [],
           "not_exhaustive_category_ids": []}]
BOXES = [(1, 1, [10, 10, 30, 30]), (1, 3, [50, 50, 40, 40]), (2, 2, [20, 20, 30, 30]), (2, 3, [60, 10, 30, 30]),
         (3, 4, [20, 20, 40, 40])]  # (image, category, xywh): areas 900 (small) and 1600 (medium)
GROUND_TRUTH = {"images": IMAGES, "categories": CATEGORIES,
                "annotations": [{"id": i, "image_id": img, "category_id": cat, "bbox": box, "area": box[2] * box[3]}
                                for i, (img, cat, box) in enumerate(BOXES, start=1)]}


def record(image: int, category: int, box: list[float], score: float) -> dict[str, Any]:
    return {"image_id": image, "category_id": category, "bbox": box, "score": score}


DETECTIONS = [
    # category 1 (rare): its box in image 1, and a better-scored one in image 2, where it is negative:
    # a false positive ranked first, AP 1/2
    record(1, 1, [10, 10, 30, 30], 0.9), record(2, 1, [60, 60, 20, 20], 0.95),
    # category 2 (common): its box, and a better-scored one in image 3, which says nothing about
    # category 2: not evaluated, AP 1
    record(2, 2, [20, 20, 30, 30], 0.6), record(3, 2, [5, 5, 20, 20], 0.99),
    # category 3 (frequent): both boxes, and an unmatched better-scored one in image 1, where
    # category 3 is not exhaustive: ignored, AP 1
    record(1, 3, [50, 50, 40, 40], 0.7), record(1, 3, [0, 60, 30, 30], 0.95), record(2, 3, [60, 10, 30, 30], 0.65),
    # category 4 (common): its box 8 px to the right, IoU 1280 / 1920 = 2/3: matches at IoU 0.50..0.65, AP 4/10
    record(3, 4, [28, 20, 40, 40], 0.8),
]
# AP = mean(1/2, 1, 1, 4/10); AP50 = mean(1/2, 1, 1, 1); AP75 = mean(1/2, 1, 1, 0); APr = 1/2;
# APc = mean(1, 4/10); APf = 1. Small (< 32^2): categories 1, 2, 3 (box of image 2; the 900 px^2
# unmatched box of image 1 is ignored) = mean(1/2, 1, 1); medium: categories 3 (box of image 1) and 4.
EXPECTED = {"AP": 72.5, "AP50": 87.5, "AP75": 62.5, "APs": 83.333, "APm": 70.0, "APl": -1.0,
            "APr": 50.0, "APc": 70.0, "APf": 100.0}

# 300 false positives of category 1 in image 2 (negative there), scored 0.7: with the 300-per-image
# cap, image 2 keeps its 0.95 detection and 299 of them, and loses its category 2 and 3 boxes
# (0.6, 0.65). Category 1: AP 1/2 still (the false positives rank after its box); category 2: 0;
# category 3: recall 1/2 at precision 1, AP 51/101 (recall thresholds 0, 0.01, ..., 0.5); category 4: 4/10.
CROWDED = DETECTIONS + [record(2, 1, [float(i % 70), float(i // 70), 20, 20], 0.7) for i in range(300)]
EXPECTED_CROWDED = {"AP": round(100 * (0.5 + 0 + 51 / 101 + 0.4) / 4, 3), "APr": 50.0, "APc": 20.0,
                    "APf": round(100 * 51 / 101, 3)}


def test_hand_computed_case() -> None:
    assert lvis_metrics(COCO(copy.deepcopy(GROUND_TRUTH)), copy.deepcopy(DETECTIONS), [1, 2, 3]) == EXPECTED


def test_at_most_300_detections_per_image() -> None:
    metrics = lvis_metrics(COCO(copy.deepcopy(GROUND_TRUTH)), copy.deepcopy(CROWDED), [1, 2, 3])
    assert {k: metrics[k] for k in EXPECTED_CROWDED} == EXPECTED_CROWDED


@pytest.mark.parametrize("detections", [DETECTIONS, CROWDED], ids=["federated", "300_cap"])
def test_equals_the_lvis_package(detections: list[dict[str, Any]], tmp_path: Path,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("pycocotools")  # lvis needs it and does not declare it
    lvis = pytest.importorskip("lvis")
    monkeypatch.setattr(np, "float", float, raising=False)  # lvis 0.5.3 still uses the alias numpy 1.24 removed
    LVIS, LVISEval, LVISResults = lvis.LVIS, lvis.LVISEval, lvis.LVISResults

    gt_file = tmp_path / "lvis_val.json"
    gt_file.write_text(json.dumps(GROUND_TRUTH))
    gt = LVIS(str(gt_file))
    reference = LVISEval(gt, LVISResults(gt, copy.deepcopy(detections), max_dets=300), iou_type="bbox")
    reference.run()
    expected = {k: round(float(v) * 100, 3) if v >= 0 else -1.0 for k, v in reference.get_results().items()
                if not k.startswith("AR")}
    ours = lvis_metrics(COCO(copy.deepcopy(GROUND_TRUTH)), copy.deepcopy(detections), [1, 2, 3])
    assert ours == pytest.approx(expected, abs=1e-3)


def write_images(root: Path) -> DataConfig:
    """The LVIS set on disk, image k filled with the value 10 k, as the validation split."""
    (root / "val").mkdir(parents=True)
    for image in IMAGES:
        Image.new("RGB", (100, 100), (10 * image["id"],) * 3).save(root / "val" / image["file_name"])
    (root / "lvis_val.json").write_text(json.dumps(GROUND_TRUTH))
    return DataConfig(val_images=str(root / "val"), val_annotations=str(root / "lvis_val.json"), num_workers=0)


def detect_from_records(image: torch.Tensor) -> Detections:
    """DETECTIONS of the image (told by its pixel value) as a detector's output: xyxy boxes, labels 0..3."""
    image_id = int(image[0, 0, 0]) // 10
    mine = [r for r in DETECTIONS if r["image_id"] == image_id]
    boxes = torch.tensor([r["bbox"] for r in mine], dtype=torch.float32).reshape(-1, 4)
    boxes[:, 2:] += boxes[:, :2]
    return Detections(boxes, torch.tensor([r["score"] for r in mine]), torch.tensor([r["category_id"] - 1 for r in mine]))


def test_lvis_style_is_detected_and_evaluated_through_the_evaluation_path(tmp_path: Path) -> None:
    cfg = write_images(tmp_path)
    dataset = build_dataset(cfg, "val")
    assert eval_style(dataset.coco, "auto", "x") == "lvis"
    assert evaluate_images(detect_from_records, dataset) == EXPECTED
    coco = evaluate_images(detect_from_records, dataset, style="coco")  # COCO rules: no federated filtering
    assert set(coco) == {"AP", "AP50", "AP75", "APs", "APm", "APl"} and coco["AP"] < EXPECTED["AP"]


def test_coco_files_stay_coco_and_bad_settings_are_named(tmp_path: Path) -> None:
    coco_gt = copy.deepcopy(GROUND_TRUTH)
    del coco_gt["categories"][2]["frequency"]
    assert eval_style(COCO(copy.deepcopy(coco_gt)), "auto", "x") == "coco"
    with pytest.raises(ValueError, match="coco_val.json: LVIS evaluation needs the field 'frequency'.*category id 3"):
        eval_style(COCO(coco_gt), "lvis", "coco_val.json")
    cfg = write_images(tmp_path)
    cfg.eval_style = "voc"
    with pytest.raises(ValueError, match="data.eval_style must be one of"):
        evaluate_on_val(None, cfg, None, "weights", detect_from_records)  # type: ignore[arg-type]
