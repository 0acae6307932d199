"""The Triton kernel of multi-scale deformable attention against the pure-PyTorch reference: values,
gradients, dtypes, the custom operator's registration, ``torch.compile`` and the sampler choice.

Without CUDA the kernels run in Triton's interpreter on CPU tensors: ``TRITON_INTERPRET=1`` must be
in the environment before triton is first imported (torch._dynamo imports it too), which
tests/conftest.py does when there is no CUDA device. With CUDA the same tests run the compiled
kernels on the GPU.
"""

import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

from codetr.ops import deform_attn_triton, multi_scale_deformable_attn  # noqa: E402
from codetr.ops.deform_attn import use_sampler  # noqa: E402

if not deform_attn_triton.INTERPRETED and not torch.cuda.is_available():
    raise RuntimeError("no CUDA device and TRITON_INTERPRET is not 1: tests/conftest.py sets it before triton is "
                       "imported; run these tests through pytest from the repository root")
DEVICE = "cpu" if deform_attn_triton.INTERPRETED else "cuda"


def random_problem(seed: int, dtype=torch.float32, batch=None, queries=None, heads=None, dim=None, points=None,
                   shapes=None):
    """Random sizes unless given: 1-4 levels of H, W in 1-9 (odd sizes, 1x1 maps), batch 1-3, heads
    1-3, head dim 1-40 (not powers of two), 1-4 points, 1-80 queries (over one block of 64);
    locations in [-0.3, 1.3] (many points outside the map) and one far outside."""
    g = torch.Generator().manual_seed(seed)
    r = lambda lo, hi: int(torch.randint(lo, hi + 1, (), generator=g))  # noqa: E731
    shapes = shapes or [(r(1, 9), r(1, 9)) for _ in range(r(1, 4))]
    batch, queries, heads = batch or r(1, 3), queries or r(1, 80), heads or r(1, 3)
    dim, points = dim or r(1, 40), points or r(1, 4)
    tokens = sum(h * w for h, w in shapes)
    value = torch.randn(batch, tokens, heads, dim, generator=g)
    locations = torch.rand(batch, queries, heads, len(shapes), points, 2, generator=g) * 1.6 - 0.3
    locations[0, 0, 0, 0, 0] = torch.tensor([-5.0, 7.0])
    weights = torch.rand(batch, queries, heads, len(shapes), points, generator=g)
    return value.to(DEVICE, dtype), shapes, locations.to(DEVICE, dtype), weights.to(DEVICE, dtype)


def run(sampler: str, value, shapes, locations, weights, grad_seed: int = 9, reference_dtype=None):
    """Output and gradients of (value, locations, weights) under a random output gradient; with
    ``reference_dtype`` the inputs and that gradient are cast to it first (after any rounding)."""
    inputs = [t.detach().clone() for t in (value, locations, weights)]
    if reference_dtype is not None:
        inputs = [t.to(reference_dtype) for t in inputs]
    inputs = [t.requires_grad_() for t in inputs]
    out = multi_scale_deformable_attn(inputs[0], shapes, inputs[1], inputs[2], sampler=sampler)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed)).to(value.dtype)
    out.backward(grad.to(out.device, out.dtype))
    return [out.detach()] + [t.grad for t in inputs]


NAMES = ("output", "value grad", "locations grad", "weights grad")


def test_float32_values_and_gradients_match_the_reference():
    """Outputs within 1e-5 and gradients within 1e-4 (relative) of grid_sample run in float64 on the
    same float32 inputs."""
    for seed in range(6):
        value, shapes, locations, weights = random_problem(seed)
        ours = run("triton", value, shapes, locations, weights)
        reference = run("grid_sample", value, shapes, locations, weights, reference_dtype=torch.float64)
        assert ours[0].dtype == torch.float32 and ours[0].shape == reference[0].shape
        for name, a, b in zip(NAMES, ours, reference):
            tolerance = (1e-5, 1e-5) if name == "output" else (1e-4, 1e-5)
            torch.testing.assert_close(a.double(), b, rtol=tolerance[0], atol=tolerance[1],
                                       msg=lambda m: f"seed {seed} {name}: {m}")


def test_several_blocks_of_queries_batch_and_heads():
    """130 queries (three blocks of 64), two images, two heads and five levels of odd sizes."""
    value, shapes, locations, weights = random_problem(
        11, batch=2, queries=130, heads=2, dim=8, points=2, shapes=[(9, 7), (5, 3), (3, 2), (1, 1), (2, 5)])
    ours = run("triton", value, shapes, locations, weights)
    reference = run("grid_sample", value, shapes, locations, weights, reference_dtype=torch.float64)
    for name, a, b in zip(NAMES, ours, reference):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")


def test_value_gradient_sums_every_sample_of_a_pixel():
    """200 queries x 4 points all inside a 1x1 map: each adds attn * grad to the one value row (the
    atomic adds of many programs and lanes into one address)."""
    value = torch.randn(1, 1, 1, 5, device=DEVICE)
    locations = torch.rand(1, 200, 1, 1, 4, 2, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    weights = torch.rand(1, 200, 1, 1, 4, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    _, grad_value, _, grad_weights = run("triton", value, [(1, 1)], locations, weights)
    grad = torch.randn(1, 200, 5, generator=torch.Generator().manual_seed(9)).to(DEVICE)
    # inside a 1x1 map at (x, y) the sample is value * (1 - |x - 0.5|) * (1 - |y - 0.5|)
    tent = ((1 - (locations[..., 0] - 0.5).abs()) * (1 - (locations[..., 1] - 0.5).abs()))[0, :, 0, 0]  # (200, 4)
    expected = ((weights[0, :, 0, 0] * tent).sum(1)[:, None] * grad[0]).sum(0)
    torch.testing.assert_close(grad_value.view(5), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad_weights[0, :, 0, 0], tent * (grad[0] @ value.view(5))[:, None], rtol=1e-5, atol=1e-5)


def test_non_contiguous_inputs():
    value, shapes, locations, weights = random_problem(4, batch=2, queries=7, heads=3, dim=33, points=4,
                                                       shapes=[(6, 5), (3, 4), (2, 2), (1, 1)])
    value_t = value.transpose(0, 2).contiguous().transpose(0, 2)
    locations_t = locations.permute(5, 4, 3, 2, 1, 0).contiguous().permute(5, 4, 3, 2, 1, 0)
    weights_t = torch.stack([weights, weights], -1)[..., 0]
    assert not (value_t.is_contiguous() or locations_t.is_contiguous() or weights_t.is_contiguous())
    strided = run("triton", value_t, shapes, locations_t, weights_t)
    reference = run("grid_sample", value, shapes, locations, weights, reference_dtype=torch.float64)
    for name, a, b in zip(NAMES, strided, reference):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs_accumulate_in_float32(dtype):
    """bfloat16 / float16 inputs against the float64 reference of the same (rounded) inputs and output
    gradient: the kernel computes in float32 and rounds each result once to the input dtype, a
    relative error of at most half an ulp (2^-9 for bfloat16, 2^-12 for float16), so rtol = one ulp
    (2^-8, 2^-11); atol 1e-4 covers the float32 sums of up to 16 samples of values ~3 (~1e-6) and
    the results that cancel to ~0. A kernel rounding an intermediate (a sample, a partial sum) to
    the input dtype misses these bounds. Against the float32 reference of the unrounded inputs the
    error is the inputs' own rounding: no larger than the reference sampler's in the same dtype."""
    value, shapes, locations, weights = random_problem(5, batch=2, queries=70, heads=2, dim=16, points=4,
                                                       shapes=[(9, 7), (5, 3), (2, 1)])
    locations = locations.clamp(-0.2, 1.2)
    rounded = [t.to(dtype) for t in (value, locations, weights)]
    ours = run("triton", *rounded[:1], shapes, *rounded[1:])
    reference = run("grid_sample", *rounded[:1], shapes, *rounded[1:], reference_dtype=torch.float64)
    ulp = 2.0 ** -8 if dtype == torch.bfloat16 else 2.0 ** -11
    for name, a, b in zip(NAMES, ours, reference):
        assert a.dtype == dtype, name
        torch.testing.assert_close(a.double(), b, rtol=ulp, atol=1e-4, msg=lambda m: f"{name}: {m}")

    exact = run("grid_sample", value, shapes, locations, weights, reference_dtype=torch.float64)[0]
    pure = multi_scale_deformable_attn(*rounded[:1], shapes, *rounded[1:], sampler="grid_sample")
    assert (ours[0].double() - exact).norm() <= (pure.double() - exact).norm()


def test_mixed_dtypes_give_the_value_dtype():
    """bfloat16 values with float32 locations and weights: a bfloat16 output, each gradient in its input's dtype."""
    value, shapes, locations, weights = random_problem(6, batch=1, queries=9, heads=2, dim=4, points=2)
    ours = run("triton", value.bfloat16(), shapes, locations, weights)
    assert [t.dtype for t in ours] == [torch.bfloat16, torch.bfloat16, torch.float32, torch.float32]
    reference = run("grid_sample", value.bfloat16(), shapes, locations, weights, reference_dtype=torch.float64)
    torch.testing.assert_close(ours[0].double(), reference[0], rtol=2 ** -8, atol=1e-4)
    torch.testing.assert_close(ours[2].double(), reference[2], rtol=1e-4, atol=1e-4)


def test_no_queries_and_shape_errors():
    value, shapes, locations, weights = random_problem(7, batch=2, queries=3, heads=2, dim=4, points=2,
                                                       shapes=[(3, 3), (2, 2)])
    empty = multi_scale_deformable_attn(value, shapes, locations[:, :0], weights[:, :0], sampler="triton")
    assert empty.shape == (2, 0, 8)
    with pytest.raises(ValueError, match="spatial_shapes cover 13 tokens but value has 12"):
        multi_scale_deformable_attn(value[:, :12], shapes, locations, weights, sampler="triton")
    with pytest.raises(ValueError, match="do not match value"):
        multi_scale_deformable_attn(value, shapes, locations, weights[..., :1], sampler="triton")
    with pytest.raises(ValueError, match="float32, bfloat16 or float16 CUDA tensors"):
        multi_scale_deformable_attn(value.double(), shapes, locations.double(), weights.double(), sampler="triton")


def test_operator_registration():
    """Schema, fake kernel, autograd registration and AOT dispatch, as torch checks them."""
    value, shapes, locations, weights = random_problem(2, batch=1, queries=4, heads=2, dim=4, points=2,
                                                       shapes=[(3, 2), (1, 2)])
    args = (value.requires_grad_(), [s for hw in shapes for s in hw], locations.requires_grad_(),
            weights.requires_grad_())
    torch.library.opcheck(torch.ops.codetr.ms_deform_attn_triton.default, args)


def test_compiled_forward_and_backward_match_eager():
    """torch.compile(fullgraph=True, dynamic=True) over maps of two sizes: the operator is one opaque
    node traced through its fake kernel and autograd formula, its spatial shapes symbolic
    (SymInt[]); no graph break, the eager numbers."""
    def attend(feature: torch.Tensor, locations: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """feature (B, heads * D, H, W), two levels: the map and its 2x2 average."""
        batch, channels = feature.shape[:2]
        levels = [feature, torch.nn.functional.avg_pool2d(feature, 2)]
        shapes = [(level.shape[2], level.shape[3]) for level in levels]
        value = torch.cat([level.flatten(2) for level in levels], 2).transpose(1, 2).reshape(batch, -1, 2, channels // 2)
        return multi_scale_deformable_attn(value, shapes, locations, weights, sampler="triton")

    from torch._dynamo.testing import CompileCounterWithBackend

    backend = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(attend, fullgraph=True, dynamic=True, backend=backend)
    for seed, size in ((0, (6, 10)), (1, (4, 12))):
        g = torch.Generator().manual_seed(seed)
        feature = torch.randn(1, 8, *size, generator=g).to(DEVICE)
        locations = torch.rand(1, 5, 2, 2, 3, 2, generator=g).to(DEVICE)
        weights = torch.rand(1, 5, 2, 2, 3, generator=g).to(DEVICE)
        results = []
        for fn in (attend, compiled):
            inputs = [t.clone().requires_grad_() for t in (feature, locations, weights)]
            out = fn(*inputs)
            out.backward(torch.ones_like(out))
            results.append([out.detach()] + [t.grad for t in inputs])
        for name, a, b in zip(("output", "feature grad", "locations grad", "weights grad"), *results):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=lambda m: f"{size} {name}: {m}")
    assert backend.frame_count == 1  # the second size runs the same graph


def test_selected_by_name_and_by_use_sampler(monkeypatch):
    value, shapes, locations, weights = random_problem(1, batch=1, queries=5, heads=2, dim=4, points=2)
    calls = []
    real = deform_attn_triton.triton_deformable_attn
    monkeypatch.setattr(deform_attn_triton, "triton_deformable_attn", lambda *args: calls.append(1) or real(*args))
    named = multi_scale_deformable_attn(value, shapes, locations, weights, sampler="triton")
    with use_sampler("triton"):
        chosen = multi_scale_deformable_attn(value, shapes, locations, weights)
    assert calls == [1, 1]
    torch.testing.assert_close(chosen, named, rtol=0, atol=0)
    multi_scale_deformable_attn(value, shapes, locations, weights, sampler="grid_sample")
    if DEVICE == "cpu":  # auto keeps CPU tensors on the CPU kernels, interpreter or not
        multi_scale_deformable_attn(value, shapes, locations, weights)
        assert calls == [1, 1]
    else:  # auto picks the kernel for CUDA tensors
        multi_scale_deformable_attn(value, shapes, locations, weights)
        assert calls == [1, 1, 1]


@pytest.mark.slow  # a subprocess
def test_cpu_tensors_without_the_interpreter_are_an_error():
    """In a process without TRITON_INTERPRET the kernel takes CUDA tensors only, and says so."""
    code = ("import torch\nfrom codetr.ops import multi_scale_deformable_attn as f\n"
            "v, l, a = torch.zeros(1, 4, 1, 2), torch.zeros(1, 3, 1, 1, 1, 2), torch.zeros(1, 3, 1, 1, 1)\n"
            "try:\n    f(v, [(2, 2)], l, a, sampler='triton')\nexcept ValueError as err:\n    print(err)\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "CPU tensors only under TRITON_INTERPRET=1" in done.stdout
