"""Reading image files (codetr.data.image): EXIF orientation, Pillow modes, unreadable files."""

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from codetr.config import Config, DataConfig
from codetr.data import CocoDetection
from codetr.data.image import DEFAULT_MAX_IMAGE_PIXELS, open_image, read_header, read_image
from codetr.errors import DatasetError, ImageFileError, UserError
from codetr.inference.predict import predict_images
from codetr.structures import Detections

ORIENTATION = 0x0112


def _upright(stored: np.ndarray, orientation: int) -> np.ndarray:
    """What a viewer shows for ``stored`` (H, W, C) with EXIF ``orientation``, from the EXIF
    specification's definitions (row 0 / column 0 of the stored image are ... of the scene)."""
    return {
        1: stored,
        2: stored[:, ::-1],
        3: stored[::-1, ::-1],
        4: stored[::-1],
        5: stored.transpose(1, 0, 2),
        6: np.rot90(stored, k=-1),  # shown rotated 90 degrees clockwise
        7: np.rot90(stored, k=2).transpose(1, 0, 2),
        8: np.rot90(stored, k=1),
    }[orientation]


def _save_with_orientation(path: Path, pixels: np.ndarray, orientation: int) -> None:
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    Image.fromarray(pixels).save(path, exif=exif)


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_exif_orientation_is_applied(tmp_path, orientation, suffix):
    stored = np.random.default_rng(orientation).integers(0, 256, (30, 40, 3), dtype=np.uint8)
    path = tmp_path / f"photo{suffix}"
    _save_with_orientation(path, stored, orientation)
    expected = _upright(stored, orientation)
    image = open_image(path)
    assert image.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(image), expected)
    header = read_header(path)
    assert header.size == (expected.shape[1], expected.shape[0])
    assert (header.stored_width, header.stored_height, header.orientation) == (40, 30, orientation)


def _phone_dataset(tmp_path: Path, json_size: tuple[int, int]) -> tuple[Path, Path, np.ndarray]:
    """A 300 (w) x 200 (h) upright scene with a white object at x 40..100, y 120..180, stored
    sideways (200 x 300 pixels) with EXIF orientation 6, as phones do."""
    upright = np.full((200, 300, 3), 60, dtype=np.uint8)
    upright[120:180, 40:100] = 255
    stored = np.rot90(upright, k=1)  # orientation 6 rotates it back clockwise
    images = tmp_path / "images"
    images.mkdir()
    _save_with_orientation(images / "phone.jpg", np.ascontiguousarray(stored), 6)
    ann_file = tmp_path / "ann.json"
    ann_file.write_text(json.dumps({
        "images": [{"id": 7, "file_name": "phone.jpg", "width": json_size[0], "height": json_size[1]}],
        "annotations": [{"id": 1, "image_id": 7, "category_id": 1, "bbox": [40, 120, 60, 60], "area": 3600}],
        "categories": [{"id": 1, "name": "thing"}]}))
    return images, ann_file, upright


def test_training_sample_of_a_phone_photo_is_upright_with_its_box_on_the_object(tmp_path):
    images, ann_file, upright = _phone_dataset(tmp_path, (300, 200))
    image, target = CocoDetection(images, ann_file)[0]
    assert image.shape == (3, 200, 300)
    x1, y1, x2, y2 = (int(v) for v in target.boxes[0].tolist())
    inside = image[:, y1 + 5:y2 - 5, x1 + 5:x2 - 5].float()
    assert inside.min() > 200  # the (JPEG-compressed) white object under its box
    assert (image.float() - torch.from_numpy(upright).permute(2, 0, 1).float()).abs().mean() < 3


def test_json_size_of_the_unrotated_pixels_names_the_orientation(tmp_path):
    images, ann_file, _ = _phone_dataset(tmp_path, (200, 300))  # the stored (sideways) size
    with pytest.raises(DatasetError) as err:
        CocoDetection(images, ann_file)
    message = str(err.value)
    assert "phone.jpg of image id 7 is 300x200 after its EXIF orientation 6 (rotated 90 degrees clockwise)" in message
    assert "says 200x300" in message and "before the EXIF rotation" in message
    assert "annotations were most likely made on the unrotated image" in message


class _RecordingDetector:
    """An ImageDetector stand-in that records the images it is given and detects nothing."""

    def __init__(self) -> None:
        self.cfg = Config()
        self.seen: list[tuple[int, ...]] = []

    def detect(self, image: torch.Tensor) -> Detections:
        self.seen.append(tuple(image.shape))
        return Detections(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.int64))

    def labels(self) -> tuple[list[str], list[int]]:
        return ["thing"], [1]


def test_prediction_and_api_read_images_upright(tmp_path):
    images, _, upright = _phone_dataset(tmp_path, (300, 200))
    detector = _RecordingDetector()
    predict_images(detector, [images / "phone.jpg"], tmp_path / "out")
    assert detector.seen == [(3, 200, 300)]
    assert Image.open(tmp_path / "out" / "phone.jpg").size == (300, 200)

    from codetr.api import _images
    with Image.open(images / "phone.jpg") as pil:
        tensors = [t for t, _ in _images([images / "phone.jpg", pil], DEFAULT_MAX_IMAGE_PIXELS)]
    assert [tuple(t.shape) for t in tensors] == [(3, 200, 300)] * 2


def test_16_bit_png_keeps_its_high_byte(tmp_path):
    values = (np.arange(48 * 64, dtype=np.uint32).reshape(48, 64) * 21).astype(np.uint16)  # 0 .. 64491
    Image.fromarray(values).save(tmp_path / "depth.png")
    assert Image.open(tmp_path / "depth.png").mode == "I;16"
    pixels = read_image(tmp_path / "depth.png")
    assert pixels.dtype == torch.uint8 and pixels.shape == (3, 48, 64)
    expected = torch.from_numpy((values // 256).astype(np.uint8))
    for channel in pixels:
        assert torch.equal(channel, expected)
    assert pixels.float().mean() < 200  # Pillow's convert("RGB") makes it nearly all 255


def _mode_cases() -> list[tuple[str, str]]:
    return [("1", ".png"), ("L", ".png"), ("LA", ".png"), ("P", ".png"), ("P transparent", ".png"), ("RGBA", ".png"),
            ("CMYK", ".jpg"), ("CMYK", ".tif"), ("I", ".tif"), ("F", ".tif"), ("I;16", ".png"), ("I;16", ".tif")]


@pytest.mark.parametrize(("mode", "suffix"), _mode_cases())
def test_every_pillow_mode_reads_as_8_bit_rgb(tmp_path, mode, suffix):
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, (20, 30), dtype=np.uint8)
    rgb = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    expected = np.repeat(grey[..., None], 3, axis=-1)  # reference pixels, (H, W, 3) uint8
    if mode == "1":
        image, expected = Image.fromarray(grey > 127), np.repeat(np.where(grey > 127, 255, 0)[..., None], 3, -1)
    elif mode == "L":
        image = Image.fromarray(grey)
    elif mode == "LA":
        image = Image.merge("LA", [Image.fromarray(grey), Image.fromarray(255 - grey)])
    elif mode.startswith("P"):
        image = Image.fromarray(rgb).quantize(16)
        palette = np.array(image.getpalette()[:48], dtype=np.uint8).reshape(16, 3)
        expected = palette[np.asarray(image)]
        if mode == "P transparent":
            image.info["transparency"] = bytes([0] * 5 + [255] * 11)  # alpha of each palette entry: dropped
            mode = "P"
    elif mode == "RGBA":
        image, expected = Image.fromarray(np.dstack([rgb, grey])), rgb
    elif mode == "CMYK":
        image, expected = Image.fromarray(rgb).convert("CMYK"), None  # lossy / Pillow's own colour conversion
    elif mode == "I":
        image = Image.fromarray(grey.astype(np.int32) * 256 + 255)  # 16-bit values in an int32 image
    elif mode == "F":
        image = Image.fromarray(grey.astype(np.float32) - 0.3)
    else:  # "I;16"
        image = Image.fromarray(grey.astype(np.uint16) * 256 + 17)
    path = tmp_path / f"image{suffix}"
    image.save(path)
    assert Image.open(path).mode == mode
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. Pillow's about palette transparency
        result = open_image(path)
    assert result.mode == "RGB" and result.size == (30, 20)
    if expected is not None:
        np.testing.assert_array_equal(np.asarray(result), expected)


def test_truncated_and_undecodable_files_are_named(tmp_path):
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (60, 80, 3), dtype=np.uint8)).save(tmp_path / "cut.jpg")
    data = (tmp_path / "cut.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[:len(data) // 2])
    (tmp_path / "noise.png").write_bytes(np.random.default_rng(1).bytes(500))
    with pytest.raises(ImageFileError, match=r"cut\.jpg is truncated or corrupt"):
        open_image(tmp_path / "cut.jpg")
    with pytest.raises(ImageFileError, match=r"noise\.png is not an image Pillow can read"):
        open_image(tmp_path / "noise.png")

    # in a dataset: the header reads fine at load time, the decode fails naming the image id
    (tmp_path / "ann.json").write_text(json.dumps({
        "images": [{"id": 3, "file_name": "cut.jpg", "width": 80, "height": 60}],
        "annotations": [{"id": 1, "image_id": 3, "category_id": 1, "bbox": [1, 1, 20, 20], "area": 400}],
        "categories": [{"id": 1, "name": "a"}]}))
    dataset = CocoDetection(tmp_path, tmp_path / "ann.json")
    with pytest.raises(UserError, match=r"cut\.jpg is truncated or corrupt.*\(image id 3 of .*ann\.json\)"):
        dataset[0]


def test_pixel_limit_names_file_and_setting(tmp_path, monkeypatch):
    Image.new("RGB", (40, 30)).save(tmp_path / "big.png")
    with pytest.raises(ImageFileError, match=r"big\.png is 40x30 = 1,200 pixels, more than the limit of 1,000 "
                                             r"\(data\.max_image_pixels.*data\.max_image_pixels=1200"):
        open_image(tmp_path / "big.png", max_pixels=1000)
    # a higher limit (or none) opens files above Pillow's own, which stays in place afterwards
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(Image.DecompressionBombError):
        Image.open(tmp_path / "big.png")
    assert open_image(tmp_path / "big.png", max_pixels=None).size == (40, 30)
    assert read_header(tmp_path / "big.png", max_pixels=5000).size == (40, 30)
    assert Image.MAX_IMAGE_PIXELS == 100
    assert DataConfig().max_image_pixels == DEFAULT_MAX_IMAGE_PIXELS == 2 * 89478485
