"""Test-time augmentation: views mapped back to the original image, the merge rules, any detector,
``codetr eval --tta`` / ``predict --tta`` and ``Detector.predict(..., tta=True)``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from scipy import ndimage
from torch import nn
from torchvision.ops import box_iou

from codetr import Detector
from codetr.cli import main
from codetr.config import Config, DataConfig, ModelConfig, TTAConfig
from codetr.inference.loading import LoadedModel
from codetr.inference.tta import TTADetector, flip_boxes, merge_detections, tta_views
from codetr.structures import Batch, Detections

pytestmark = pytest.mark.usefixtures("one_thread")

# Two bright rectangles (xyxy, pixels) on a dark 96 x 128 (H x W) image, placed asymmetrically.
OBJECTS = torch.tensor([[10.0, 20.0, 40.0, 50.0], [70.0, 60.0, 110.0, 80.0]])


class BlobDetector(nn.Module):
    """A detector whose output is known: one box (label 0) around each connected bright region
    of the unpadded input, in input pixels; the score grows with the input width (0.5 + width / 1000),
    so a larger scale's detection is the better one."""

    def __init__(self) -> None:
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(1))

    def predict(self, batch: Batch) -> list[Detections]:
        out = []
        for image, (h, w) in zip(batch.images, batch.image_sizes.tolist()):
            regions, _ = ndimage.label((image[:, :h, :w].mean(0) > 0).numpy())
            boxes = [[s[1].start, s[0].start, s[1].stop, s[0].stop] for s in ndimage.find_objects(regions)]
            boxes_t = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
            out.append(Detections(boxes_t, torch.full((len(boxes),), 0.5 + w / 1000), torch.zeros(len(boxes),
                                                                                                  dtype=torch.int64)))
        return out


def blob_image() -> torch.Tensor:
    image = torch.zeros(3, 96, 128, dtype=torch.uint8)
    for x1, y1, x2, y2 in OBJECTS.int().tolist():
        image[:, y1:y2, x1:x2] = 255
    return image


def blob_model(tta: TTAConfig, augment: str = "detr", max_detections: int = 100) -> LoadedModel:
    data = DataConfig(augment=augment, test_scale=64, max_size=256, lsj_size=128, tta=tta)
    return LoadedModel(BlobDetector().eval(), Config(model=ModelConfig(num_classes=1, max_detections=max_detections),
                                                     data=data), ["blob"], [1])


def by_x(det: Detections) -> torch.Tensor:
    return det.boxes[det.boxes[:, 0].argsort()]


def test_flip_boxes() -> None:
    boxes = torch.tensor([[10.0, 20.0, 40.0, 50.0]])
    assert flip_boxes(boxes, 128).tolist() == [[88.0, 20.0, 118.0, 50.0]]
    assert torch.equal(flip_boxes(flip_boxes(boxes, 128), 128), boxes)


@pytest.mark.parametrize("augment, scales", [("detr", [64, 96]), ("lsj", [96, 128])])
def test_every_view_maps_back_to_the_original_image(augment: str, scales: list[int]) -> None:
    detector = TTADetector(blob_model(TTAConfig(scales=scales, flip=True), augment))
    assert [(v.flip, v.data.lsj_size if augment == "lsj" else v.data.test_scale) for v in detector.views] == [
        (False, scales[0]), (True, scales[0]), (False, scales[1]), (True, scales[1])]
    views = detector.view_detections(blob_image())
    for det in views:
        # rescaled and un-flipped: the rectangles of the original image, within the resize's blur
        assert torch.allclose(by_x(det), OBJECTS, atol=2.5), by_x(det)
    for plain, flipped in zip(views[0::2], views[1::2]):  # the flipped view's boxes, flipped back, are the plain view's
        assert torch.allclose(by_x(plain), by_x(flipped), atol=2.5)


def test_a_detection_found_in_every_view_is_merged_to_one() -> None:
    detector = TTADetector(blob_model(TTAConfig(scales=[64, 96], flip=True)))
    image = blob_image()
    views = detector.view_detections(image)
    assert [len(v.scores) for v in views] == [2, 2, 2, 2]
    merged = detector.detect(image)
    assert len(merged.scores) == 2
    assert torch.allclose(by_x(merged), OBJECTS, atol=2.5)
    best = max(float(v.scores.max()) for v in views)  # the 96-scale views' score (input width 128)
    assert best == pytest.approx(0.5 + 128 / 1000) and torch.allclose(merged.scores, torch.full((2,), best))


def test_max_detections() -> None:
    image = blob_image()
    assert len(TTADetector(blob_model(TTAConfig(scales=[64, 96]), max_detections=1)).detect(image).scores) == 1
    assert len(TTADetector(blob_model(TTAConfig(scales=[64, 96], max_detections=1))).detect(image).scores) == 1
    assert len(TTADetector(blob_model(TTAConfig(scales=[64, 96]))).detect(image).scores) == 2


def greedy_nms(boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, iou: float) -> list[int]:
    """Reference: per label, repeatedly keep the best remaining box and drop those overlapping it."""
    kept = []
    for i in scores.argsort(descending=True).tolist():
        if all(labels[j] != labels[i] or box_iou(boxes[i:i + 1], boxes[j:j + 1]).item() <= iou for j in kept):
            kept.append(i)
    return kept


def random_views(generator: torch.Generator, n_views: int, n: int, classes: int) -> list[Detections]:
    views = []
    for _ in range(n_views):
        xy = torch.rand(n, 2, generator=generator) * 80
        wh = 5 + torch.rand(n, 2, generator=generator) * 30
        views.append(Detections(torch.cat([xy, xy + wh], 1), torch.rand(n, generator=generator),
                                torch.randint(0, classes, (n,), generator=generator)))
    return views


def test_nms_merge_equals_greedy_class_wise_nms_over_the_union() -> None:
    generator = torch.Generator().manual_seed(0)
    views = random_views(generator, 3, 40, 3)
    boxes, scores, labels = (torch.cat([getattr(v, f) for v in views]) for f in ("boxes", "scores", "labels"))
    reference = greedy_nms(boxes, scores, labels, 0.5)
    assert 25 < len(reference) < 120  # some boxes suppressed, more than max_detections left
    merged = merge_detections(views, (120, 120), TTAConfig(merge="nms", iou=0.5), max_detections=25)
    assert len(merged.scores) == 25
    assert torch.equal(merged.boxes, boxes[reference[:25]]) and torch.equal(merged.labels, labels[reference[:25]])
    assert torch.equal(merged.scores, scores[reference[:25]])


def test_soft_nms_merge_decays_overlapping_boxes_of_one_class() -> None:
    a = Detections(torch.tensor([[0.0, 0.0, 10.0, 10.0]]), torch.tensor([0.9]), torch.tensor([0]))
    b = Detections(torch.tensor([[0.0, 0.0, 10.0, 12.0], [0.0, 0.0, 10.0, 10.0]]), torch.tensor([0.8, 0.7]),
                   torch.tensor([0, 1]))
    merged = merge_detections([a, b], (20, 20), TTAConfig(merge="soft_nms", iou=0.5), max_detections=10)
    # IoU(a, b0) = 100 / 120 >= 0.5: b0's score x (1 - IoU); b1 is another class and keeps its score
    assert merged.labels.tolist() == [0, 1, 0]
    assert torch.allclose(merged.scores, torch.tensor([0.9, 0.7, 0.8 * (1 - 100 / 120)]))
    assert torch.equal(merged.boxes[2], b.boxes[0])


def test_wbf_merge_fuses_boxes_across_views() -> None:
    pytest.importorskip("ensemble_boxes")
    one = Detections(torch.tensor([[10.0, 10.0, 30.0, 30.0], [60.0, 60.0, 80.0, 80.0]]), torch.tensor([0.9, 0.8]),
                     torch.tensor([0, 1]))
    two = Detections(torch.tensor([[12.0, 10.0, 32.0, 30.0]]), torch.tensor([0.6]), torch.tensor([0]))
    merged = merge_detections([one, two], (100, 200), TTAConfig(merge="wbf", iou=0.55), max_detections=10)
    # IoU of the two class-0 boxes 360 / 440: one cluster, its box the score-weighted mean, its score
    # the mean over the 2 views; the class-1 box is found by one view of 2: its score halved
    assert merged.labels.tolist() == [0, 1]
    assert torch.allclose(merged.scores, torch.tensor([0.75, 0.4]), atol=1e-6)
    fused = (0.9 * one.boxes[0] + 0.6 * two.boxes[0]) / 1.5
    assert torch.allclose(merged.boxes, torch.stack([fused, one.boxes[1]]), atol=1e-3)


def test_min_score_keeps_low_scoring_duplicates_out_of_the_fusion() -> None:
    pytest.importorskip("ensemble_boxes")
    found = Detections(torch.tensor([[10.0, 10.0, 30.0, 30.0]]), torch.tensor([0.9]), torch.tensor([0]))
    duplicates = Detections(torch.tensor([[11.0, 10.0, 31.0, 30.0]] * 3), torch.tensor([0.05, 0.04, 0.03]),
                            torch.tensor([0, 0, 0]))
    views = [found, Detections(torch.cat([found.boxes, duplicates.boxes]), torch.cat([found.scores, duplicates.scores]),
                               torch.cat([found.labels, duplicates.labels]))]
    # one cluster of 5 boxes: the mean score (0.9 + 0.9 + 0.05 + 0.04 + 0.03) / 5, capped at 2 views of 2
    diluted = merge_detections(views, (100, 100), TTAConfig(merge="wbf", iou=0.55), max_detections=10)
    assert torch.allclose(diluted.scores, torch.tensor([1.92 / 5]), atol=1e-6)
    kept = merge_detections(views, (100, 100), TTAConfig(merge="wbf", iou=0.55, min_score=0.1), max_detections=10)
    assert torch.allclose(kept.scores, torch.tensor([0.9]), atol=1e-6)
    assert torch.allclose(kept.boxes, found.boxes, atol=1e-3)
    # the same floor for the other merges (at IoU 0.95 the found boxes merge, the duplicates are apart)
    nms = TTAConfig(merge="nms", iou=0.95)
    assert merge_detections(views, (100, 100), nms, max_detections=10).scores.tolist() == pytest.approx([0.9, 0.05])
    nms.min_score = 0.5
    assert merge_detections(views, (100, 100), nms, max_detections=10).scores.tolist() == pytest.approx([0.9])


def test_bad_settings_are_named() -> None:
    with pytest.raises(ValueError, match="data.tta.merge"):
        TTADetector(blob_model(TTAConfig(merge="vote")))
    with pytest.raises(ValueError, match="data.tta.scales"):
        tta_views(DataConfig(), TTAConfig(scales=[0]))
    with pytest.raises(ValueError, match="data.tta.iou"):
        TTADetector(blob_model(TTAConfig(iou=1.5)))
    with pytest.raises(ValueError, match="data.tta.max_detections"):
        TTADetector(blob_model(TTAConfig(max_detections=0)))
    with pytest.raises(ValueError, match="data.tta.min_score"):
        TTADetector(blob_model(TTAConfig(min_score=1.0)))


@pytest.mark.parametrize("config", ["deformable_detr_tiny", "dino_tiny", "co_dino_tiny", "conditional_detr_tiny",
                                    "dab_detr_tiny"])
def test_any_detector(config: str) -> None:
    torch.manual_seed(0)
    det = Detector(config, device="cpu")
    det.cfg.data.test_scale, det.cfg.data.max_size = 64, 96
    image = torch.randint(0, 256, (3, 60, 90), dtype=torch.uint8)
    loaded = det._torch("test")
    # one unflipped view at the config's scale: the plain detections, through the NMS merge
    single = TTADetector(loaded, TTAConfig(flip=False, merge="nms", iou=0.5)).detect(image)
    plain = loaded.detect(image)
    keep = greedy_nms(plain.boxes, plain.scores, plain.labels, 0.5)
    assert torch.equal(single.boxes, plain.boxes[keep]) and torch.equal(single.scores, plain.scores[keep])
    # two scales, flipped too: at most max_detections boxes inside the image
    tta = TTADetector(loaded, TTAConfig(scales=[48, 64], flip=True))
    assert len(tta.views) == 4
    merged = tta.detect(image)
    assert 0 < len(merged.scores) <= det.cfg.model.max_detections
    assert bool((merged.boxes >= 0).all()) and bool((merged.boxes[:, [0, 2]] <= 90).all())
    assert bool((merged.boxes[:, [1, 3]] <= 60).all()) and bool((merged.scores[:-1] >= merged.scores[1:]).all())
    predictions = det.predict(image, score_thr=0.0, tta=True)
    assert torch.equal(predictions[0].boxes, TTADetector(loaded).detect(image).boxes)


@pytest.mark.slow
def test_eval_and_predict_with_tta_on_synthetic_data(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    synth = tmp_path / "synth"
    cfg = {
        "base": "deformable_detr_tiny",
        "data": {"train_images": str(synth / "train"), "train_annotations": str(synth / "annotations/instances_train.json"),
                 "val_images": str(synth / "val"), "val_annotations": str(synth / "annotations/instances_val.json"),
                 "synthetic": True, "synthetic_train": 2, "synthetic_val": 2, "synthetic_size": 64,
                 "train_scales": [64], "max_size": 96, "crop_resize_scales": [64], "crop_size": [48, 64],
                 "test_scale": 64, "batch_size": 2, "num_workers": 0, "tta": {"scales": [48, 64]}},
        "train": {"epochs": 1, "max_iters": 1, "device": "cpu", "log_every": 1},
    }
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "run"
    assert main(["train", str(config), "--out", str(out)]) == 0
    weights = str(out / "model.safetensors")
    capsys.readouterr()
    assert main(["eval", str(config), "--weights", weights, "--tta"]) == 0
    assert "metrics_tta.json" in capsys.readouterr().out
    metrics = json.loads((out / "metrics_tta.json").read_text())
    assert set(metrics) == {"AP", "AP50", "AP75", "APs", "APm", "APl"} and 0 <= metrics["AP"] <= 100
    det = Detector(config, weights, device="cpu")
    assert det.evaluate(tta=True) == metrics  # the same numbers from Python
    # One unflipped view at the test scale, NMS at IoU 1 (removes nothing): the plain evaluation.
    assert main(["eval", str(config), "--weights", weights]) == 0
    assert main(["eval", str(config), "--weights", weights, "--tta", "data.tta.scales=[64]", "data.tta.flip=false",
                 "data.tta.iou=1.0"]) == 0
    assert json.loads((out / "metrics_tta.json").read_text()) == json.loads((out / "metrics.json").read_text())
    assert main(["eval", str(config), "--weights", weights, "--tta", "data.tta.merge=vote"]) == 2
    assert "data.tta.merge" in capsys.readouterr().err

    assert main(["predict", str(synth / "val"), "--weights", weights, "--out", str(tmp_path / "pred"), "--tta",
                 "--score-thr", "0"]) == 0
    records = json.loads((tmp_path / "pred" / "predictions.json").read_text())
    first = sorted((synth / "val").glob("*.png"))[0]
    expected = det.predict(first, score_thr=0.0, tta=True)[0]
    assert len([r for r in records if r["file_name"] == first.name]) == len(expected) > 0


@pytest.mark.slow
def test_an_onnx_model_runs_with_tta(tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    config = tmp_path / "small.yaml"
    config.write_text(yaml.safe_dump({"base": "deformable_detr_tiny", "model": {"transformer": {"enc_layers": 1,
                                      "dec_layers": 2}}, "data": {"test_scale": 64, "max_size": 96,
                                                                   "tta": {"scales": [48, 64]}}}))
    det = Detector(config, device="cpu")
    onnx_det = Detector.from_onnx(det.export(tmp_path / "model.onnx"))
    image = torch.randint(0, 256, (3, 60, 90), dtype=torch.uint8)
    ours, theirs = det.predict(image, score_thr=0.0, tta=True)[0], onnx_det.predict(image, score_thr=0.0, tta=True)[0]
    assert len(ours) == len(theirs) > 0 and torch.equal(ours.labels, theirs.labels)
    assert torch.allclose(ours.boxes, theirs.boxes, atol=1e-3) and torch.allclose(ours.scores, theirs.scores, atol=1e-4)
