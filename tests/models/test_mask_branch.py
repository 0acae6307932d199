"""The mask branch (codetr/models/mask/) against the released formulas (tests/released_mask.py) on
shared weights and inputs, forward, losses and gradients; its pieces against naive references; and
its composition with Co-DINO: box-only models unchanged, masks at inference, fresh start on --init."""

from __future__ import annotations

import pytest
import torch
from released_mask import area_ratio, bar_loss, block_target, mask_iou_head, paste, refine_at_test, refine_mask_head

from codetr.models.mask.boundary import boundary_aware_loss, mask_boundary, refine_stages
from codetr.models.mask.mask_iou import MaskIoUHead, area_ratios, mask_iou_targets
from codetr.models.mask.paste import crop_masks, paste_into_image, paste_masks
from codetr.models.mask.refine_head import RefineMaskHead
from codetr.ops.boxes import rescale_boxes
from codetr.structures import Target

pytestmark = pytest.mark.usefixtures("one_thread")


def ellipse(h: int, w: int, cx: float, cy: float, rx: float, ry: float) -> torch.Tensor:
    ys, xs = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")
    return ((xs - cx) / rx) ** 2 + ((ys - cy) / ry) ** 2 <= 1


def rectangle(h: int, w: int, x1: int, y1: int, x2: int, y2: int) -> torch.Tensor:
    out = torch.zeros(h, w, dtype=torch.bool)
    out[y1:y2, x1:x2] = True
    return out


def randomised(module: torch.nn.Module, seed: int = 0) -> None:
    """Non-trivial weights everywhere (LayerNorm affine and biases included)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.2 if p.dim() > 1 else 0.5))


def random_rois(n: int, images: int, size: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * size * 0.6
    wh = torch.rand(n, 2, generator=g) * size * 0.4 + 2
    index = torch.randint(0, images, (n, 1), generator=g).float()
    return torch.cat([index, xy, xy + wh], 1)


@pytest.mark.parametrize("classes", [[5, 5, 5, 1], [5, 5, 5, 5]])
def test_refine_head_matches_the_released_head_forward_and_backward(classes: list[int]) -> None:
    head = RefineMaskHead(classes, channels=32, instance_convs=1, semantic_convs=2, semantic_stride=4)
    randomised(head)
    sd = {k: v.detach().clone().requires_grad_(True) for k, v in head.state_dict().items()}
    rois = random_rois(7, 2, 64)
    labels = torch.tensor([0, 4, 2, 1, 3, 4, 0])
    g = torch.Generator().manual_seed(1)
    feats = torch.randn(7, 32, 14, 14, generator=g, requires_grad=True)
    semantic = torch.randn(2, 32, 16, 16, generator=g, requires_grad=True)
    ours = head(feats, semantic, rois, labels)
    ref_feats, ref_semantic = feats.detach().clone().requires_grad_(True), semantic.detach().clone().requires_grad_(True)
    ref = refine_mask_head(sd, ref_feats, ref_semantic, rois, labels, 1, 2, [14, 28, 56, 112], classes, 4)
    assert [tuple(o.shape) for o in ours] == [(7, 1, s, s) for s in (14, 28, 56, 112)]
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    weights = [torch.randn(o.shape, generator=g) for o in ours]
    sum((o * w).sum() for o, w in zip(ours, weights)).backward()
    sum((o * w).sum() for o, w in zip(ref, weights)).backward()
    # gradients summed over 112 x 112 outputs: float32 rounding relative to their largest element
    for grad, ref_grad in ((feats.grad, ref_feats.grad), (semantic.grad, ref_semantic.grad)):
        torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-5 * float(ref_grad.abs().max()))
    for name, p in head.named_parameters():
        torch.testing.assert_close(p.grad, sd[name].grad, rtol=1e-4, atol=1e-3, msg=name)


def test_mask_iou_head_matches_the_released_head() -> None:
    head = MaskIoUHead(6, channels=16, roi_size=14, num_convs=2, num_fcs=1, fc_dim=32)
    randomised(head, seed=1)
    sd = {k: v.detach().clone().requires_grad_(True) for k, v in head.state_dict().items()}
    g = torch.Generator().manual_seed(2)
    feats, logits = torch.randn(5, 16, 14, 14, generator=g), torch.randn(5, 28, 28, generator=g, requires_grad=True)
    ours = head(feats, logits)
    ref_logits = logits.detach().clone().requires_grad_(True)
    ref = mask_iou_head(sd, feats, ref_logits, 2, 1)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    ours[:, 2].sum().backward()
    ref[:, 2].sum().backward()
    torch.testing.assert_close(logits.grad, ref_logits.grad, rtol=1e-4, atol=1e-6)
    for name, p in head.named_parameters():
        torch.testing.assert_close(p.grad, sd[name].grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("width", [1, 2, 3])
def test_boundary_is_the_released_block_target(width: int) -> None:
    g = torch.Generator().manual_seed(width)
    masks = torch.rand(6, 20, 24, generator=g) > 0.5
    masks[0] = ellipse(20, 24, 12, 10, 7, 5)
    masks[1] = False
    masks[2] = True  # the border of the map counts as outside
    assert torch.equal(mask_boundary(masks, width), block_target(masks, width) == 1)
    assert mask_boundary(masks, width)[2, 0].all() and not mask_boundary(masks, width)[1].any()


def test_boundary_aware_loss_matches_the_released_loss_and_gradients() -> None:
    g = torch.Generator().manual_seed(3)
    sizes = (14, 28, 56, 112)
    targets = [torch.stack([ellipse(s, s, s * 0.5, s * 0.45, s * 0.3, s * 0.25),
                            rectangle(s, s, s // 4, s // 8, s, s * 3 // 4),
                            ellipse(s, s, s * 0.3, s * 0.6, s * 0.2, s * 0.35)]).float() for s in sizes]
    logits = [(torch.randn(3, 1, s, s, generator=g) + 4 * (t[:, None] - 0.5)).requires_grad_(True)
              for s, t in zip(sizes, targets)]
    ref_logits = [x.detach().clone().requires_grad_(True) for x in logits]
    weights = [0.5, 0.75, 0.75, 1.0]
    ours = boundary_aware_loss(logits, targets, weights, boundary_width=2)
    ref = bar_loss(ref_logits, targets, weights, boundary_width=2)
    torch.testing.assert_close(ours, ref)
    ours.backward()
    ref.backward()
    for a, b in zip(logits, ref_logits):
        torch.testing.assert_close(a.grad, b.grad)
    # a boundary stage learns on the boundary band only
    assert (logits[3].grad != 0).float().mean() < 0.5 and (logits[1].grad != 0).all()


def test_inference_merge_is_the_released_in_place_merge() -> None:
    g = torch.Generator().manual_seed(4)
    logits = [torch.randn(4, 1, s, s, generator=g) * 3 for s in (14, 28, 56, 112)]
    torch.testing.assert_close(refine_stages(logits[1:]), refine_at_test(logits))


def test_crop_masks_and_area_ratios_against_direct_crops() -> None:
    h, w = 60, 80
    masks = torch.stack([rectangle(h, w, 10, 20, 50, 40), ellipse(h, w, 40, 30, 25, 15)])
    boxes = torch.tensor([[10.0, 20.0, 50.0, 40.0], [10.0, 20.0, 30.0, 40.0], [30.5, 12.7, 70.2, 47.9],
                          [-5.0, -3.0, 100.0, 70.0], [60.0, 50.0, 60.2, 50.1]])
    gt = torch.tensor([0, 0, 1, 1, 0])
    crops = crop_masks(masks, boxes, gt, 28)
    assert crops[0].all() and crops[1].all()  # the box is (inside) the rectangle
    # the crop of an exact box is the mask downsampled: the ellipse's crop holds its share of the box
    assert abs(crops[3].mean() - masks[1].float().sum() / (w * h)) < 0.02
    torch.testing.assert_close(area_ratios(boxes, gt, masks), area_ratio(boxes, gt, masks.numpy()))
    assert area_ratios(boxes, gt, masks)[1] == pytest.approx(0.5, abs=1e-6)


def test_mask_iou_targets_of_exact_and_partial_masks() -> None:
    target = rectangle(28, 28, 0, 0, 28, 14).float()[None].repeat(3, 1, 1)
    logits = torch.stack([target[0] * 20 - 10, torch.full((28, 28), 10.0), target[0] * 20 - 10])
    ratios = torch.tensor([1.0, 1.0, 0.5])  # the third RoI holds half of its object
    iou = mask_iou_targets(logits, target, ratios, 0.5)
    torch.testing.assert_close(iou, torch.tensor([1.0, 0.5, 0.5]), atol=1e-5, rtol=0)


def test_paste_masks_is_the_released_paste() -> None:
    g = torch.Generator().manual_seed(5)
    probs = torch.rand(6, 28, 28, generator=g)
    boxes = torch.tensor([[3.2, 4.1, 30.7, 25.0], [0.0, 0.0, 50.0, 40.0], [20.0, 10.0, 20.0, 30.0],
                          [-10.0, -5.0, 12.0, 9.0], [40.5, 30.5, 49.9, 39.9], [10.0, 10.0, 11.0, 11.0]])
    ours = paste_masks(probs, boxes, 40, 50, 0.5)
    assert torch.equal(ours, paste(probs[:, None], boxes, 40, 50) >= 0.5)
    # a constant mask fills exactly the pixels whose centres lie in the box
    full = paste_masks(torch.ones(1, 28, 28), boxes[:1], 40, 50)[0]
    ys, xs = torch.meshgrid(torch.arange(40) + 0.5, torch.arange(50) + 0.5, indexing="ij")
    b = boxes[0]
    assert torch.equal(full, (xs >= b[0]) & (xs <= b[2]) & (ys >= b[1]) & (ys <= b[3]))


@pytest.mark.parametrize(("content", "orig"), [(None, (40, 60)), ((20, 30), (40, 60)), ((20, 30), (20, 30)),
                                               ((24, 16), (48, 32)), (None, (0, 0))])
def test_masks_are_pasted_into_the_image_as_stored(content, orig):
    """A constant mask of a box of the model input (a 32 x 32 canvas, the image in its ``content`` corner) fills
    the box mapped as boxes are mapped to the image as stored (``orig_size``; unknown, (0, 0): the input), as the
    release pastes into ``ori_shape`` with the boxes divided by the scale factor."""
    boxes = torch.tensor([[6.0, 4.0, 14.0, 12.0], [2.5, 10.0, 9.0, 17.75]])
    target = Target(torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64), orig_size=orig, content_size=content)
    out = paste_into_image(torch.ones(2, 28, 28), boxes, (32, 32), target)
    size = orig if min(orig) else (32, 32)
    assert out.shape == (2, *size) and out.dtype == torch.bool
    mapped = rescale_boxes(boxes, (32, 32), size, content)
    ys, xs = torch.meshgrid(torch.arange(size[0]) + 0.5, torch.arange(size[1]) + 0.5, indexing="ij")
    for mask, b in zip(out, mapped):
        assert torch.equal(mask, (xs >= b[0]) & (xs <= b[2]) & (ys >= b[1]) & (ys <= b[3]))
