"""RoIAlign with torchvision's semantics and a fast CPU backward.

torchvision's CPU kernel recomputes every bilinear weight for every channel in its backward pass,
which makes the backward about 7x slower than the forward; with ~1200 RoIs per tiny training step
it was the largest single cost of the Faster R-CNN auxiliary head. On the CPU the same operator is
expressed here as a sparse matrix: one row per RoI bin, holding the bilinear weights of its
sampling points divided by their count, so forward and backward are two sparse x dense products
that share the weights across channels. Other devices call ``torchvision.ops.roi_align``.
"""

from __future__ import annotations

import warnings

import torch
import torchvision
from torch import Tensor


def _axis_profile(start: Tensor, bin_size: Tensor, grid: int, output: int, length: int) -> tuple[Tensor, Tensor]:
    """Bilinear weights along one axis, summed over a bin's samples as torchvision samples them.

    start, bin_size: (R,) RoI start and bin size in feature cells. Returns the first cell of each
    bin's window (R, output) and the weight of each window cell (R, output, L), L <= length: a
    sample more than one cell outside the map weighs 0, one inside that margin is clamped onto
    the border. Windows lie inside the map, so their cells are distinct and ascending."""
    offsets = (torch.arange(grid, dtype=start.dtype, device=start.device) + 0.5) / grid
    bins = torch.arange(output, dtype=start.dtype, device=start.device)
    coords = start[:, None, None] + (bins[:, None] + offsets)[None] * bin_size[:, None, None]
    inside = (coords >= -1) & (coords <= length)
    coords = coords.clamp(min=0)
    low = coords.floor().long().clamp(max=length - 1)
    frac = torch.where(low >= length - 1, torch.zeros_like(coords), coords - low)
    taps = torch.stack([low, (low + 1).clamp(max=length - 1)], -1).flatten(2)  # (R, output, 2 * grid)
    weights = (torch.stack([1 - frac, frac], -1) * inside[..., None]).flatten(2)
    window = min(int((taps.amax(2) - taps.amin(2)).max()) + 1, length)
    first = torch.minimum(taps.amin(2), torch.full_like(taps[..., 0], length - window))
    profile = weights.new_zeros(*taps.shape[:2], window).scatter_add_(2, taps - first[..., None], weights)
    return first, profile


def roi_align_matrix(rois: Tensor, feature_shape: tuple[int, int, int], output_size: tuple[int, int],
                     spatial_scale: float, sampling_ratio: int, aligned: bool) -> Tensor:
    """Sparse CSR matrix (R * out_h * out_w, N * H * W) mapping features in (N, H, W) order to
    RoI bins: row ``r * out_h * out_w + i * out_w + j`` is bin (i, j) of RoI r.

    rois: (R, 5) rows of (image index, x1, y1, x2, y2) in input pixels."""
    images, height, width = feature_shape
    out_h, out_w = output_size
    rois = rois.detach()
    offset = 0.5 if aligned else 0.0
    x1, y1, x2, y2 = (rois[:, 1:] * spatial_scale - offset).unbind(1)
    roi_w, roi_h = x2 - x1, y2 - y1
    if not aligned:
        roi_w, roi_h = roi_w.clamp(min=1), roi_h.clamp(min=1)
    bin_w, bin_h = roi_w / out_w, roi_h / out_h
    if sampling_ratio > 0:
        grid_h = grid_w = torch.full_like(x1, sampling_ratio, dtype=torch.long)
    else:
        grid_h, grid_w = torch.ceil(bin_h).long(), torch.ceil(bin_w).long()
    # an empty grid (a degenerate RoI) gives zero features, as in torchvision: one sample of weight 0
    scale = ((grid_h > 0) & (grid_w > 0)).to(rois.dtype) / (grid_h * grid_w).clamp(min=1)
    grid_h, grid_w = grid_h.clamp(min=1), grid_w.clamp(min=1)
    image_start = rois[:, 0].long() * height * width
    groups, bin_entries = [], torch.empty_like(grid_h)
    grids = grid_h * (grid_w.max() + 1) + grid_w
    for key in grids.unique().tolist():  # RoIs with the same sampling grid are built together
        sel = torch.nonzero(grids == key).squeeze(1)
        gh, gw = int(grid_h[sel[0]]), int(grid_w[sel[0]])
        first_y, weight_y = _axis_profile(y1[sel], bin_h[sel], gh, out_h, height)
        first_x, weight_x = _axis_profile(x1[sel], bin_w[sel], gw, out_w, width)
        window_y = torch.arange(weight_y.shape[2], device=rois.device)
        window_x = torch.arange(weight_x.shape[2], device=rois.device)
        # entries ordered (roi, bin row, bin column, window row, window column): ascending columns
        cols = image_start[sel, None, None, None, None] \
            + (first_y[..., None] + window_y)[:, :, None, :, None] * width \
            + (first_x[..., None] + window_x)[:, None, :, None, :]
        values = weight_y[:, :, None, :, None] * weight_x[:, None, :, None, :] * scale[sel, None, None, None, None]
        groups.append((sel, cols.flatten(1), values.flatten(1)))
        bin_entries[sel] = len(window_y) * len(window_x)
    bins = out_h * out_w
    start = torch.cumsum(bin_entries * bins, 0) - bin_entries * bins  # first entry of each RoI
    total = int((bin_entries * bins).sum())
    crow = torch.cat([(start[:, None] + torch.arange(bins, device=rois.device) * bin_entries[:, None]).reshape(-1),
                      torch.tensor([total], device=rois.device)])
    col_indices = torch.empty(total, dtype=torch.long, device=rois.device)
    values = torch.empty(total, dtype=rois.dtype, device=rois.device)
    for sel, group_cols, group_values in groups:
        entries = (start[sel, None] + torch.arange(group_cols.shape[1], device=rois.device)).reshape(-1)
        col_indices[entries] = group_cols.reshape(-1)
        values[entries] = group_values.reshape(-1)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta state")
        return torch.sparse_csr_tensor(crow, col_indices, values, (len(rois) * bins, images * height * width),
                                       check_invariants=False)


def roi_align(features: Tensor, rois: Tensor, output_size: int | tuple[int, int], spatial_scale: float = 1.0,
              sampling_ratio: int = -1, aligned: bool = False) -> Tensor:
    """``torchvision.ops.roi_align`` for a (K, 5) RoI tensor: features (N, C, H, W), rois rows of
    (image index, x1, y1, x2, y2) in input pixels -> (K, C, out_h, out_w). Gradients reach the
    features only, as in torchvision."""
    size = (output_size, output_size) if isinstance(output_size, int) else tuple(output_size)
    if (features.device.type != "cpu" or features.dtype not in (torch.float32, torch.float64) or not len(rois)
            or torch.onnx.is_in_onnx_export()):  # ONNX: torchvision's operator exports as RoiAlign
        return torchvision.ops.roi_align(features, rois, size, spatial_scale, sampling_ratio, aligned)
    images, channels, height, width = features.shape
    matrix = roi_align_matrix(rois.to(features.dtype), (images, height, width), size, spatial_scale,
                              sampling_ratio, aligned)
    pooled = matrix @ features.permute(0, 2, 3, 1).reshape(images * height * width, channels)
    return pooled.view(len(rois), size[0], size[1], channels).permute(0, 3, 1, 2)
