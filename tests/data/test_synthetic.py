import json
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from codetr.cli.data import main_synth
from codetr.data import CocoDetection, generate_synthetic_coco
from codetr.data.synthetic import CATEGORIES, EMPTY_EVERY, render_sample
from codetr.errors import UserError

SIZE = 256


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    generate_synthetic_coco(out, num_train=24, num_val=4, size=SIZE, seed=3)
    return out


def _load(root: Path, split: str) -> dict:
    return json.loads((root / "annotations" / f"instances_{split}.json").read_text())


def test_layout_and_returned_paths(tmp_path):
    paths = generate_synthetic_coco(tmp_path, num_train=2, num_val=1, size=64, seed=0)
    assert paths == {
        "train_annotations": tmp_path / "annotations" / "instances_train.json",
        "train_images": tmp_path / "train",
        "val_annotations": tmp_path / "annotations" / "instances_val.json",
        "val_images": tmp_path / "val",
    }
    assert sorted(p.name for p in (tmp_path / "train").iterdir()) == ["000001.png", "000002.png"]
    assert [p.name for p in (tmp_path / "val").iterdir()] == ["000001.png"]


def test_same_seed_gives_identical_files(synth, tmp_path):
    generate_synthetic_coco(tmp_path, num_train=24, num_val=4, size=SIZE, seed=3)
    for split in ("train", "val"):
        name = f"annotations/instances_{split}.json"
        assert (tmp_path / name).read_bytes() == (synth / name).read_bytes()
        for image in sorted((synth / split).iterdir()):
            np.testing.assert_array_equal(np.asarray(Image.open(image)),
                                          np.asarray(Image.open(tmp_path / split / image.name)))
    other = tmp_path / "other"
    generate_synthetic_coco(other, num_train=2, num_val=0, size=SIZE, seed=4)
    assert not np.array_equal(np.asarray(Image.open(other / "train" / "000001.png")),
                              np.asarray(Image.open(synth / "train" / "000001.png")))


def test_annotation_fields_and_content(synth):
    data = _load(synth, "train")
    assert [(c["id"], c["name"]) for c in data["categories"]] == [(i + 1, c[0]) for i, c in enumerate(CATEGORIES)]
    assert len(data["categories"]) == 6
    assert all(img["width"] == SIZE and img["height"] == SIZE for img in data["images"])
    assert [img["id"] for img in data["images"]] == list(range(1, 25))
    anns = data["annotations"]
    assert len({a["id"] for a in anns}) == len(anns)
    assert all(a["iscrowd"] == 0 and a["area"] > 0 for a in anns)
    assert set(Counter(a["category_id"] for a in anns)) == {1, 2, 3, 4, 5, 6}
    per_image = Counter(a["image_id"] for a in anns)
    empty = [i for i in range(1, 25) if per_image[i] == 0]
    assert empty and set(empty) >= {EMPTY_EVERY, 2 * EMPTY_EVERY}
    assert max(per_image.values()) <= 8
    small = [a for a in anns if max(a["bbox"][2:]) <= 16]
    assert len(small) >= 5
    assert max(max(a["bbox"][2:]) for a in anns) >= 64  # and large ones


def test_boxes_are_tight_around_visible_object_pixels(synth):
    data = _load(synth, "train")
    checked = 0
    for index in range(6):
        sample = render_sample(3, "train", index, SIZE)
        saved = np.asarray(Image.open(synth / "train" / f"{index + 1:06d}.png"))
        np.testing.assert_array_equal(saved, sample.image)
        anns = [a for a in data["annotations"] if a["image_id"] == index + 1]
        assert len(anns) == len(sample.objects)
        for ann, obj in zip(anns, sample.objects):
            assert ann["category_id"] == obj.category_id
            ys, xs = np.nonzero(obj.mask)
            x, y, w, h = ann["bbox"]
            assert (x, y, x + w, y + h) == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
            assert ann["area"] == obj.mask.sum()
            # the object's pixels are drawn over the background (not background themselves)
            changed = np.abs(saved.astype(int) - sample.background.astype(int)).max(axis=-1) > 10
            assert changed[obj.mask].mean() > 0.8
            # and the box border rows/columns contain object pixels (nothing to shrink)
            x1, y1, x2, y2 = int(x), int(y), int(x + w), int(y + h)
            assert obj.mask[y1, x1:x2].any() and obj.mask[y2 - 1, x1:x2].any()
            assert obj.mask[y1:y2, x1].any() and obj.mask[y1:y2, x2 - 1].any()
            checked += 1
    assert checked >= 10


def test_loads_as_coco_dataset_without_dropped_boxes(synth):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = CocoDetection(synth / "val", synth / "annotations" / "instances_val.json")
    assert ds.class_names == [c[0] for c in CATEGORIES]
    image, target = ds[0]
    assert image.shape == (3, SIZE, SIZE)
    assert target.boxes.shape[1] == 4


def test_command_line_entry(tmp_path, capsys):
    assert main_synth(["--out", str(tmp_path), "--train", "2", "--val", "1", "--size", "64", "--seed", "1"]) == 0
    assert (tmp_path / "annotations" / "instances_val.json").is_file()
    assert "train_annotations" in capsys.readouterr().out
    assert Image.open(tmp_path / "train" / "000002.png").size == (64, 64)


def test_synth_refuses_a_folder_it_did_not_write(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "photo.jpg").write_bytes(b"mine")
    with pytest.raises(UserError, match=f"{tmp_path} holds files codetr did not generate"):
        main_synth(["--out", str(tmp_path), "--train", "1", "--val", "0", "--size", "32"])
    assert [p.name for p in tmp_path.rglob("*")] == ["train", "photo.jpg"]


def test_synth_again_replaces_its_own_files(tmp_path):
    generate_synthetic_coco(tmp_path, num_train=3, num_val=2, size=32, seed=0)
    generate_synthetic_coco(tmp_path, num_train=1, num_val=0, size=32, seed=0)  # no old image stays beside the new
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*.png")) == ["train/000001.png"]


def test_segmentations_are_the_exact_visible_pixels(synth):
    """Each annotation's segmentation (RLE, decoded by pycocotools) is its object's mask, and the
    masks load into the targets aligned with their boxes."""
    reference = pytest.importorskip("pycocotools.mask")
    data = _load(synth, "train")
    checked = 0
    for index in range(4):
        sample = render_sample(3, "train", index, SIZE)
        anns = [a for a in data["annotations"] if a["image_id"] == index + 1]
        for ann, obj in zip(anns, sample.objects):
            assert isinstance(ann["segmentation"]["counts"], str) and ann["segmentation"]["size"] == [SIZE, SIZE]
            np.testing.assert_array_equal(reference.decode(ann["segmentation"]).astype(bool), obj.mask)
            checked += 1
    assert checked >= 5
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = CocoDetection(synth / "train", synth / "annotations" / "instances_train.json", with_masks=True)
    _, target = ds[0]
    np.testing.assert_array_equal(target.masks.numpy(), np.stack([o.mask for o in render_sample(3, "train", 0, SIZE).objects]))
