import json
import warnings
from pathlib import Path

import numpy as np
import pycocotools.mask as coco_reference
import pytest
import torch
from PIL import Image

from codetr.config import DataConfig
from codetr.data import CocoDetection, build_dataloader, build_dataset, build_transforms, collate
from codetr.errors import UserError
from codetr.structures import Batch, Target


def _write(root: Path, images: list[dict], annotations: list[dict], categories: list[dict],
           colour: tuple[int, int, int] = (90, 90, 90)) -> tuple[Path, Path]:
    """Write a COCO dataset: one plain image file per entry of ``images``."""
    image_dir = root / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    for img in images:
        Image.new("RGB", (img["width"], img["height"]), colour).save(image_dir / img["file_name"])
    ann_file = root / "instances.json"
    ann_file.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return image_dir, ann_file


def _img(image_id: int, width: int = 40, height: int = 30) -> dict:
    return {"id": image_id, "file_name": f"{image_id}.png", "width": width, "height": height}


def _ann(ann_id: int, image_id: int, category_id: int, bbox: list[float], **extra) -> dict:
    return {"id": ann_id, "image_id": image_id, "category_id": category_id, "bbox": bbox, **extra}


@pytest.mark.parametrize("cat_ids", [[90, 3, 17], [0, 1, 2], [1, 2, 3]])
def test_category_ids_map_to_contiguous_labels_and_back(tmp_path, cat_ids):
    cats = [{"id": c, "name": f"c{c}"} for c in cat_ids]
    anns = [_ann(i + 1, 1, c, [2.0 + i, 3.0, 10.0, 8.0]) for i, c in enumerate(cat_ids)]
    ds = CocoDetection(*_write(tmp_path, [_img(1)], anns, cats))
    assert ds.category_ids == sorted(cat_ids)
    assert ds.class_names == [f"c{c}" for c in sorted(cat_ids)]
    _, target = ds[0]
    assert target.labels.dtype == torch.int64
    assert [ds.category_ids[int(label)] for label in target.labels] == cat_ids  # round trip


def test_targets_are_clipped_xyxy_without_crowds(tmp_path):
    anns = [
        _ann(1, 11, 5, [2.0, 3.0, 10.0, 8.0]),
        _ann(2, 11, 5, [20.0, 5.0, 10.0, 10.0], iscrowd=1),
        _ann(3, 11, 7, [35.0, -4.0, 20.0, 10.0], iscrowd=0),  # partly outside: clipped
    ]
    cats = [{"id": 5, "name": "a"}, {"id": 7, "name": "b"}]
    ds = CocoDetection(*_write(tmp_path, [_img(11)], anns, cats))
    image, target = ds[0]
    assert isinstance(target, Target)
    assert image.dtype == torch.uint8 and image.shape == (3, 30, 40)
    assert target.boxes.tolist() == [[2.0, 3.0, 12.0, 11.0], [35.0, 0.0, 40.0, 6.0]]
    assert target.labels.tolist() == [0, 1]
    assert target.image_id == 11 and target.orig_size == (30, 40)


def test_degenerate_boxes_dropped_with_one_warning_per_kind(tmp_path):
    anns = [
        _ann(1, 1, 1, [2.0, 3.0, 10.0, 8.0], area=80.0),
        _ann(2, 1, 1, [5.0, 5.0, 1.0, 8.0], area=8.0),  # 1 px wide
        _ann(3, 1, 1, [5.0, 5.0, 8.0, 0.5], area=4.0),
        _ann(4, 2, 1, [50.0, 5.0, 8.0, 8.0], area=64.0),  # right of the 40 px wide image
        _ann(5, 2, 1, [10.0, 10.0, -3.0, 4.0], area=12.0),
        _ann(6, 2, 1, [4.0, 4.0, 6.0, 6.0], area=36.0),
    ]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = CocoDetection(*_write(tmp_path, [_img(1), _img(2)], anns, [{"id": 1, "name": "a"}]))
    messages = sorted(str(w.message) for w in caught)
    assert len(messages) == 3
    tiny, outside, empty = messages  # sorted: "box at most", "box outside", "box with"
    assert "box at most 1 px wide or high inside its image (left out): 2" in tiny and "annotation id 2" in tiny
    assert "box outside its image (left out): 1" in outside and "annotation id 4" in outside
    assert "box with zero or negative width or height (left out): 1" in empty and "annotation id 5" in empty
    assert ds[0][1].boxes.tolist() == [[2.0, 3.0, 12.0, 11.0]]
    assert ds[1][1].boxes.tolist() == [[4.0, 4.0, 10.0, 10.0]]
    assert ds.num_boxes == 2


def test_images_without_annotations_are_kept(tmp_path):
    ds = CocoDetection(*_write(tmp_path, [_img(1), _img(2)], [_ann(1, 2, 1, [1.0, 1.0, 5.0, 5.0])],
                               [{"id": 1, "name": "a"}]))
    assert ds.image_ids == [1, 2]
    _, target = ds[0]
    assert target.boxes.shape == (0, 4) and target.labels.shape == (0,)
    image, target = CocoDetection(ds.images_dir, ds.annotations_file, build_transforms(DataConfig(), train=True))[0]
    assert target.boxes.shape == (0, 4) and image.dtype == torch.float32


def test_missing_annotation_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        CocoDetection(tmp_path, tmp_path / "nope.json")


def test_missing_image_files_are_reported_when_loading(tmp_path):
    image_dir, ann_file = _write(tmp_path, [_img(i) for i in range(1, 11)], [], [{"id": 1, "name": "a"}])
    for i in (2, 5, 6, 7, 9):
        (image_dir / f"{i}.png").unlink()
    with pytest.raises(UserError, match=r"image file missing: 5 of 10 images\n    2\.png \(image id 2\)\n    "
                                        r"5\.png \(image id 5\)\n    6\.png \(image id 6\)\n    \.\.\. and 2 more"):
        CocoDetection(image_dir, ann_file)


def test_image_file_removed_after_loading_names_file_and_image_id(tmp_path):
    image_dir, ann_file = _write(tmp_path, [_img(1)], [], [{"id": 1, "name": "a"}])
    ds = CocoDetection(image_dir, ann_file)
    (image_dir / "1.png").unlink()
    with pytest.raises(UserError, match=r"1\.png not found \(image id 1 of .*instances\.json\)"):
        ds[0]


def test_image_size_mismatch_is_reported(tmp_path):
    image_dir, ann_file = _write(tmp_path, [_img(4)], [], [{"id": 1, "name": "a"}])
    Image.new("RGB", (10, 10)).save(image_dir / "4.png")
    with pytest.raises(ValueError, match=r"4\.png of image id 4 is 10x10"):
        CocoDetection(image_dir, ann_file)[0]


@pytest.mark.parametrize(("ann", "pattern"), [
    (_ann(7, 1, 1, [1.0, 2.0, 3.0]), "annotation id 7: field 'bbox'"),
    (_ann(7, 1, 1, [1.0, 2.0, 3.0, float("nan")]), "annotation id 7: field 'bbox'"),
    (_ann(7, 1, 9, [1.0, 2.0, 3.0, 4.0]), "annotation id 7: field 'category_id'"),
    (_ann(7, 3, 1, [1.0, 2.0, 3.0, 4.0]), "annotation id 7: field 'image_id'"),
    ({"id": 7, "image_id": 1, "category_id": 1}, "annotation id 7: field 'bbox'"),
    (_ann(7, 1, 1, [1.0, 2.0, 3.0, 4.0], iscrowd=2), "annotation id 7: field 'iscrowd'"),
])
def test_malformed_annotation_names_id_and_field(tmp_path, ann, pattern):
    with pytest.raises(ValueError, match=pattern) as err:
        CocoDetection(*_write(tmp_path, [_img(1)], [ann], [{"id": 1, "name": "a"}]))
    assert "instances.json" in str(err.value)


def test_malformed_image_and_file(tmp_path):
    bad_image = {"id": 3, "file_name": "3.png", "width": 40}
    ann_file = tmp_path / "a.json"
    ann_file.write_text(json.dumps({"images": [bad_image], "annotations": [], "categories": []}))
    with pytest.raises(ValueError, match="image id 3: field 'height'"):
        CocoDetection(tmp_path, ann_file)
    ann_file.write_text("{not json")
    with pytest.raises(ValueError, match="a.json is not valid JSON"):
        CocoDetection(tmp_path, ann_file)


def test_transformed_target_bounds_the_object(tmp_path):
    image_dir, ann_file = _write(tmp_path, [_img(1, 160, 120)], [_ann(1, 1, 1, [30.0, 40.0, 50.0, 30.0])],
                                 [{"id": 1, "name": "a"}])
    img = Image.new("RGB", (160, 120), (90, 90, 90))  # grey with a white object under the box
    img.paste((250, 250, 250), (30, 40, 80, 70))
    img.save(image_dir / "1.png")
    cfg = DataConfig(train_scales=[100, 130], max_size=300, crop_resize_scales=[120], crop_size=[100, 140])
    ds = CocoDetection(image_dir, ann_file, build_transforms(cfg, train=True))
    kept = 0
    for seed in range(10):
        torch.manual_seed(seed)
        image, target = ds[0]
        bright = image.mean(0) > 1.0  # normalised white (~2.1) vs grey (~-0.4)
        if len(target.boxes) == 0:  # cropped away
            continue
        kept += 1
        ys, xs = torch.nonzero(bright, as_tuple=True)
        found = torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32)
        assert torch.allclose(target.boxes[0], found, atol=2.0)
        assert target.orig_size == (120, 160)
    assert kept >= 5


def test_collate_pads_bottom_right_and_masks_exactly_the_padding():
    sizes = [(5, 7), (8, 3), (6, 6)]
    samples = [(torch.full((3, h, w), float(i + 1)), Target(torch.zeros(i, 4), torch.zeros(i, dtype=torch.int64)))
               for i, (h, w) in enumerate(sizes)]
    batch = collate(samples)
    assert isinstance(batch, Batch)
    assert batch.images.shape == (3, 3, 8, 7) and batch.masks.shape == (3, 8, 7)
    assert batch.image_sizes.tolist() == [list(s) for s in sizes] and batch.image_sizes.dtype == torch.int64
    for i, (h, w) in enumerate(sizes):
        expected = torch.ones(8, 7, dtype=torch.bool)
        expected[:h, :w] = False
        assert torch.equal(batch.masks[i], expected)
        assert torch.all(batch.images[i][:, :h, :w] == i + 1)
        assert torch.all(batch.images[i][:, expected] == 0)
    assert [len(t.boxes) for t in batch.targets] == [0, 1, 2]


def _synthetic_cfg(root: Path, **extra) -> DataConfig:
    return DataConfig(
        train_images=str(root / "train"), train_annotations=str(root / "annotations/instances_train.json"),
        val_images=str(root / "val"), val_annotations=str(root / "annotations/instances_val.json"),
        synthetic=True, synthetic_train=6, synthetic_val=2, synthetic_size=64, synthetic_seed=1,
        train_scales=[64, 80], max_size=128, crop_resize_scales=[64], crop_size=[40, 60], test_scale=64,
        batch_size=4, num_workers=0, **extra,
    )


def test_build_dataset_generates_synthetic_data_once(tmp_path):
    cfg = _synthetic_cfg(tmp_path / "synth")
    train = build_dataset(cfg, "train")
    assert len(train) == 6 and train.class_names[0] == "circle"
    ann = Path(cfg.train_annotations)
    stamp = ann.stat().st_mtime_ns
    val = build_dataset(cfg, "val")
    assert len(val) == 2 and ann.stat().st_mtime_ns == stamp  # not generated again
    image, target = val[0]
    assert image.shape == (3, 64, 64) and image.dtype == torch.float32
    with pytest.raises(ValueError, match="split"):
        build_dataset(cfg, "test")


def test_build_dataset_regenerates_synthetic_data_when_its_settings_change(tmp_path):
    cfg = _synthetic_cfg(tmp_path / "synth")
    assert len(build_dataset(cfg, "train")) == 6
    cfg.synthetic_train, cfg.synthetic_size = 9, 48
    train = build_dataset(cfg, "train")
    assert len(train) == 9
    with Image.open(Path(cfg.train_images) / "000009.png") as image:
        assert image.size == (48, 48)
    (Path(cfg.val_annotations)).write_text("{not json")  # a damaged file is rewritten too
    assert len(build_dataset(cfg, "val")) == 2


def test_build_dataset_rejects_synthetic_paths_off_layout(tmp_path):
    cfg = _synthetic_cfg(tmp_path)
    cfg.val_images = str(tmp_path / "elsewhere")
    with pytest.raises(UserError, match="data.val_images.*data.synthetic=false"):
        build_dataset(cfg, "train")
    assert not any(tmp_path.iterdir())  # nothing written


def test_synthetic_paths_mixing_relative_and_absolute_get_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = _synthetic_cfg(Path("data/synth"))
    cfg.val_images, cfg.val_annotations = str(tmp_path / "mine/val"), str(tmp_path / "mine/val.json")
    with pytest.raises(UserError, match="^data.synthetic=true .*data.val_images=.*set data.synthetic=false to use your own dataset$"):
        build_dataset(cfg, "val")
    cfg.val_images, cfg.val_annotations = str(tmp_path / "data/synth/val"), str(tmp_path / "data/synth/annotations/instances_val.json")
    assert len(build_dataset(cfg, "val")) == 2  # the same folder, named once relative and once absolute


def test_build_dataset_never_writes_over_a_users_dataset(tmp_path):
    """The user's own data in the generator's layout, with data.synthetic=true left on: refused, untouched."""
    root = tmp_path / "mine"
    for split in ("train", "val"):
        (root / split).mkdir(parents=True)
        Image.new("RGB", (32, 24), (9, 9, 9)).save(root / split / "a.png")
        (root / "annotations").mkdir(exist_ok=True)
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps({
            "images": [_img(1, 32, 24) | {"file_name": "a.png"}], "annotations": [_ann(1, 1, 1, [1, 1, 9, 9], area=81.0)],
            "categories": [{"id": 1, "name": "mine"}]}))
    before = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
    cfg = _synthetic_cfg(root)
    for split in ("train", "val"):
        with pytest.raises(UserError, match=f"{root} holds files codetr did not generate.*set data.synthetic=false"):
            build_dataset(cfg, split)
    assert {p: p.read_bytes() for p in root.rglob("*") if p.is_file()} == before
    cfg.synthetic = False
    assert build_dataset(cfg, "val").class_names == ["mine"]


def test_dataloader_batches_and_seeded_shuffle(tmp_path):
    cfg = _synthetic_cfg(tmp_path)

    def order(seed: int, shuffle: bool | None = None) -> list[int]:
        loader = build_dataloader(cfg, "train", shuffle=shuffle, seed=seed)
        batches = list(loader)
        assert [b.images.shape[0] for b in batches] == [4, 2]  # drop_last=False
        assert all(b.masks.shape == b.images.shape[:1] + b.images.shape[2:] for b in batches)
        return [t.image_id for b in batches for t in b.targets]

    assert order(0) == order(0)
    assert sorted(order(0)) == list(range(1, 7))
    assert any(order(0) != order(s) for s in (1, 2, 3))
    assert order(0, shuffle=False) == list(range(1, 7))
    val = list(build_dataloader(cfg, "val"))
    assert [t.image_id for b in val for t in b.targets] == [1, 2]


def test_val_batches_hold_eval_batch_size_images(tmp_path):
    cfg = _synthetic_cfg(tmp_path)  # batch_size 4 (training), eval_batch_size 1 (default)
    assert [b.images.shape[0] for b in build_dataloader(cfg, "val")] == [1, 1]
    cfg.eval_batch_size = 2
    assert [b.images.shape[0] for b in build_dataloader(cfg, "val")] == [2]
    cfg.eval_batch_size = 0
    with pytest.raises(ValueError, match="data.eval_batch_size"):
        build_dataloader(cfg, "val")


def test_collate_pads_to_a_multiple_of_the_size_divisor():
    images = [torch.ones(3, 50, 70), torch.ones(3, 64, 33)]
    targets = [Target(torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64)) for _ in images]
    batch = collate(list(zip(images, targets)), size_divisor=32)
    assert batch.images.shape == (2, 3, 64, 96)
    assert batch.image_sizes.tolist() == [[50, 70], [64, 33]]
    for i, image in enumerate(images):  # padding is masked and zero, the image itself is not
        h, w = image.shape[-2:]
        assert not batch.masks[i, :h, :w].any() and batch.masks[i].sum() == 64 * 96 - h * w
        assert batch.images[i, :, h:].abs().sum() == 0 and batch.images[i, :, :, w:].abs().sum() == 0
    assert collate(list(zip(images, targets))).images.shape == (2, 3, 64, 70)  # default: no rounding


def test_lvis_images_named_by_coco_url_resolve_under_the_coco_root(tmp_path):
    """LVIS v1 images have a coco_url and no file_name: the file is <split>/<name> under a COCO root."""
    root = tmp_path / "coco"
    (root / "val2017").mkdir(parents=True)
    Image.new("RGB", (40, 30), (90, 90, 90)).save(root / "val2017" / "000000000007.jpg")
    ann_file = tmp_path / "lvis_v1_val.json"
    ann_file.write_text(json.dumps({
        "images": [{"id": 7, "coco_url": "http://images.cocodataset.org/val2017/000000000007.jpg",
                    "width": 40, "height": 30}],
        "annotations": [_ann(1, 7, 3, [5, 5, 10, 10])],
        "categories": [{"id": 3, "name": "cat", "frequency": "r"}]}))
    image, target = CocoDetection(root, ann_file)[0]
    assert image.shape[-2:] == (30, 40) and target.labels.tolist() == [0]


def _rle(mask: np.ndarray, compressed: bool) -> dict:
    """COCO RLE of (H, W) bool by pycocotools (compressed), or its runs counted by hand."""
    if compressed:
        rle = coco_reference.encode(np.asfortranarray(mask.astype(np.uint8)))
        return {"size": rle["size"], "counts": rle["counts"].decode()}
    flat = mask.flatten(order="F").astype(np.int64)
    changes = np.flatnonzero(np.diff(np.concatenate([[0], flat, [1 - flat[-1]]])))
    return {"size": list(mask.shape), "counts": np.diff(np.concatenate([[0], changes])).tolist()}


def test_masks_decode_polygons_and_both_rle_aligned_with_their_boxes(tmp_path):
    blob = np.zeros((30, 40), dtype=bool)
    blob[5:20, 22:37] = True
    blob[12:16, 25:30] = False
    anns = [
        _ann(1, 1, 1, [2.0, 3.0, 10.0, 8.0], segmentation=[[2, 3, 12, 3, 12, 11, 2, 11]], area=80.0),
        _ann(2, 1, 1, [0.0, 0.0, 1.0, 1.0], segmentation=[[0, 0, 1, 0, 1, 1]], area=0.5),  # box too small: left out
        _ann(3, 1, 2, [22.0, 5.0, 15.0, 15.0], segmentation=_rle(blob, compressed=False), area=float(blob.sum())),
        _ann(4, 1, 2, [0.0, 0.0, 40.0, 30.0], segmentation=_rle(~blob, compressed=True), area=1.0, iscrowd=1),
        _ann(5, 1, 2, [20.0, 4.0, 18.0, 17.0], segmentation=_rle(blob, compressed=True), area=float(blob.sum())),
    ]
    image_dir, ann_file = _write(tmp_path, [_img(1), _img(2)], anns, [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}])
    _, box_only = CocoDetection(image_dir, ann_file)[0]
    assert box_only.masks is None
    dataset = CocoDetection(image_dir, ann_file, with_masks=True)
    image, target = dataset[0]
    polygon = coco_reference.decode(coco_reference.merge(coco_reference.frPyObjects([[2, 3, 12, 3, 12, 11, 2, 11]], 30, 40)))
    expected = torch.from_numpy(np.stack([polygon.astype(bool), blob, blob]))
    assert target.labels.tolist() == [0, 1, 1] and torch.equal(target.masks, expected)
    assert target.masks.shape == (len(target.boxes), *image.shape[-2:])
    _, empty = dataset[1]
    assert empty.masks.shape == (0, 30, 40) and empty.masks.dtype == torch.bool


def test_masks_through_the_transforms_and_the_batch(tmp_path):
    anns = [_ann(1, 1, 1, [10.0, 5.0, 20.0, 12.0], segmentation=[[10, 5, 30, 5, 30, 17, 10, 17]], area=240.0)]
    image_dir, ann_file = _write(tmp_path, [_img(1, 80, 60), _img(2, 60, 80)], anns, [{"id": 1, "name": "a"}])
    cfg = DataConfig(test_scale=120, max_size=400, with_masks=True)
    dataset = CocoDetection(image_dir, ann_file, build_transforms(cfg, train=False), with_masks=True)
    batch = collate([dataset[0], dataset[1]])
    first, second = batch.targets
    assert first.masks.shape == (1, 120, 160) and second.masks.shape == (0, 160, 120)
    ys, xs = torch.nonzero(first.masks[0], as_tuple=True)
    torch.testing.assert_close(torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]).float(),
                               first.boxes[0], atol=1.0, rtol=0)
    assert batch.to("cpu").targets[0].masks is not None


def test_masks_needed_but_missing_or_unreadable_are_errors_naming_the_annotation(tmp_path):
    anns = [_ann(1, 1, 1, [2.0, 3.0, 10.0, 8.0], area=80.0),
            _ann(2, 1, 1, [2.0, 3.0, 10.0, 8.0], segmentation={"size": [10, 10], "counts": "55j2"}, area=80.0)]
    image_dir, ann_file = _write(tmp_path, [_img(1)], anns, [{"id": 1, "name": "a"}])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        CocoDetection(image_dir, ann_file)  # box-only: segmentations not even read
    assert not any("segmentation" in str(w.message) for w in caught)
    with pytest.raises(UserError, match=r"(?s)annotation id 1 \(image id 1\).*annotation id 2 \(image id 1\): RLE size"):
        CocoDetection(image_dir, ann_file, with_masks=True)


def test_copy_paste_samples_keep_boxes_on_their_masks(tmp_path):
    cfg = _synthetic_cfg(tmp_path, augment="lsj", lsj_size=64, with_masks=True, copy_paste=True)
    dataset = build_dataset(cfg, "train")
    assert dataset.mix is not None and build_dataset(cfg, "val").mix is None
    from codetr.data.masks import mask_boxes

    torch.manual_seed(0)
    counts = []
    for index in range(len(dataset)):
        image, target = dataset[index]
        assert image.dtype == torch.float32 and image.shape == (3, 64, 64)
        assert target.masks.shape == (len(target.boxes), 64, 64)
        torch.testing.assert_close(mask_boxes(target.masks), target.boxes)  # all recomputed from the masks
        counts.append(len(target.boxes))
    assert max(counts) > 0
    with pytest.raises(UserError, match="data.copy_paste needs data.augment: lsj and data.with_masks"):
        build_dataset(_synthetic_cfg(tmp_path, with_masks=True, copy_paste=True), "train")
