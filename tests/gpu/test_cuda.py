"""The CUDA path as a user runs it: the Triton kernel on the device, a tiny Co-DINO trained with bf16
and fp16 autocast (finite, decreasing losses; resume), evaluation, prediction and export with
``--device cuda``, the Python API on the device, and torchrun with NCCL on two devices.

Marked ``gpu``; skipped without CUDA. Everything goes through the public API (``codetr.Detector``,
``codetr.ops``) and the command line (``python -m codetr``). Run on a GPU machine with
``pytest -m gpu tests/gpu``.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from codetr import Detector
from codetr.ops import multi_scale_deformable_attn

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
DEVICE = "cuda"
ROOT = Path(__file__).resolve().parents[2]
CO_DINO_LEVELS = [(256, 256), (128, 128), (64, 64), (32, 32), (16, 16)]  # the 1024 LSJ canvas at strides 4-64


def codetr(*args: str, timeout: int = 900) -> str:
    """``python -m codetr ARGS`` in a fresh process; its output (the test fails on a non-zero exit)."""
    done = subprocess.run([sys.executable, "-m", "codetr", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, f"codetr {' '.join(args)}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def train_records(out: Path) -> list[dict]:
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["type"] == "train"]


@pytest.fixture(scope="module")
def config_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny Co-DINO on 8 training and 4 validation synthetic images of 128 px (generated on first
    use), batch 2: 4 iterations per epoch, a loss logged every iteration."""
    root = tmp_path_factory.mktemp("cuda")
    synth = root / "synth"
    data = {"train_images": str(synth / "train"), "train_annotations": str(synth / "annotations/instances_train.json"),
            "val_images": str(synth / "val"), "val_annotations": str(synth / "annotations/instances_val.json"),
            "synthetic": True, "synthetic_train": 8, "synthetic_val": 4, "synthetic_size": 128,
            "train_scales": [128], "max_size": 160, "crop_resize_scales": [128], "crop_size": [96, 128],
            "test_scale": 128, "batch_size": 2, "num_workers": 0}
    cfg = {"base": "co_dino_tiny", "data": data, "train": {"epochs": 4, "log_every": 1, "eval_every": 4}}
    path = root / "co_dino_tiny_cuda.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def random_problem(seed: int, batch: int, queries: int, levels: list[tuple[int, int]], heads: int = 8,
                   dim: int = 32, points: int = 4):
    """Encoder-like inputs on the GPU: softmax-normalised weights, locations in [-0.1, 1.1]."""
    g = torch.Generator().manual_seed(seed)
    value = torch.randn(batch, sum(h * w for h, w in levels), heads, dim, generator=g)
    locations = torch.rand(batch, queries, heads, len(levels), points, 2, generator=g) * 1.2 - 0.1
    weights = torch.rand(batch, queries, heads, len(levels) * points, generator=g).softmax(-1)
    weights = weights.view(batch, queries, heads, len(levels), points)
    return value.to(DEVICE), levels, locations.to(DEVICE), weights.to(DEVICE)


def forward_backward(sampler: str, value, levels, locations, weights, dtype=None):
    inputs = [t.detach().clone().to(dtype or t.dtype).requires_grad_() for t in (value, locations, weights)]
    out = multi_scale_deformable_attn(inputs[0], levels, inputs[1], inputs[2], sampler=sampler)
    # the output gradient rounded to the inputs' dtype, then given in the output's
    grad = torch.randn(out.shape, generator=torch.Generator(DEVICE).manual_seed(0), device=DEVICE).to(value.dtype)
    out.backward(grad.to(out.dtype))
    return [out.detach()] + [t.grad for t in inputs]


# ------------------------------------------------------------------------------ the kernel on CUDA


def test_kernel_matches_grid_sample_in_float64_and_bfloat16():
    """Five levels, 2 images x 3000 queries: float32 outputs within 1e-5 and gradients within 1e-4
    of grid_sample in float64, relative to each gradient's largest element (a float32 pixel
    coordinate on a 29-pixel-wide map is rounded by ~2e-6 pixel, which the location gradients, of
    size ~width, carry: elementwise relative errors of 1e-3 where they cancel to ~0); bfloat16
    inputs within one bfloat16 ulp of the float64 reference of the same rounded inputs (the kernel
    rounds each result once)."""
    problem = random_problem(0, batch=2, queries=3000, levels=[(37, 29), (19, 15), (10, 8), (5, 4), (3, 2)])
    ours = forward_backward("triton", *problem)
    reference = forward_backward("grid_sample", *problem, dtype=torch.float64)
    torch.testing.assert_close(ours[0].double(), reference[0], rtol=1e-5, atol=1e-5)
    for name, a, b in zip(("value", "locations", "weights"), ours[1:], reference[1:]):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-4 * b.abs().max().item(),
                                   msg=lambda m: f"{name}: {m}")
    rounded = [t.bfloat16() if isinstance(t, torch.Tensor) else t for t in problem]
    ours = forward_backward("triton", *rounded)
    reference = forward_backward("grid_sample", *rounded, dtype=torch.float64)
    for name, a, b in zip(("output", "value", "locations", "weights"), ours, reference):
        assert a.dtype == torch.bfloat16, name
        torch.testing.assert_close(a.double(), b, rtol=2 ** -8, atol=1e-4, msg=lambda m: f"bf16 {name}: {m}")


def test_auto_picks_the_kernel_compiles_and_traces_to_grid_sample():
    value, levels, locations, weights = random_problem(1, batch=1, queries=500, levels=[(20, 24), (10, 12)])
    eager = forward_backward("triton", value, levels, locations, weights)
    auto = forward_backward("auto", value, levels, locations, weights)
    for a, b in zip(auto, eager):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)  # the value gradient's atomic adds: any order
    compiled = torch.compile(lambda v, l, a: multi_scale_deformable_attn(v, levels, l, a), fullgraph=True)
    inputs = [t.detach().clone().requires_grad_() for t in (value, locations, weights)]
    out = compiled(*inputs)
    out.backward(torch.randn(out.shape, generator=torch.Generator(DEVICE).manual_seed(0), device=DEVICE))
    for a, b in zip([out.detach()] + [t.grad for t in inputs], eager):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.trace is deprecated; the ONNX export still traces
        traced = torch.jit.trace(lambda v, l, a: multi_scale_deformable_attn(v, levels, l, a), (value, locations, weights),
                                 check_trace=False)
    assert "grid_sampler" in str(traced.graph) and "ms_deform_attn_triton" not in str(traced.graph)


def test_kernel_keeps_no_sampled_intermediate():
    """At Co-DINO's encoder shape (1024 canvas, 87,296 queries, 8 heads x 32, 5 levels x 4 points,
    batch 1), forward + backward: the memory the op allocates beyond its inputs and output
    gradient (its output and input gradients included) is at most 1/8 of grid_sample's, which
    keeps the 1.8 GB of samples."""
    queries = sum(h * w for h, w in CO_DINO_LEVELS)
    value, levels, locations, weights = random_problem(2, batch=1, queries=queries, levels=CO_DINO_LEVELS)
    leaves = [t.requires_grad_() for t in (value, locations, weights)]
    grad = torch.randn(1, queries, 8 * 32, device=DEVICE)
    peaks = {}
    for sampler in ("triton", "grid_sample"):
        for t in leaves:
            t.grad = None
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        multi_scale_deformable_attn(leaves[0], levels, leaves[1], leaves[2], sampler=sampler).backward(grad)
        torch.cuda.synchronize()
        peaks[sampler] = torch.cuda.max_memory_allocated() - base
    assert peaks["triton"] * 8 <= peaks["grid_sample"], peaks


# ------------------------------------------------------------------------------ what a user runs


@pytest.mark.slow
@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_training_with_autocast_resume_eval_predict_export(amp: str, config_file: Path, tmp_path: Path):
    """16 iterations of tiny Co-DINO on the GPU under autocast: finite losses that decrease; a run
    stopped after 8 iterations and resumed gives the uninterrupted run's schedule and, within the
    GPU's run-to-run noise (atomic adds in the backward passes sum in any order), its losses; then
    eval, predict and export with ``--device cuda``."""
    straight, split = tmp_path / "straight", tmp_path / "split"
    codetr("train", str(config_file), "--out", str(straight), "--device", "cuda", f"train.amp={amp}")
    records = train_records(straight)
    losses = [r["loss"] for r in records]
    assert [r["iter"] for r in records] == list(range(1, 17))
    assert all(math.isfinite(loss) for loss in losses), losses
    assert sum(losses[-4:]) < 0.8 * sum(losses[:4]), losses

    codetr("train", str(config_file), "--out", str(split), "--device", "cuda", f"train.amp={amp}", "train.max_iters=8")
    codetr("train", str(config_file), "--out", str(split), "--device", "cuda", f"train.amp={amp}", "--resume")
    resumed = train_records(split)
    assert [r["iter"] for r in resumed] == list(range(1, 17))
    assert [r["lr"] for r in resumed] == [r["lr"] for r in records]
    for a, b in zip(resumed, records):
        assert a["loss"] == pytest.approx(b["loss"], rel=2e-2), (a["iter"], a["loss"], b["loss"])

    weights = straight / "model.safetensors"
    printed = codetr("eval", str(config_file), "--weights", str(weights), "--device", "cuda",
                     "--out", str(tmp_path / "eval"))
    assert printed.count("Average Precision") == 6
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert math.isfinite(metrics["AP"])
    val_dir = config_file.parent / "synth" / "val"
    codetr("predict", str(val_dir), "--weights", str(weights), "--out", str(tmp_path / "pred"), "--device", "cuda",
           "--score-thr", "0")
    predictions = json.loads((tmp_path / "pred" / "predictions.json").read_text())
    assert {p["file_name"] for p in predictions} == {p.name for p in val_dir.glob("*.png")}
    onnx_file = tmp_path / "model.onnx"
    codetr("export", str(config_file), "--weights", str(weights), "--out", str(onnx_file), "--device", "cuda")
    codetr("predict", str(val_dir), "--onnx", str(onnx_file), "--out", str(tmp_path / "pred_onnx"), "--score-thr", "0",
           "--device", "cpu")
    from_onnx = json.loads((tmp_path / "pred_onnx" / "predictions.json").read_text())
    assert len(from_onnx) == len(predictions)


def test_python_api_on_cuda_agrees_with_the_cpu(config_file: Path):
    """Detector(device="cuda") (Triton kernel) and Detector(device="cpu") (fused CPU kernel) with the
    same random weights on the same image: the same best detections, up to TF32 convolutions."""
    image = np.random.default_rng(0).integers(0, 256, (120, 150, 3), dtype=np.uint8)
    gpu = Detector(str(config_file), device="cuda")
    cpu = Detector(str(config_file), device="cpu")
    cpu.model.load_state_dict(gpu.model.state_dict())
    on_gpu, on_cpu = gpu.predict(image, score_thr=0.0)[0], cpu.predict(image, score_thr=0.0)[0]
    assert len(on_gpu) == len(on_cpu) > 0
    torch.testing.assert_close(on_gpu.scores[:20].cpu(), on_cpu.scores[:20].cpu(), rtol=1e-2, atol=1e-3)


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_torchrun_with_nccl_on_two_devices(config_file: Path, tmp_path: Path):
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "codetr",
               "train", str(config_file), "--out", str(out), "--device", "cuda", "train.amp=bf16", "train.epochs=1"]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    records = train_records(out)
    assert records and all(math.isfinite(r["loss"]) for r in records)
    assert (out / "model.safetensors").is_file()
