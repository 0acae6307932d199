"""Multi-scale deformable attention against a naive per-point float64 loop; gradcheck."""

import math

import pytest
import torch

from codetr.ops import multi_scale_deformable_attn
from codetr.ops.deform_attn import SAMPLERS, use_sampler


def bilinear(feature: torch.Tensor, x: float, y: float) -> torch.Tensor:
    """feature (H, W, D); (x, y) in pixel units with pixel centres at +0.5; zero outside."""
    h, w, d = feature.shape
    px, py = x - 0.5, y - 0.5
    x0, y0 = math.floor(px), math.floor(py)
    out = torch.zeros(d, dtype=feature.dtype)
    for yy, wy in ((y0, 1 - (py - y0)), (y0 + 1, py - y0)):
        for xx, wx in ((x0, 1 - (px - x0)), (x0 + 1, px - x0)):
            if 0 <= yy < h and 0 <= xx < w:
                out += wy * wx * feature[yy, xx]
    return out


def naive(value, shapes, locations, weights):
    batch, _, heads, dim = value.shape
    _, queries, _, levels, points, _ = locations.shape
    starts = [0]
    for h, w in shapes:
        starts.append(starts[-1] + h * w)
    out = torch.zeros(batch, queries, heads, dim, dtype=value.dtype)
    for b in range(batch):
        for q in range(queries):
            for m in range(heads):
                for l, (h, w) in enumerate(shapes):
                    feature = value[b, starts[l]:starts[l + 1], m].reshape(h, w, dim)
                    for p in range(points):
                        x, y = locations[b, q, m, l, p].tolist()
                        out[b, q, m] += weights[b, q, m, l, p] * bilinear(feature, x * w, y * h)
    return out.flatten(2)


def random_inputs(seed, dtype=torch.float64, batch=2, queries=5, heads=2, dim=3, points=3,
                  shapes=((6, 5), (3, 4), (1, 2))):
    g = torch.Generator().manual_seed(seed)
    s = sum(h * w for h, w in shapes)
    value = torch.randn(batch, s, heads, dim, generator=g, dtype=dtype)
    locations = torch.rand(batch, queries, heads, len(shapes), points, 2, generator=g, dtype=dtype) * 1.4 - 0.2
    weights = torch.rand(batch, queries, heads, len(shapes), points, generator=g, dtype=dtype)
    return value, list(shapes), locations, weights


def test_matches_naive_loop_including_points_outside():
    for seed in range(3):
        value, shapes, locations, weights = random_inputs(seed)
        assert ((locations < 0) | (locations > 1)).any()
        ours = multi_scale_deformable_attn(value, shapes, locations, weights)
        assert ours.shape == (2, 5, 6)
        torch.testing.assert_close(ours, naive(value, shapes, locations, weights), rtol=1e-10, atol=1e-10)


def test_float32_close_to_float64():
    value, shapes, locations, weights = random_inputs(7)
    ours = multi_scale_deformable_attn(value.float(), shapes, locations.float(), weights.float())
    torch.testing.assert_close(ours.double(), naive(value, shapes, locations, weights), rtol=1e-5, atol=1e-5)


def test_gradcheck():
    value, shapes, locations, weights = random_inputs(3, batch=1, queries=2, heads=2, dim=2, points=2,
                                                      shapes=((3, 4), (2, 2)))
    # keep points away from pixel-grid kinks where bilinear interpolation is not differentiable
    locations = (locations.clamp(0.05, 0.95) * 0.97 + 0.011).requires_grad_()
    value.requires_grad_()
    weights.requires_grad_()
    assert torch.autograd.gradcheck(lambda v, l, a: multi_scale_deformable_attn(v, shapes, l, a),
                                    (value, locations, weights))


def test_gather_sampler_matches_grid_sample_and_naive_loop():
    """The ONNX-friendly gather sampler: same values as grid_sample (float64, points outside the
    map and exactly on pixel centres and borders included), through the argument and use_sampler."""
    for seed in range(3):
        value, shapes, locations, weights = random_inputs(seed)
        locations[0, 0, 0, 0, :, 0] = torch.tensor([0.0, 0.1, 1.0], dtype=torch.float64)  # border, centre (w=5)
        assert ((locations < 0) | (locations > 1)).any()
        with_grid = multi_scale_deformable_attn(value, shapes, locations, weights, sampler="grid_sample")
        with_gather = multi_scale_deformable_attn(value, shapes, locations, weights, sampler="gather")
        torch.testing.assert_close(with_gather, with_grid, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(with_gather, naive(value, shapes, locations, weights), rtol=1e-10, atol=1e-10)
        with use_sampler("gather"):
            torch.testing.assert_close(multi_scale_deformable_attn(value, shapes, locations, weights), with_gather,
                                       rtol=0, atol=0)


def test_gather_sampler_gradients_match_grid_sample():
    value, shapes, locations, weights = random_inputs(5, batch=1, queries=3)
    grads = []
    for sampler in SAMPLERS:
        inputs = [t.clone().requires_grad_() for t in (value, locations, weights)]
        multi_scale_deformable_attn(inputs[0], shapes, inputs[1], inputs[2], sampler=sampler).square().sum().backward()
        grads.append([t.grad for t in inputs])
    for ours, reference in zip(*grads):
        torch.testing.assert_close(ours, reference, rtol=1e-10, atol=1e-10)


def test_unknown_sampler_is_an_error():
    value, shapes, locations, weights = random_inputs(0)
    with pytest.raises(ValueError, match="unknown bilinear sampler 'bicubic'"):
        multi_scale_deformable_attn(value, shapes, locations, weights, sampler="bicubic")
    with pytest.raises(ValueError, match="unknown bilinear sampler"), use_sampler("nearest"):
        pass
