"""codetr's CPU RoIAlign against torchvision's kernel: same values, same feature gradients."""

import pytest
import torch
import torchvision

from codetr.ops.roi_align import roi_align, roi_align_matrix


def random_rois(generator: torch.Generator, count: int, images: int, size: float) -> torch.Tensor:
    """(count, 5) RoIs over an image of ``size`` pixels: ordinary boxes, boxes reaching past every
    border, boxes far outside, tiny and degenerate (zero or negative width / height) boxes."""
    xy = torch.rand(count, 2, generator=generator, dtype=torch.float64) * 1.4 * size - 0.2 * size
    wh = torch.rand(count, 2, generator=generator, dtype=torch.float64) * 0.8 * size
    wh[: count // 8] *= 0.01  # a few pixels or less
    wh[count // 8: count // 6] -= 3.0  # degenerate
    boxes = torch.cat([xy, xy + wh], 1)
    boxes[-3:] = torch.tensor([[-5 * size, -5 * size, -3 * size, -3 * size], [0, 0, size, size],
                               [size - 1, size - 1, 3 * size, 3 * size]], dtype=torch.float64)
    index = torch.randint(0, images, (count, 1), generator=generator).double()
    return torch.cat([index, boxes], 1)


@pytest.mark.parametrize("output_size", [7, (3, 5)])
@pytest.mark.parametrize("sampling_ratio", [0, 2, -1])
@pytest.mark.parametrize("aligned", [True, False])
def test_roi_align_matches_torchvision(output_size, sampling_ratio, aligned):
    generator = torch.Generator().manual_seed(hash((output_size, sampling_ratio, aligned)) % 2**31)
    features = torch.randn(3, 5, 13, 17, generator=generator, dtype=torch.float64, requires_grad=True)
    rois = random_rois(generator, 300, 3, 17 * 8)
    ours = roi_align(features, rois, output_size, 1 / 8, sampling_ratio, aligned)
    reference = torchvision.ops.roi_align(features, rois, output_size, 1 / 8, sampling_ratio, aligned)
    torch.testing.assert_close(ours, reference, rtol=1e-10, atol=1e-10)
    grad_out = torch.randn(reference.shape, generator=generator, dtype=torch.float64)
    (ours_grad,) = torch.autograd.grad(ours, features, grad_out)
    (reference_grad,) = torch.autograd.grad(reference, features, grad_out)
    torch.testing.assert_close(ours_grad, reference_grad, rtol=1e-10, atol=1e-10)
    assert ours_grad.abs().sum() > 0


def test_roi_align_float32_and_empty():
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(2, 4, 9, 9, generator=generator)
    rois = random_rois(generator, 50, 2, 72).float()
    torch.testing.assert_close(roi_align(features, rois, 7, 1 / 8, 0, True),
                               torchvision.ops.roi_align(features, rois, 7, 1 / 8, 0, True), rtol=1e-5, atol=1e-5)
    assert roi_align(features, rois[:0], 7, 1 / 8, 0, True).shape == (0, 4, 7, 7)


def test_roi_align_matrix_is_a_valid_csr_tensor():
    """Columns sorted and distinct within every row: what torch's sparse kernels assume."""
    generator = torch.Generator().manual_seed(1)
    rois = random_rois(generator, 200, 2, 96)
    for sampling_ratio in (0, 3):
        matrix = roi_align_matrix(rois, (2, 12, 12), (7, 7), 1 / 8, sampling_ratio, True)
        torch.sparse_csr_tensor(matrix.crow_indices(), matrix.col_indices(), matrix.values(), matrix.shape,
                                check_invariants=True)
