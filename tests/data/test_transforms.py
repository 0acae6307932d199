import dataclasses
import math

import numpy as np
import pytest
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

from codetr.config import DataConfig
from codetr.data.masks import mask_boxes
from codetr.data.transforms import IMAGENET_MEAN, IMAGENET_STD, LSJ_PAD_VALUE, RandomSizeCrop, build_transforms

# Small sizes keep the tests fast; the policy is the same as with the COCO defaults.
CFG = DataConfig(train_scales=[96, 112, 128, 144], max_size=200, crop_resize_scales=[100, 120],
                 crop_size=[60, 110], test_scale=128)
GREY = 128
RED, BLUE = (255, 0, 0), (0, 0, 255)


def _scene(height: int, width: int, rects: list[tuple[tuple[int, int, int, int], tuple[int, int, int]]]):
    """Grey image with filled rectangles; rect (x1, y1, x2, y2) covers pixels x1..x2-1, y1..y2-1."""
    image = torch.full((3, height, width), GREY, dtype=torch.uint8)
    for (x1, y1, x2, y2), colour in rects:
        image[:, y1:y2, x1:x2] = torch.tensor(colour, dtype=torch.uint8)[:, None, None]
    boxes = tv_tensors.BoundingBoxes(torch.tensor([r for r, _ in rects], dtype=torch.float32).reshape(-1, 4),
                                     format="XYXY", canvas_size=(height, width))
    return tv_tensors.Image(image), {"boxes": boxes, "labels": torch.arange(len(rects))}


def _unnormalize(image: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN)[:, None, None]
    std = torch.tensor(IMAGENET_STD)[:, None, None]
    return (image * std + mean) * 255


def _colour_box(image: torch.Tensor, colour: tuple[int, int, int]) -> torch.Tensor | None:
    """xyxy box of the pixels closer to ``colour`` than to the grey background, or None."""
    target = torch.tensor(colour, dtype=torch.float32)[:, None, None]
    close = (image - target).abs().sum(0) < (image - GREY).abs().sum(0)
    if not close.any():
        return None
    ys, xs = torch.nonzero(close, as_tuple=True)
    return torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32)


def test_train_boxes_follow_the_image_content():
    transforms = build_transforms(CFG, train=True)
    # a large rectangle and a small one near the border, so crops cut through or remove them
    rects = [((30, 20, 110, 70), RED), ((140, 80, 152, 96), BLUE)]
    kept = dropped = clipped = 0
    for trial in range(60):
        torch.manual_seed(trial)
        image, target = transforms(*_scene(100, 160, rects))
        assert image.dtype == torch.float32 and image.shape[0] == 3
        assert target["boxes"].canvas_size == tuple(image.shape[-2:])
        pixels = _unnormalize(image)
        for label, (_, colour) in enumerate(rects):
            found = _colour_box(pixels, colour)
            rows = (target["labels"] == label).nonzero().flatten()
            if len(rows) == 0:  # removed: at most a sliver of the colour is left in view
                assert found is None or min(found[2] - found[0], found[3] - found[1]) <= 2
                dropped += 1
                continue
            box = target["boxes"][rows[0]]
            assert found is not None, f"trial {trial}: box {box} kept but its colour is gone"
            assert torch.allclose(box, found, atol=2.0), f"trial {trial}: box {box} vs pixels {found}"
            kept += 1
            clipped += bool(box[0] == 0 or box[1] == 0 or box[2] == image.shape[-1] or box[3] == image.shape[-2])
    assert kept > 60 and dropped > 0 and clipped > 0  # all three situations were exercised


def test_flip_maps_x_to_width_minus_x():
    # every resize/crop choice is the identity on a 100 x 160 image: only the flip remains
    cfg = DataConfig(train_scales=[100], max_size=1000, crop_resize_scales=[100], crop_size=[200, 200])
    transforms = build_transforms(cfg, train=True)
    boxes = torch.tensor([[10.0, 20.0, 50.0, 70.0], [0.0, 0.0, 160.0, 30.0]])
    flipped = torch.stack([160 - boxes[:, 2], boxes[:, 1], 160 - boxes[:, 0], boxes[:, 3]], dim=1)
    image, target = _scene(100, 160, [((10, 20, 50, 70), RED)])
    target["boxes"] = tv_tensors.wrap(boxes, like=target["boxes"])
    target["labels"] = torch.tensor([0, 1])
    seen = set()
    for trial in range(20):
        torch.manual_seed(trial)
        out_image, out = transforms(image, dict(target))
        assert out_image.shape == (3, 100, 160)
        is_flipped = torch.equal(out["boxes"], flipped)
        assert is_flipped or torch.equal(out["boxes"], boxes)
        red = _colour_box(_unnormalize(out_image), RED)
        assert torch.allclose(red, out["boxes"][0], atol=1.0)
        seen.add(is_flipped)
    assert seen == {True, False}


@pytest.mark.parametrize(("size", "max_size", "expected"), [
    ((100, 200), 1000, (128, 256)),  # shorter side -> test_scale
    ((100, 200), 200, (100, 200)),  # longer side capped at max_size
    ((300, 120), 1000, (320, 128)),
    ((100, 100), 128, (128, 128)),  # square images with max_size == test_scale are allowed
])
def test_val_resize_scales_image_and_boxes(size, max_size, expected):
    cfg = DataConfig(test_scale=128, max_size=max_size)
    h, w = size
    image, target = _scene(h, w, [((w // 4, h // 4, w // 2, h // 2), RED)])
    out_image, out = build_transforms(cfg, train=False)(image, target)
    assert tuple(out_image.shape[-2:]) == expected
    sy, sx = expected[0] / h, expected[1] / w
    scale = torch.tensor([sx, sy, sx, sy])
    torch.testing.assert_close(out["boxes"].as_subclass(torch.Tensor), target["boxes"] * scale)
    assert torch.allclose(_colour_box(_unnormalize(out_image), RED), out["boxes"][0], atol=1.0)


def test_val_output_is_imagenet_normalised():
    image, target = _scene(50, 60, [])
    out_image, _ = build_transforms(CFG, train=False)(image, target)
    expected = (GREY / 255 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    torch.testing.assert_close(out_image[:, 10, 10], expected)


def test_train_resize_respects_shorter_side_and_max_size():
    transforms = build_transforms(CFG, train=True)
    for trial in range(40):
        torch.manual_seed(trial)
        h, w = (90, 240) if trial % 2 else (150, 120)  # wide images hit max_size=200
        image, _ = transforms(*_scene(h, w, [((5, 5, 40, 40), RED)]))
        short, long = sorted(image.shape[-2:])
        assert long <= CFG.max_size
        assert short in CFG.train_scales or long >= CFG.max_size - 1, (trial, image.shape)


def test_crop_branch_first_resize_caps_the_longer_side(monkeypatch):
    # a 20 x 400 strip: shorter side 400 would make it 400 x 8000; the released cap 4200 gives
    # 210 x 4200 (scale min(400 / 20, 4200 / 400) = 10.5), the image the random crop receives
    cfg = DataConfig(train_scales=[64], max_size=4000, crop_resize_scales=[400], crop_size=[100, 100])
    assert cfg.crop_max_size == 4200
    seen = []
    real = RandomSizeCrop.make_params

    def recording(self, flat_inputs):
        seen.append(v2.query_size(flat_inputs))
        return real(self, flat_inputs)

    monkeypatch.setattr(RandomSizeCrop, "make_params", recording)
    transforms = build_transforms(cfg, train=True)
    for trial in range(8):
        torch.manual_seed(trial)
        transforms(*_scene(20, 400, [((10, 2, 300, 18), RED)]))
    assert seen and set(seen) == {(210, 4200)}


def test_random_size_crop_draws_sizes_in_range_clipped_to_the_image():
    crop = RandomSizeCrop(60, 110)
    sizes = set()
    for trial in range(50):
        torch.manual_seed(trial)
        image, target = _scene(100, 300, [((0, 0, 300, 100), RED)])
        out_image, out = crop(image, target)
        h, w = out_image.shape[-2:]
        assert 60 <= h <= 100 and 60 <= w <= 110
        # the full-image box becomes the whole crop
        assert out["boxes"].tolist() == [[0.0, 0.0, float(w), float(h)]]
        sizes.add((h, w))
    assert len(sizes) > 10
    with pytest.raises(ValueError, match="crop size"):
        RandomSizeCrop(100, 50)


def test_boxes_touching_the_border_survive_any_resize():
    # float resize ratios can push x2/y2 a hair past the image edge; such boxes must be kept
    image, target = _scene(60, 82, [((0, 0, 82, 60), RED), ((70, 50, 82, 60), BLUE)])
    for scale in range(60, 150, 3):  # includes 72 and 87, where 82 * ratio > new width in float32
        cfg = DataConfig(train_scales=[scale], max_size=1000, crop_resize_scales=[scale], crop_size=[999, 999])
        torch.manual_seed(scale)
        out_image, out = build_transforms(cfg, train=True)(image, dict(target))
        h, w = out_image.shape[-2:]
        assert out["labels"].tolist() == [0, 1], scale
        torch.testing.assert_close(out["boxes"][0].as_subclass(torch.Tensor), torch.tensor([0.0, 0.0, w, h]))


@pytest.mark.parametrize(("size", "test_scale", "max_size"), [
    ((289, 289), 800, 1333), ((232, 290), 800, 1333), ((201, 335), 800, 1333), ((200, 596), 800, 1333),
])
def test_val_resize_matches_torchvision_resize(size, test_scale, max_size):
    # sizes where float rounding in other formulas lands one pixel off
    image, target = _scene(*size, [((10, 10, 40, 40), RED)])
    out_image, _ = build_transforms(DataConfig(test_scale=test_scale, max_size=max_size), train=False)(image, target)
    expected = v2.Resize(test_scale, max_size=max_size)(tv_tensors.Image(torch.zeros(3, *size)))
    assert out_image.shape[-2:] == expected.shape[-2:]


# ------------------------------------------------------------------------ large-scale jitter

GREEN = (0, 255, 0)
LSJ = DataConfig(augment="lsj", lsj_size=96)


def _pad_pixel() -> torch.Tensor:
    """The normalised value of the LSJ padding (114 in every channel)."""
    return (LSJ_PAD_VALUE / 255 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)


def test_lsj_keeps_boxes_on_their_objects():
    """Three filled rectangles of distinct colours: after each random LSJ (scale 0.1-2.0, crop,
    flip, pad), every kept box still covers its own colour (pixels 2 px inside its borders),
    boxes lie on the canvas, and removed boxes have (almost) no colour left in view."""
    transforms = build_transforms(LSJ, train=True)
    rects = [((20, 10, 100, 70), RED), ((110, 60, 150, 110), BLUE), ((4, 80, 40, 116), GREEN)]
    kept = dropped = clipped = flipped = small = 0
    longest = []
    for trial in range(60):
        torch.manual_seed(trial)
        image, target = transforms(*_scene(120, 160, rects))
        assert image.shape == (3, 96, 96) and target["boxes"].canvas_size == (96, 96)
        pixels = _unnormalize(image)
        boxes = target["boxes"].as_subclass(torch.Tensor)
        assert torch.all(boxes >= 0) and torch.all(boxes <= 96)
        content = (image - _pad_pixel()[:, None, None]).abs().sum(0) > 1e-3  # not padding
        longest.append(int(max(content.any(0).sum(), content.any(1).sum())))
        for label, (_, colour) in enumerate(rects):
            rows = (target["labels"] == label).nonzero().flatten()
            found = _colour_box(pixels, colour)
            if len(rows) == 0:
                assert found is None or min(found[2] - found[0], found[3] - found[1]) <= 2, trial
                dropped += 1
                continue
            x1, y1, x2, y2 = boxes[rows[0]].tolist()
            kept += 1
            if min(x2 - x1, y2 - y1) < 5:  # shrunk, or a sliver left by the crop (kept, as released)
                small += 1
                continue
            inside = pixels[:, math.ceil(y1 + 1.5):math.floor(y2 - 1.5), math.ceil(x1 + 1.5):math.floor(x2 - 1.5)]
            expected = torch.tensor(colour, dtype=torch.float32)[:, None, None]
            assert inside.numel() and torch.allclose(inside, expected.expand_as(inside), atol=1.0), (trial, label)
            assert found is not None and torch.allclose(boxes[rows[0]], found, atol=2.5), (trial, label, found)
            clipped += bool(x1 == 0 or y1 == 0 or x2 == 96 or y2 == 96)
            if label == 0:  # red is left of blue in the scene; mirrored after a flip
                blue = (target["labels"] == 1).nonzero().flatten()
                flipped += bool(len(blue) and boxes[blue[0], 0] < x1)
    assert kept - small > 60 and small > 0 and dropped > 0 and clipped > 0 and flipped > 0
    assert min(longest) <= 30 and max(longest) == 96  # shrunk to a fraction, or cropped to the canvas


@pytest.mark.parametrize(("size", "content"), [
    ((100, 150), (43, 64)),  # mmcv rounds 42.67 to 43 (ScaleJitter's flooring gives 42)
    ((150, 100), (64, 43)),
    ((30, 40), (48, 64)),  # small images are enlarged to fit
    ((64, 64), (64, 64)),
])
def test_lsj_val_fits_the_image_in_the_canvas_and_pads_with_114(size, content):
    cfg = DataConfig(augment="lsj", lsj_size=64)
    h, w = size
    image, target = _scene(h, w, [((w // 4, h // 4, w // 2, h // 2), RED)])
    torch.manual_seed(0)
    state = torch.get_rng_state()
    out_image, out = build_transforms(cfg, train=False)(image, target)
    assert torch.equal(torch.get_rng_state(), state)  # test time draws nothing
    assert out_image.shape == (3, 64, 64) and out["content_size"] == content
    ch, cw = content
    scale = torch.tensor([cw / w, ch / h, cw / w, ch / h])
    torch.testing.assert_close(out["boxes"].as_subclass(torch.Tensor), target["boxes"] * scale)
    pad = _pad_pixel()[:, None, None]
    assert torch.allclose(out_image[:, ch:, :], pad.expand(3, 64 - ch, 64), atol=1e-5)
    assert torch.allclose(out_image[:, :, cw:], pad.expand(3, 64, 64 - cw), atol=1e-5)
    torch.testing.assert_close(_unnormalize(out_image)[:, ch - 1, 0], torch.full((3,), float(GREY)))
    assert torch.allclose(_colour_box(_unnormalize(out_image), RED), out["boxes"][0], atol=1.0)


def test_bad_augment_settings_are_errors_naming_the_field():
    with pytest.raises(ValueError, match="data.augment"):
        build_transforms(DataConfig(augment="mosaic"), train=True)
    with pytest.raises(ValueError, match="data.lsj_size"):
        build_transforms(DataConfig(augment="lsj", lsj_size=0), train=False)
    with pytest.raises(ValueError, match="data.lsj_scale_range"):
        build_transforms(DataConfig(augment="lsj", lsj_scale_range=[2.0, 0.1]), train=True)


# ------------------------------------------------------------------------------------- masks

MASK_POLICIES = {
    "detr": CFG, "detr_mmcv": dataclasses.replace(CFG, resize="mmcv"),
    "lsj": dataclasses.replace(LSJ, with_masks=True), "lsj_mmcv": dataclasses.replace(LSJ, with_masks=True, resize="mmcv"),
}


def _masked_scene(height: int, width: int, rects):
    """_scene with each rectangle's exact mask in ``"masks"``."""
    image, target = _scene(height, width, rects)
    masks = torch.zeros((len(rects), height, width), dtype=torch.bool)
    for i, ((x1, y1, x2, y2), _) in enumerate(rects):
        masks[i, y1:y2, x1:x2] = True
    target["masks"] = tv_tensors.Mask(masks)
    return image, target


@pytest.mark.parametrize("policy", list(MASK_POLICIES))
@pytest.mark.parametrize("train", [True, False])
def test_masks_move_with_their_boxes_and_the_image(policy, train):
    """Rectangles with exact masks: after every random flip / resize / crop / pad, each kept mask's
    box is its box within a pixel (exactly, for LSJ training: the released recompute_bbox), masks
    are dropped with their boxes, and a mask covers its own colour in the image. (Boxes are scaled
    by float ratios, masks by nearest neighbour, as mmdet's BitmapMasks.)"""
    cfg = MASK_POLICIES[policy]
    transforms = build_transforms(cfg, train=train)
    rects = [((20, 10, 100, 70), RED), ((110, 60, 150, 110), BLUE), ((4, 80, 40, 116), GREEN)]
    kept = dropped = 0
    for trial in range(25 if train else 1):
        torch.manual_seed(trial)
        image, target = transforms(*_masked_scene(120, 160, rects))
        masks, boxes = target["masks"].as_subclass(torch.Tensor), target["boxes"].as_subclass(torch.Tensor)
        assert isinstance(target["masks"], tv_tensors.Mask) and masks.dtype == torch.bool
        assert masks.shape == (len(boxes), *image.shape[-2:]) and len(target["labels"]) == len(boxes)
        dropped += len(rects) - len(boxes)
        # under a pixel per nearest resize, scaled up by the next one (the DETR crop branch resizes
        # twice, the second time by up to max(train_scales) / min(crop_size))
        tolerance = 0.0 if policy.startswith("lsj") and train else 1.0 + max(cfg.train_scales) / min(cfg.crop_size) \
            if train else 1.0
        torch.testing.assert_close(mask_boxes(masks), boxes, atol=tolerance, rtol=0)
        if "content_size" in target:  # nothing on the padding
            h, w = target["content_size"]
            assert not masks[:, h:].any() and not masks[:, :, w:].any()
        pixels = _unnormalize(image)
        for mask, label, (x1, y1, x2, y2) in zip(masks, target["labels"].tolist(), mask_boxes(masks).tolist()):
            colour = torch.tensor(rects[label][1], dtype=torch.float32)[:, None, None]
            close = (pixels - colour).abs().sum(0) < 30
            if min(x2 - x1, y2 - y1) >= 12:  # not a sliver: the mask is its colour, up to the (blurred) borders
                kept += 1
                assert (mask & close).sum() >= 0.7 * mask.sum() and (mask & close).sum() >= 0.7 * close.sum()
    assert kept > 0 and (dropped > 0 or not train)


def test_mmcv_mask_resize_is_cv2_nearest():
    """mmdet resizes BitmapMasks with cv2 INTER_NEAREST (mmcv.imrescale): the same pixels."""
    cv2 = pytest.importorskip("cv2")
    from codetr.data.transforms import KeepRatioResize

    masks = torch.rand(3, 37, 53, generator=torch.Generator().manual_seed(0)) > 0.6
    for size in (20, 64, 97, 150):
        out = KeepRatioResize(size, mode="mmcv")(tv_tensors.Mask(masks))
        h, w = out.shape[-2:]
        for ours, mask in zip(out, masks):
            expected = cv2.resize(mask.numpy().astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST)
            np.testing.assert_array_equal(ours.numpy(), expected.astype(bool))


def test_transforms_without_masks_leave_the_target_without_masks():
    image, target = build_transforms(MASK_POLICIES["lsj"], train=True)(*_scene(60, 80, [((5, 5, 30, 30), RED)]))
    assert "masks" not in target and len(target["boxes"]) <= 1
