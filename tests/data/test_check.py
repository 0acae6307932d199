"""Dataset checks (codetr.data.check) as run when a dataset is loaded and by `codetr data check`."""

import copy
import json
import warnings
from pathlib import Path

import pytest
import torch
from faster_coco_eval import COCO, COCOeval_faster
from faster_coco_eval.core.cocoeval import Params
from PIL import Image

from codetr.cli import main
from codetr.config import DataConfig
from codetr.data import CocoDetection, build_dataset, generate_synthetic_coco
from codetr.data.check import check_dataset
from codetr.errors import DatasetError, UserError
from codetr.inference.evaluate import METRIC_NAMES, evaluate_images
from codetr.structures import Detections

CATEGORIES = [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]


def _dataset(root: Path, annotations: list[dict] | None, images: list[dict] | None = None, **extra) -> tuple[Path, Path]:
    """Images of 64 x 48 grey pixels (ids 1..3 unless given) and their annotation file; ``annotations``
    None leaves the key out."""
    images = images if images is not None else [{"id": i, "file_name": f"{i}.png", "width": 64, "height": 48}
                                                for i in (1, 2, 3)]
    folder = root / "images"
    folder.mkdir(parents=True, exist_ok=True)
    for img in images:
        if isinstance(img.get("file_name"), str) and "/" not in img["file_name"]:
            Image.new("RGB", (64, 48), (90, 90, 90)).save(folder / img["file_name"])
    data = {"images": images, "categories": CATEGORIES, **extra}
    if annotations is not None:
        data["annotations"] = annotations
    ann_file = root / "ann.json"
    ann_file.write_text(json.dumps(data))
    return folder, ann_file


def _ann(ann_id: int, image_id: int, bbox: list[float], category_id: int = 1, **extra) -> dict:
    return {"id": ann_id, "image_id": image_id, "category_id": category_id, "bbox": bbox,
            "area": bbox[2] * bbox[3], **extra}


# ------------------------------------------------------------------ file names outside the folder


@pytest.mark.parametrize("name", ["../../../secret.png", "sub/../../../../secret.png", "ABSOLUTE"])
def test_file_names_outside_the_images_folder_are_refused(tmp_path, name):
    secret = tmp_path / "secret.png"  # a readable image outside the images folder
    Image.new("RGB", (64, 48)).save(secret)
    name = str(secret) if name == "ABSOLUTE" else name
    root = tmp_path / "a" / "b"
    images = [{"id": 1, "file_name": "1.png", "width": 64, "height": 48},
              {"id": 5, "file_name": name, "width": 64, "height": 48}]
    folder, ann_file = _dataset(root, [_ann(1, 1, [2, 2, 20, 20])], images)
    assert (folder / name).resolve() == secret.resolve()  # the name does reach the file
    with pytest.raises(DatasetError, match=r"image id 5: file_name '.*secret\.png' reads outside the images folder"):
        CocoDetection(folder, ann_file)


def test_file_names_in_subfolders_are_fine(tmp_path):
    folder, ann_file = _dataset(tmp_path, [_ann(1, 1, [2, 2, 20, 20])],
                                [{"id": 1, "file_name": "1.png", "width": 64, "height": 48}])
    (folder / "val2017").mkdir()
    (folder / "1.png").rename(folder / "val2017" / "1.png")
    data = json.loads(ann_file.read_text())
    data["images"][0]["file_name"] = "./val2017/1.png"
    ann_file.write_text(json.dumps(data))
    assert CocoDetection(folder, ann_file)[0][0].shape == (3, 48, 64)


# ---------------------------------------------------------------------- sets without annotations


@pytest.mark.parametrize(("annotations", "reason"), [
    (None, "the file has no 'annotations' list"),
    ([], "its 'annotations' list is empty"),
    ([_ann(1, 1, [2, 2, 20, 20], iscrowd=1), _ann(2, 2, [5, 5, 9, 9], iscrowd=1)],
     "all 2 annotations are crowd regions"),
])
def test_sets_without_boxes_are_errors_unless_allowed_for_training(tmp_path, annotations, reason):
    folder, ann_file = _dataset(tmp_path, annotations)
    cfg = DataConfig(train_images=str(folder), train_annotations=str(ann_file), val_images=str(folder),
                     val_annotations=str(ann_file), num_workers=0)
    with pytest.raises(DatasetError, match=rf"data\.train_annotations .*ann\.json: {reason}.*data\.allow_empty=true"):
        build_dataset(cfg, "train")
    with pytest.raises(DatasetError, match=rf"data\.val_annotations .*ann\.json: {reason}.*every metric would be -1"):
        build_dataset(cfg, "val")
    cfg.allow_empty = True
    train = build_dataset(cfg, "train")
    assert len(train) == 3 and train.num_boxes == 0 and train[0][1].boxes.shape == (0, 4)
    with pytest.raises(DatasetError):
        build_dataset(cfg, "val")  # evaluation always needs boxes


# ------------------------------------------------------------- evaluation without the area field


def test_missing_area_uses_the_box_area_like_faster_coco_eval_with_areas(tmp_path):
    # objects of 20x20 (small), 60x60 (medium) and 120x120 (large) px in a 400 x 300 image
    boxes = {1: [10, 10, 20, 20], 2: [100, 100, 60, 60], 3: [200, 150, 120, 120], 4: [40, 200, 22, 25]}
    annotations = [{"id": k, "image_id": 1, "category_id": 1, "bbox": b} for k, b in boxes.items()]
    annotations[3]["area"] = None  # written as null by some exports: missing too
    images = [{"id": 1, "file_name": "1.png", "width": 400, "height": 300}]
    folder, ann_file = _dataset(tmp_path, annotations, images)
    Image.new("RGB", (400, 300)).save(folder / "1.png")
    # detections: the small and the medium objects found, a false large box scored highest
    records = [{"image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 20], "score": 0.9},
               {"image_id": 1, "category_id": 1, "bbox": [100, 100, 60, 60], "score": 0.8},
               {"image_id": 1, "category_id": 1, "bbox": [0, 150, 130, 140], "score": 0.95}]

    def reference(gt: dict) -> list[float]:
        coco = COCO(copy.deepcopy(gt))
        evaluator = COCOeval_faster(coco, coco.loadRes(copy.deepcopy(records)), iouType="bbox",
                                    print_function=lambda *_: None)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
        return [-1.0 if v < 0 else round(float(v) * 100, 3) for v in evaluator.stats[:6]]

    gt = json.loads(ann_file.read_text())
    with_areas = copy.deepcopy(gt)
    for ann in with_areas["annotations"]:
        ann["area"] = ann["bbox"][2] * ann["bbox"][3]
    expected = reference(with_areas)
    for ann in gt["annotations"]:
        ann.pop("area", None)
    assert expected[3:] != reference(gt)[3:]  # APs / APm / APl do differ without the areas

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dataset = CocoDetection(folder, ann_file)
    area_warnings = [str(w.message) for w in caught if "'area'" in str(w.message)]
    assert len(area_warnings) == 1 and "evaluation uses the box area w*h): 4" in area_warnings[0]

    def detect(image: torch.Tensor) -> Detections:
        xyxy = torch.tensor([r["bbox"] for r in records], dtype=torch.float32)
        xyxy[:, 2:] += xyxy[:, :2]
        return Detections(xyxy, torch.tensor([r["score"] for r in records]), torch.zeros(3, dtype=torch.int64))

    metrics = evaluate_images(detect, dataset, style="coco")
    assert [metrics[name] for name in METRIC_NAMES] == pytest.approx(expected, abs=1e-3)


# ----------------------------------------------------------------------------- the checker


def test_checker_reports_each_kind_of_problem_with_ids(tmp_path):
    images = [{"id": i, "file_name": f"{i}.png", "width": 64, "height": 48} for i in range(1, 7)]
    images.append({"id": 3, "file_name": "dup.png", "width": 64, "height": 48})  # duplicate image id
    images.append({"id": 8, "file_name": "1.png", "width": 64, "height": 48})  # file listed twice
    images.append({"id": 9, "file_name": "9.png", "width": "64", "height": 48})  # width as a string
    annotations = [
        _ann(1, 1, [2, 2, 20, 20]),
        _ann(1, 2, [2, 2, 20, 20]),  # duplicate annotation id
        _ann(3, 2, [2, 2, 20, 20]),  # repeats annotation 1's box on image 2
        _ann(4, 77, [2, 2, 20, 20]),  # unknown image
        _ann(5, 3, [2, 2, 20, 20], category_id=9),  # undefined category
        {"id": 6, "image_id": 4, "category_id": 1, "bbox": [2, 2, float("nan"), 5]},
        _ann(7, 4, [2, 2, -5, 5], area=25),  # negative width
        _ann(8, 4, [70, 2, 5, 5]),  # right of the image
        _ann(9, 5, [50, 40, 30, 30]),  # reaches 16 px beyond
        {"id": 10, "image_id": 5, "category_id": 1, "bbox": [1, 1, 4, 4]},  # no area
    ]
    folder, ann_file = _dataset(tmp_path, annotations, images)
    (folder / "2.png").unlink()
    (folder / "6.png").write_bytes((folder / "5.png").read_bytes()[:60])  # truncated
    Image.new("RGB", (48, 64)).save(folder / "5.png")  # width and height swapped
    report = check_dataset(ann_file, folder)
    counts = {kind: count for kind, count in report.counts.items() if count}
    assert counts == {
        "image_duplicate": 1, "image_field": 1, "file_name_duplicate": 1, "annotation_duplicate": 1,
        "annotation_repeated": 1, "image_id_unknown": 1, "category_undefined": 1, "annotation_field": 1,
        "box_empty": 1, "box_outside": 1, "box_clipped": 1, "area_missing": 1, "file_missing": 1,
        "file_unreadable": 1, "size_mismatch": 1, "category_unused": 1}
    text = report.format()
    for expected in ["duplicate image id: 1\n    image id 3 (image #6)",
                     "image id 9: field 'width' missing or not a positive integer ('64')",
                     "1.png is listed by image ids 1 and 8",
                     "annotation id 4: field 'image_id' (77) is not an image id of the file",
                     "annotation id 5: field 'category_id' (9) is not a category id of the file",
                     "annotation id 6: field 'bbox' must be [x, y, width, height] of finite numbers",
                     "image file missing: 1 of 9 images\n    2.png (image id 2)",
                     "6.png is truncated or corrupt: Pillow cannot decode it (image file is truncated) (image id 6)",
                     "5.png of image id 5 is 48x64 but", "says 64x48 (w x h): width and height are swapped",
                     "annotation id 7 (image id 4, 64x48): bbox [2, 2, -5, 5]",
                     "category id 2 ('b')", "result: 9 errors, 6 warnings: fix the errors"]:
        assert expected in text, expected
    with pytest.raises(DatasetError) as err:  # loading runs the same checks
        CocoDetection(folder, ann_file)
    assert "8 errors" in str(err.value) and "annotation id 6: field 'bbox'" in str(err.value)  # not the decode


def test_decode_finds_corrupt_pixel_data_that_the_header_check_cannot(tmp_path):
    folder, ann_file = _dataset(tmp_path, [_ann(1, 1, [2, 2, 20, 20])])
    Image.frombytes("RGB", (64, 48), bytes(range(256)) * 36).save(folder / "2.png")
    data = (folder / "2.png").read_bytes()
    (folder / "2.png").write_bytes(data[:len(data) // 2])
    assert check_dataset(ann_file, folder, decode=False).num_errors == 0
    report = check_dataset(ann_file, folder, decode=True)
    assert report.counts["file_unreadable"] == 1
    assert "2.png is truncated or corrupt" in report.examples["file_unreadable"][0]


def test_data_check_command(tmp_path, capsys):
    paths = generate_synthetic_coco(tmp_path / "synth", 4, 2, 64, 0)
    assert main(["data", "check", str(paths["val_annotations"]), "--images", str(paths["val_images"])]) == 0
    out = capsys.readouterr().out
    assert "contents     2 images" in out and "result: 0 errors, 0 warnings: usable" in out

    folder, ann_file = _dataset(tmp_path / "bad", [_ann(1, 1, [2, 2, 20, 20]), _ann(2, 1, [1, 1, 5, 5], category_id=4)])
    (folder / "3.png").unlink()
    assert main(["data", "check", str(ann_file), "--images", str(folder), "--no-decode"]) == 2
    out = capsys.readouterr().out
    assert "image file missing: 1 of 3 images\n    3.png (image id 3)" in out
    assert "annotation id 2: field 'category_id' (4)" in out and "result: 2 errors" in out

    (tmp_path / "broken.json").write_text("{")
    assert main(["data", "check", str(tmp_path / "broken.json"), "--images", str(folder)]) == 2
    assert "broken.json is not valid JSON" in capsys.readouterr().out


def test_data_check_counts_boxes_by_coco_size_as_faster_coco_eval_splits_them(tmp_path, capsys):
    """The size split of the usable non-crowd boxes, against faster-coco-eval's own area ranges
    (areas chosen off the boundaries, which COCO's inclusive ranges count twice)."""
    sizes = [(4, 4), (30, 30), (31, 33), (33, 33), (60, 20), (90, 100), (97, 97), (150, 40), (8, 200), (63, 47)]
    images = [{"id": 1, "file_name": "1.png", "width": 400, "height": 300}]
    annotations = [_ann(k, 1, [1, 1, w, h]) for k, (w, h) in enumerate(sizes, start=1)]
    annotations += [_ann(20, 1, [1, 1, 200, 200], iscrowd=1), _ann(21, 1, [500, 10, 50, 50])]  # crowd; outside the image
    folder, ann_file = _dataset(tmp_path, annotations, images)
    Image.new("RGB", (400, 300)).save(folder / "1.png")

    params = Params(iouType="bbox")
    ranges = dict(zip(params.areaRngLbl, params.areaRng))
    expected = {label: sum(ranges[label][0] <= w * h < ranges[label][1] for w, h in sizes)
                for label in ("small", "medium", "large")}
    assert all(expected.values())
    report = check_dataset(ann_file, folder)
    assert {label: report.stats[label] for label in expected} == expected
    assert main(["data", "check", str(ann_file), "--images", str(folder)]) == 0
    assert (f"box sizes    {expected['small']} small (area < 32 x 32 px), {expected['medium']} medium, "
            f"{expected['large']} large (>= 96 x 96 px)") in capsys.readouterr().out


def test_loading_errors_are_user_errors_with_the_old_types():
    assert issubclass(DatasetError, UserError) and issubclass(DatasetError, ValueError)


# ------------------------------------------------------------------------------- segmentations

SQUARE = [[10, 10, 30, 10, 30, 30, 10, 30]]
SEGMENTATION_CASES = [  # (segmentation, kind, words of its message); the image is 64 x 48
    ([], "segmentation_empty", "polygons []"),
    ([[10, 10, 20, 20, 30, 30]], "segmentation_empty", "polygons"),  # three points on a line
    ({"size": [48, 64], "counts": [48 * 64]}, "segmentation_empty", "RLE without a pixel"),
    ([[70, 10, 90, 10, 90, 30]], "segmentation_outside", "polygon x in [70, 90]"),
    ([[10, -40, 30, -40, 20, -5]], "segmentation_outside", "y in [-40, -5]"),
    ([[10, 10, 30, 10]], "segmentation_points", "polygon [10, 10, 30, 10] has 2 point(s)"),
    ([SQUARE[0], [1, 1]], "segmentation_points", "has 1 point(s)"),
    ({"size": [64, 48], "counts": [64 * 48]}, "segmentation_rle_size", "RLE size [64, 48] but the image is [48, 64]"),
    ({"size": [48, 64], "counts": [100, 20]}, "segmentation_rle_size", "RLE counts cover 120 pixels"),
    ({"size": [48, 64], "counts": "garbage!"}, "segmentation_field", "RLE counts unreadable (character 'r' at 2 is not part"),
    ({"size": [48, 64], "counts": "P13700000`1"}, "segmentation_rle_size", "RLE counts cover 120 pixels"),  # a 10x12 mask
    ({"size": [48], "counts": [3]}, "segmentation_field", "'size' [height, width]"),
    ([[10, 10, 30, 10, 30]], "segmentation_field", "an even count"),
    ("polygon", "segmentation_field", "must be polygons"),
]


@pytest.mark.parametrize(("segmentation", "kind", "words"), SEGMENTATION_CASES)
def test_broken_segmentations_are_reported_by_image_and_annotation_id(tmp_path, segmentation, kind, words):
    annotations = [_ann(1, 1, [10, 10, 20, 20], segmentation=SQUARE), _ann(7, 2, [10, 10, 20, 20], segmentation=segmentation)]
    folder, ann_file = _dataset(tmp_path, annotations)
    report = check_dataset(ann_file, folder)
    assert {k for k, n in report.counts.items() if n and k.startswith("segmentation")} == {kind}
    assert report.counts[kind] == 1 and report.examples[kind][0].startswith("annotation id 7 (image id 2)")
    assert words in report.examples[kind][0]
    assert report.num_errors == 0  # box-only use: warnings
    needed = check_dataset(ann_file, folder, masks=True)
    assert needed.num_errors == (1 if kind in ("segmentation_field", "segmentation_rle_size") else 0)


def test_good_segmentations_pass_and_missing_ones_matter_only_when_masks_are_needed(tmp_path):
    rle = {"size": [48, 64], "counts": [64, 5, 48 * 64 - 69]}
    annotations = [_ann(1, 1, [10, 10, 20, 20], segmentation=SQUARE), _ann(2, 1, [0, 1, 2, 3], segmentation=rle),
                   _ann(3, 2, [10, 10, 20, 20]), _ann(4, 3, [0, 0, 64, 48], iscrowd=1)]
    folder, ann_file = _dataset(tmp_path, annotations)
    report = check_dataset(ann_file, folder)
    assert not any(k.startswith("segmentation") for k in report.kinds("warning"))
    assert "4 annotations (1 crowd, 2 with a segmentation)" in report.summary()
    needed = check_dataset(ann_file, folder, masks=True)
    assert needed.kinds("error") == ["segmentation_missing"] and needed.counts["segmentation_missing"] == 1
    assert needed.examples["segmentation_missing"] == ["annotation id 3 (image id 2)"]  # not the crowd one


def test_data_check_masks_option(tmp_path, capsys):
    folder, ann_file = _dataset(tmp_path, [_ann(1, 1, [10, 10, 20, 20])])
    assert main(["data", "check", str(ann_file), "--images", str(folder)]) == 0
    assert main(["data", "check", str(ann_file), "--images", str(folder), "--masks"]) == 2
    out = capsys.readouterr().out
    assert "annotation without a segmentation (data.with_masks needs one): 1" in out and "annotation id 1 (image id 1)" in out
