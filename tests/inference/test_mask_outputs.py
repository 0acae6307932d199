"""Masks wherever a user meets results: ``LoadedModel.detect`` (masks in the image given),
``codetr predict``'s drawings and predictions.json (RLE), ``Detector.predict`` and
``to_supervision()``, and test-time augmentation (boxes only, said once). A test double stands in
for a mask model: it finds each bright region of its input and returns its box and exact mask."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pycocotools.mask as coco_reference
import pytest
import torch
from PIL import Image
from scipy import ndimage
from torch import nn

from codetr import Detector
from codetr.config import Config, DataConfig, ModelConfig, TTAConfig
from codetr.data.masks import mask_boxes
from codetr.inference.loading import LoadedModel
from codetr.inference.predict import predict_images
from codetr.inference.tta import TTADetector
from codetr.inference.visualize import MASK_OPACITY, draw_masks
from codetr.models.mask.paste import crop_masks, paste_into_image
from codetr.structures import Batch, Detections

HEIGHT, WIDTH = 90, 120
MASK_IOU = 0.75


class RegionMaskDetector(nn.Module):
    """Each connected bright region of the unpadded input: its box (xyxy, input pixels), label 0, score
    0.9 - 0.1 * k (k-th region), its mask in the image as stored, pasted there as the mask branch pastes
    (its crop in the box at 112 x 112, :func:`codetr.models.mask.paste.paste_into_image`), and a mask
    score of MASK_IOU x the box score."""

    def __init__(self) -> None:
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(1))

    def predict(self, batch: Batch) -> list[Detections]:
        out = []
        for image, (h, w), target in zip(batch.images, batch.image_sizes.tolist(), batch.targets):
            regions, count = ndimage.label((image[:, :h, :w].mean(0) > 0.5).numpy())
            masks = torch.from_numpy(np.stack([regions == k + 1 for k in range(count)]).reshape(count, h, w))
            boxes = mask_boxes(masks)
            probs = crop_masks(masks, boxes, torch.arange(count), 112)
            scores = 0.9 - 0.1 * torch.arange(count, dtype=torch.float32)
            out.append(Detections(boxes, scores, torch.zeros(count, dtype=torch.int64),
                                  paste_into_image(probs, boxes, (h, w), target), MASK_IOU * scores))
        return out


def _objects() -> torch.Tensor:
    """(2, H, W) bool: a disc and an L-shape."""
    yy, xx = torch.meshgrid(torch.arange(HEIGHT), torch.arange(WIDTH), indexing="ij")
    disc = (yy - 30) ** 2 + (xx - 35) ** 2 <= 18 ** 2
    ell = torch.zeros(HEIGHT, WIDTH, dtype=torch.bool)
    ell[50:85, 70:80] = True
    ell[75:85, 70:110] = True
    return torch.stack([disc, ell])


def _image() -> torch.Tensor:
    image = torch.full((3, HEIGHT, WIDTH), 20, dtype=torch.uint8)
    image[:, _objects().any(0)] = 250
    return image


def _model(augment: str = "detr", scale: int = 60) -> LoadedModel:
    data = DataConfig(augment=augment, test_scale=scale, max_size=1000, lsj_size=scale, tta=TTAConfig(scales=[60, 90]))
    return LoadedModel(RegionMaskDetector().eval(), Config(model=ModelConfig(num_classes=1), data=data), ["thing"], [7])


def _iou(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a & b).sum() / (a | b).sum())


def _detector(loaded: LoadedModel) -> Detector:
    detector = Detector.__new__(Detector)  # the API around a test double
    detector.device = torch.device("cpu")
    detector._use(loaded, None)
    return detector


@pytest.mark.parametrize(("augment", "scale"), [("detr", 90), ("detr", 60), ("detr", 150), ("lsj", 96)])
def test_masks_come_back_in_the_image_given(augment, scale):
    det = _model(augment, scale).detect(_image())
    assert det.masks is not None and det.masks.shape == (2, HEIGHT, WIDTH) and det.masks.dtype == torch.bool
    for mask, expected in zip(det.masks, _objects()):
        assert _iou(mask, expected) > (0.999 if scale == HEIGHT else 0.9)
    torch.testing.assert_close(mask_boxes(det.masks), det.boxes, atol=2.0, rtol=0)


def test_predict_writes_rle_and_draws_the_masks(tmp_path):
    source = tmp_path / "in"
    source.mkdir()
    Image.fromarray(_image().permute(1, 2, 0).numpy()).save(source / "a.png")
    records = predict_images(_model(scale=HEIGHT), [source / "a.png"], tmp_path / "out", score_thr=0.85)
    written = json.loads((tmp_path / "out" / "predictions.json").read_text())
    assert written == records and len(written) == 1  # the second region scores 0.8
    assert written[0]["score"] == 0.9 and written[0]["mask_score"] == round(MASK_IOU * 0.9, 5)
    rle = written[0]["segmentation"]
    assert rle["size"] == [HEIGHT, WIDTH] and isinstance(rle["counts"], str)
    disc = _objects()[0]
    np.testing.assert_array_equal(coco_reference.decode(rle).astype(bool), disc.numpy())
    drawn = np.asarray(Image.open(tmp_path / "out" / "a.png")).astype(int)
    original = _image().permute(1, 2, 0).numpy().astype(int)
    assert (np.abs(drawn - original).sum(-1)[disc.numpy()] > 0).all()  # tinted (or under the label)
    assert np.array_equal(drawn[_objects()[1].numpy()], original[_objects()[1].numpy()])  # not kept: not drawn


def test_draw_masks_blends_the_fill_and_outlines_the_border():
    image = Image.new("RGB", (20, 16), (100, 100, 100))
    mask = np.zeros((16, 20), dtype=bool)
    mask[4:12, 5:15] = True
    out = np.asarray(draw_masks(image, [mask], [(200, 0, 50)], outline=1)).astype(float)
    border = mask.copy()
    border[5:11, 6:14] = False
    expected_fill = np.round((1 - MASK_OPACITY) * 100 + MASK_OPACITY * np.array([200, 0, 50]))
    np.testing.assert_array_equal(out[border], np.tile([200, 0, 50], (border.sum(), 1)))
    np.testing.assert_array_equal(out[mask & ~border], np.tile(expected_fill, ((mask & ~border).sum(), 1)))
    np.testing.assert_array_equal(out[~mask], np.full(((~mask).sum(), 3), 100))
    with pytest.raises(ValueError, match="mask on a 20x16 image"):
        draw_masks(image, [mask[:, :10]], [(0, 0, 0)])


def test_detector_predict_and_to_supervision_carry_the_masks():
    detector = _detector(_model(scale=HEIGHT))
    result = detector.predict(_image(), score_thr=0.5)[0]
    assert result.masks is not None and result.masks.shape == (2, HEIGHT, WIDTH)
    assert all(_iou(m, e) > 0.999 for m, e in zip(result.masks, _objects()))
    torch.testing.assert_close(result.mask_scores, MASK_IOU * result.scores)
    kept = detector.predict(_image(), score_thr=0.85)[0]
    assert len(kept.masks) == 1 and len(kept.mask_scores) == 1
    torch.testing.assert_close(kept.mask_scores, MASK_IOU * kept.scores)
    supervision = pytest.importorskip("supervision")
    sv = result.to_supervision()
    assert isinstance(sv, supervision.Detections) and sv.mask.shape == (2, HEIGHT, WIDTH) and sv.mask.dtype == bool
    np.testing.assert_array_equal(sv.mask, result.masks.numpy())
    np.testing.assert_array_equal(sv.data["mask_score"], result.mask_scores.numpy())


def test_tta_merges_boxes_only_and_says_so():
    detector = _detector(_model(scale=HEIGHT))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = detector.predict(_image(), score_thr=0.5, tta=True)[0]
    assert result.masks is None and result.mask_scores is None and len(result) == 2
    assert [str(w.message) for w in caught if "test-time augmentation merges boxes only" in str(w.message)]
    with warnings.catch_warnings():  # box-only models: no warning
        warnings.simplefilter("error")
        boxes_only = _model(scale=HEIGHT)
        boxes_only.model.predict = lambda batch: [Detections(d.boxes, d.scores, d.labels)
                                                  for d in RegionMaskDetector().predict(batch)]
        assert TTADetector(boxes_only).detect(_image()).masks is None


def test_box_only_models_write_no_segmentation(tmp_path):
    loaded = _model(scale=HEIGHT)
    loaded.model.predict = lambda batch: [Detections(d.boxes, d.scores, d.labels)
                                          for d in RegionMaskDetector().predict(batch)]
    Image.fromarray(_image().permute(1, 2, 0).numpy()).save(tmp_path / "a.png")
    records = predict_images(loaded, [tmp_path / "a.png"], tmp_path / "out")
    assert len(records) == 2 and not any("segmentation" in r or "mask_score" in r for r in records)
    boxes_only = _detector(loaded).predict(_image())[0]
    assert boxes_only.masks is None and boxes_only.mask_scores is None
