"""Copy-paste (the released LSJ recipe's mmdet CopyPaste): its selection and pasting rules."""

from collections import Counter

import pytest
import torch

from codetr.data.copy_paste import CopyPaste, paste_objects, select_objects
from codetr.structures import Target


def _target(rects: list[tuple[int, int, int, int]], labels: list[int], size: int = 100) -> Target:
    masks = torch.zeros((len(rects), size, size), dtype=torch.bool)
    for i, (x1, y1, x2, y2) in enumerate(rects):
        masks[i, y1:y2, x1:x2] = True
    boxes = torch.tensor(rects, dtype=torch.float32).reshape(-1, 4)
    return Target(boxes, torch.tensor(labels, dtype=torch.int64), image_id=7, orig_size=(50, 60), masks=masks)


def test_selection_draws_zero_to_min_n_and_max_minus_one_distinct_objects():
    target = _target([(i, i, i + 5, i + 5) for i in range(6)], list(range(6)), size=16)
    torch.manual_seed(0)
    counts = Counter()
    for _ in range(400):
        chosen = select_objects(target, max_pasted=100)
        labels = chosen.labels.tolist()
        assert len(set(labels)) == len(labels)  # without replacement
        for i, label in enumerate(labels):  # boxes and masks follow their labels
            assert torch.equal(chosen.boxes[i], target.boxes[label]) and torch.equal(chosen.masks[i], target.masks[label])
        counts[len(labels)] += 1
    assert set(counts) == set(range(7))  # 0 .. N, each about 1 / 7 of the time
    assert min(counts.values()) > 30
    capped = {len(select_objects(target, max_pasted=3).labels) for _ in range(100)}
    assert capped == {0, 1, 2}  # 0 .. max_pasted - 1


def test_pasting_occludes_updates_and_drops_destination_objects_by_the_released_rules():
    dst = _target([
        (10, 10, 30, 30),  # 0: fully covered -> empty mask, box moved > 10 px, 0 px left: dropped
        (40, 40, 80, 80),  # 1: left half covered -> 800 px left (> 300): kept, box from what is left
        (0, 85, 10, 95),  # 2: 2 columns covered -> box moves 2 px (<= 10): kept although 80 px left
        (85, 0, 100, 15),  # 3: 12 of 15 columns covered -> box moves 12 px, 45 px left: dropped
    ], [0, 1, 2, 3])
    src = _target([(5, 5, 35, 35), (30, 30, 60, 100), (85, 0, 97, 20)], [4, 5, 6])
    src.masks[1, :, :] = False  # the pasted mask need not fill its box
    src.masks[1, 30:100, 30:60] = True
    src.masks[1, :, :8] = False
    dst.masks[2, :, :] = False
    dst.masks[2, 85:95, 0:10] = True
    src.masks[1, 85:95, 8:10] = True  # covers columns 8-9 of object 2
    image = torch.full((3, 100, 100), 7, dtype=torch.uint8)
    src_image = torch.full((3, 100, 100), 200, dtype=torch.uint8)

    out_image, out = paste_objects(image, dst, src_image, src)

    pasted = src.masks.any(0)
    assert torch.equal(out_image, torch.where(pasted, src_image, image))
    assert out.labels.tolist() == [1, 2, 4, 5, 6]  # kept destination objects, then the pasted ones
    expected_1 = dst.masks[1] & ~pasted
    assert torch.equal(out.masks[0], expected_1) and int(expected_1.sum()) == 800
    ys, xs = torch.nonzero(expected_1, as_tuple=True)
    assert out.boxes[0].tolist() == [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]
    assert out.boxes[1].tolist() == [0.0, 85.0, 8.0, 95.0] and int(out.masks[1].sum()) == 80
    assert torch.equal(out.boxes[2:], src.boxes) and torch.equal(out.masks[2:], src.masks)
    assert out.image_id == 7 and out.orig_size == (50, 60)


def test_nothing_chosen_leaves_the_destination_unchanged_and_finish_runs_on_the_image():
    dst = _target([(10, 10, 30, 30)], [0])
    src = _target([(0, 0, 100, 100)], [1])
    image = torch.full((3, 100, 100), 7, dtype=torch.uint8)
    out_image, out = paste_objects(image, dst, image.clone(), select_objects(src, max_pasted=1))
    assert torch.equal(out_image, image) and torch.equal(out.boxes, dst.boxes) and torch.equal(out.masks, dst.masks)
    mixed, target = CopyPaste(lambda x: x.float() / 2, max_pasted=1)((image, dst), (image.clone(), src))
    assert mixed.dtype == torch.float32 and torch.all(mixed == 3.5) and target.labels.tolist() == [0]


def test_copy_paste_needs_masks_and_one_canvas_size():
    dst, src = _target([(10, 10, 30, 30)], [0]), _target([(0, 0, 10, 10)], [1])
    with pytest.raises(ValueError, match="one size"):
        paste_objects(torch.zeros(3, 100, 100), dst, torch.zeros(3, 90, 100), src)
    dst.masks = None
    with pytest.raises(ValueError, match="with_masks"):
        CopyPaste(lambda x: x)((torch.zeros(3, 100, 100), dst), (torch.zeros(3, 100, 100), src))
