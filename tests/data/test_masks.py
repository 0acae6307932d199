"""Instance masks: segmentations decoded and encoded against pycocotools, mask boxes against a
naive loop, masks mapped back to the stored image."""

import numpy as np
import pycocotools.mask as reference
import pytest
import torch

from codetr.data.masks import decode_segmentation, encode_masks, mask_boxes, rle_runs


def _rng_masks(count: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    """Random blobs: each mask a union of rectangles (some masks empty)."""
    gen = torch.Generator().manual_seed(seed)
    masks = torch.zeros((count, height, width), dtype=torch.bool)
    for i in range(count):
        for _ in range(int(torch.randint(0, 4, (), generator=gen))):
            x1, x2 = sorted(torch.randint(0, width + 1, (2,), generator=gen).tolist())
            y1, y2 = sorted(torch.randint(0, height + 1, (2,), generator=gen).tolist())
            masks[i, y1:y2, x1:x2] = True
    return masks


def _runs(mask: np.ndarray) -> list[int]:
    """Run lengths of a mask, column by column, starting with background, counted by hand."""
    runs, value, count = [], False, 0
    for pixel in mask.flatten(order="F"):
        if pixel != value:
            runs.append(count)
            value, count = pixel, 0
        count += 1
    return runs + [count]


def _pycocotools_polygons(polygons: list[list[float]], height: int, width: int) -> np.ndarray:
    return reference.decode(reference.merge(reference.frPyObjects(polygons, height, width))).astype(bool)


def test_polygons_decode_as_pycocotools_does():
    polygons = [[3.2, 4.0, 30.5, 6.0, 25.0, 28.7, 5.0, 20.0], [33.0, 2.0, 39.0, 2.0, 36.0, 9.5]]
    mask = decode_segmentation(polygons, 31, 41)
    assert mask.shape == (31, 41) and mask.dtype == bool and mask.sum() > 300
    np.testing.assert_array_equal(mask, _pycocotools_polygons(polygons, 31, 41))


def test_polygons_of_fewer_than_three_points_are_left_out():
    """pycocotools reads a four-number polygon as a box; here it is not part of the mask."""
    good = [2.0, 2.0, 12.0, 2.0, 12.0, 12.0]
    mask = decode_segmentation([good, [20.0, 20.0, 30.0, 28.0], [1.0, 1.0]], 32, 32)
    np.testing.assert_array_equal(mask, _pycocotools_polygons([good], 32, 32))
    assert not decode_segmentation([[1.0, 1.0, 5.0, 5.0]], 32, 32).any()
    assert not decode_segmentation([], 32, 32).any()


def test_uncompressed_and_compressed_rle_decode_as_pycocotools_does():
    masks = _rng_masks(4, 23, 17, seed=3)
    for mask in masks.numpy():
        rle = reference.encode(np.asfortranarray(mask.astype(np.uint8)))
        compressed = {"size": rle["size"], "counts": rle["counts"].decode()}
        np.testing.assert_array_equal(decode_segmentation(compressed, 23, 17), mask)
        np.testing.assert_array_equal(decode_segmentation({"size": [23, 17], "counts": _runs(mask)}, 23, 17), mask)


def test_compressed_counts_read_back_as_the_runs_counted_by_hand():
    masks = _rng_masks(8, 40, 70, seed=5)
    masks[0] = True  # one run of 2800 (several 5-bit groups), and runs that shrink (negative differences)
    for mask in masks.numpy():
        rle = reference.encode(np.asfortranarray(mask.astype(np.uint8)))
        assert rle_runs(rle["counts"].decode()) == _runs(mask)
    for broken, words in (("P1370000!", "character '!' at 8"), ("P13700000`", "ends inside a number"), ("011M", "run 3 is negative")):
        with pytest.raises(ValueError, match=words):
            rle_runs(broken)


def test_encoded_masks_are_coco_results_rle_that_pycocotools_decodes():
    masks = _rng_masks(6, 20, 33, seed=1)
    encoded = encode_masks(masks)
    assert len(encoded) == 6
    for rle, mask in zip(encoded, masks):
        assert rle["size"] == [20, 33] and isinstance(rle["counts"], str)
        np.testing.assert_array_equal(reference.decode(rle).astype(bool), mask.numpy())
    assert encode_masks(torch.zeros((0, 5, 5), dtype=torch.bool)) == []


def test_mask_boxes_are_the_pixel_edge_extent_and_zero_when_empty():
    masks = _rng_masks(12, 15, 21, seed=2)
    masks[0] = False
    expected = []
    for mask in masks:
        ys, xs = np.nonzero(mask.numpy())
        expected.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1] if len(xs) else [0, 0, 0, 0])
    torch.testing.assert_close(mask_boxes(masks), torch.tensor(expected, dtype=torch.float32))
    assert mask_boxes(torch.zeros((0, 4, 4), dtype=torch.bool)).shape == (0, 4)
