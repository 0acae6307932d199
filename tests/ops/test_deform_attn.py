"""Multi-scale deformable attention against a naive per-point float64 loop; gradcheck; the fused
CPU kernel against the pure-PyTorch reference (values and gradients)."""

import math
import warnings

import pytest
import torch

from codetr.ops import deform_attn_cpu, multi_scale_deformable_attn
from codetr.ops.deform_attn import use_sampler

PURE_SAMPLERS = ("grid_sample", "gather")


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
        ours = multi_scale_deformable_attn(value, shapes, locations, weights, sampler="grid_sample")
        assert ours.shape == (2, 5, 6)
        torch.testing.assert_close(ours, naive(value, shapes, locations, weights), rtol=1e-10, atol=1e-10)


def test_float32_close_to_float64():
    value, shapes, locations, weights = random_inputs(7)
    ours = multi_scale_deformable_attn(value.float(), shapes, locations.float(), weights.float(), sampler="grid_sample")
    torch.testing.assert_close(ours.double(), naive(value, shapes, locations, weights), rtol=1e-5, atol=1e-5)


def test_gradcheck():
    value, shapes, locations, weights = random_inputs(3, batch=1, queries=2, heads=2, dim=2, points=2,
                                                      shapes=((3, 4), (2, 2)))
    # keep points away from pixel-grid kinks where bilinear interpolation is not differentiable
    locations = (locations.clamp(0.05, 0.95) * 0.97 + 0.011).requires_grad_()
    value.requires_grad_()
    weights.requires_grad_()
    assert torch.autograd.gradcheck(lambda v, l, a: multi_scale_deformable_attn(v, shapes, l, a, sampler="grid_sample"),
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
    for sampler in PURE_SAMPLERS:
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


# ---------------------------------------------------------------- the fused CPU kernel

needs_kernel = pytest.mark.skipif(not deform_attn_cpu.kernel_available(), reason="no C++ toolchain for the kernel")


def random_problem(seed: int, dtype=torch.float64):
    """Random sizes: 1-4 levels of different H, W (1 to 9), batch 1-3, heads 1-3, head dim 1-40
    (SIMD tails), 1-4 points, 1-20 queries; locations in [-0.3, 1.3] (many outside the map)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda lo, hi: int(torch.randint(lo, hi + 1, (), generator=g))  # noqa: E731
    shapes = tuple((r(1, 9), r(1, 9)) for _ in range(r(1, 4)))
    return random_inputs(seed, dtype, batch=r(1, 3), queries=r(1, 20), heads=r(1, 3), dim=r(1, 40), points=r(1, 4),
                         shapes=shapes)


def grads(sampler, value, shapes, locations, weights):
    """Output and gradients of (value, locations, weights) under a random output gradient."""
    inputs = [t.detach().clone().requires_grad_() for t in (value, locations, weights)]
    out = multi_scale_deformable_attn(inputs[0], shapes, inputs[1], inputs[2], sampler=sampler)
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(9), dtype=out.dtype))
    return [out.detach()] + [t.grad for t in inputs]


@needs_kernel
def test_fused_kernel_values_and_gradients_match_the_reference_float64():
    for seed in range(12):
        value, shapes, locations, weights = random_problem(seed)
        locations[0, 0, 0, 0, 0] = torch.tensor([-5.0, 7.0])  # far outside: every neighbour outside
        fused = grads("fused", value, shapes, locations, weights)
        reference = grads("grid_sample", value, shapes, locations, weights)
        for name, ours, theirs in zip(("output", "value", "locations", "weights"), fused, reference):
            torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-10, msg=lambda m: f"seed {seed} {name}: {m}")
        torch.testing.assert_close(fused[0], naive(value, shapes, locations, weights), rtol=1e-10, atol=1e-10)


@needs_kernel
def test_fused_kernel_gradcheck():
    value, shapes, locations, weights = random_inputs(3, batch=2, queries=3, heads=2, dim=3, points=2,
                                                      shapes=((3, 4), (2, 2), (1, 3)))
    # away from the pixel-grid kinks, some points outside the map
    locations = (locations * 0.97 + 0.011).requires_grad_()
    value.requires_grad_()
    weights.requires_grad_()
    assert torch.autograd.gradcheck(lambda v, l, a: multi_scale_deformable_attn(v, shapes, l, a, sampler="fused"),
                                    (value, locations, weights))


@needs_kernel
def test_fused_kernel_float32_and_non_contiguous_inputs():
    value, shapes, locations, weights = random_inputs(4, batch=2, queries=7, heads=3, dim=33, points=4,
                                                      shapes=((6, 5), (3, 4), (2, 2), (1, 1)))
    weights = weights / weights.sum((-2, -1), keepdim=True)  # softmax-like, as in the model
    expected = naive(value, shapes, locations, weights)
    # the same numbers held in transposed storage
    value_t = value.float().transpose(0, 2).contiguous().transpose(0, 2)
    locations_t = locations.float().permute(5, 4, 3, 2, 1, 0).contiguous().permute(5, 4, 3, 2, 1, 0)
    weights_t = torch.stack([weights.float(), weights.float()], -1)[..., 0]
    assert not (value_t.is_contiguous() or locations_t.is_contiguous() or weights_t.is_contiguous())
    ours = multi_scale_deformable_attn(value_t, shapes, locations_t, weights_t, sampler="fused")
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours.double(), expected, rtol=1e-5, atol=1e-5)
    fused = grads("fused", value_t, shapes, locations_t, weights_t)
    reference = grads("grid_sample", value.float(), shapes, locations.float(), weights.float())
    for ours, theirs in zip(fused[1:], reference[1:]):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


@needs_kernel
def test_fused_kernel_backward_with_more_threads_than_batch_times_heads():
    """One image and one head on two threads: the value gradient is summed from per-thread copies."""
    value, shapes, locations, weights = random_inputs(6, batch=1, queries=300, heads=1, dim=8, points=2,
                                                      shapes=((8, 8), (4, 4)))
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        fused = grads("fused", value, shapes, locations, weights)
    finally:
        torch.set_num_threads(threads)
    for ours, theirs in zip(fused, grads("grid_sample", value, shapes, locations, weights)):
        torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-10)


@needs_kernel
def test_fused_kernel_operator_registration():
    """Schema, fake (meta) kernel for torch.compile, and the autograd registration, as torch checks them."""
    value, shapes, locations, weights = random_inputs(2, dtype=torch.float32, batch=1, queries=4, heads=2, dim=4)
    args = (value.requires_grad_(), [s for hw in shapes for s in hw], locations.requires_grad_(), weights.requires_grad_())
    torch.library.opcheck(torch.ops.codetr.ms_deform_attn.default, args,
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


@needs_kernel
def test_auto_uses_the_fused_kernel_on_cpu_and_grid_sample_when_tracing(monkeypatch):
    value, shapes, locations, weights = random_inputs(1, dtype=torch.float32)
    calls = []
    real = deform_attn_cpu.fused_deformable_attn
    monkeypatch.setattr(deform_attn_cpu, "fused_deformable_attn", lambda *args: calls.append(1) or real(*args))
    auto = multi_scale_deformable_attn(value, shapes, locations, weights)
    assert calls == [1]
    torch.testing.assert_close(auto, multi_scale_deformable_attn(value, shapes, locations, weights, sampler="grid_sample"),
                               rtol=1e-5, atol=1e-5)
    with use_sampler("gather"):
        multi_scale_deformable_attn(value, shapes, locations, weights)
    multi_scale_deformable_attn(value.bfloat16(), shapes, locations.bfloat16(), weights.bfloat16())  # no bfloat16 kernel
    assert calls == [1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.trace is deprecated; the ONNX export still traces
        traced = torch.jit.trace(lambda v, l, a: multi_scale_deformable_attn(v, shapes, l, a), (value, locations, weights),
                                 check_trace=False)
    assert calls == [1] and "grid_sampler" in str(traced.graph)


def test_failed_build_falls_back_to_grid_sample_with_one_warning(monkeypatch):
    def no_compiler() -> None:
        raise RuntimeError("Ninja is required to load C++ extensions\nmore details")

    monkeypatch.setattr(deform_attn_cpu, "_build", no_compiler)
    monkeypatch.setattr(deform_attn_cpu, "_available", None)
    value, shapes, locations, weights = random_inputs(1)
    with pytest.warns(RuntimeWarning, match=r"could not be built \(Ninja is required to load C\+\+ extensions\)"):
        auto = multi_scale_deformable_attn(value, shapes, locations, weights)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once only
        torch.testing.assert_close(multi_scale_deformable_attn(value, shapes, locations, weights), auto, rtol=0, atol=0)
    torch.testing.assert_close(auto, naive(value, shapes, locations, weights), rtol=1e-10, atol=1e-10)
    with pytest.raises(RuntimeError, match="fused deformable-attention kernel could not be built"):
        multi_scale_deformable_attn(value, shapes, locations, weights, sampler="fused")


def test_fused_kernel_rejects_other_devices_and_dtypes():
    value, shapes, locations, weights = random_inputs(1)
    with pytest.raises(ValueError, match="float32 or float64 CPU tensors of one dtype"):
        multi_scale_deformable_attn(value.half(), shapes, locations.half(), weights.half(), sampler="fused")
    with pytest.raises(ValueError, match="of one dtype"):
        multi_scale_deformable_attn(value.float(), shapes, locations, weights, sampler="fused")


@needs_kernel
def test_fused_kernel_float32_rounds_pixel_coordinates_as_grid_sample():
    """On a 152-pixel-wide map float32 coordinates rounded twice move samples by an ulp (~1e-5 in
    the output); the kernel rounds them once as grid_sample does and agrees to ~1 ulp of the output."""
    g = torch.Generator().manual_seed(0)
    shapes = [(100, 152)]
    value = torch.randn(1, 100 * 152, 1, 4, generator=g)
    locations = torch.rand(1, 2000, 1, 1, 1, 2, generator=g)
    weights = torch.ones(1, 2000, 1, 1, 1)
    fused = multi_scale_deformable_attn(value, shapes, locations, weights, sampler="fused")
    reference = multi_scale_deformable_attn(value, shapes, locations, weights, sampler="grid_sample")
    torch.testing.assert_close(fused, reference, rtol=0, atol=1e-6)
