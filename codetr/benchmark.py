"""Speed of a detector on this machine (``codetr bench``): inference latency and images/s, the
time of a training step, the model's FLOPs and parameters, and the machine's float32 matmul rate,
so that every time also reads as a fraction of the FLOP-bound limit.

Protocol: synthetic inputs of one size (normal noise images, no padding; for training, 8 random
boxes per image), ``warmup`` untimed runs, then ``iters`` timed runs; median and p90 (nearest
rank) of those. Inference is ``predict_tensors`` (backbone, encoder, decoder, top-k) under
``torch.inference_mode``; a training step is forward + loss + backward + AdamW step, every
auxiliary head included. FLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode``
(matrix products and convolutions: 2 per multiply-add; the deformable-attention sampling, the
matching and the element-wise work are not counted). The FLOP-bound limit is the rate of one
large float32 matmul on the same threads: ``fraction_of_matmul_rate`` = (FLOPs / time) / that
rate.
"""

from __future__ import annotations

import math
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from codetr.config import Config
from codetr.config_parsing import load_config
from codetr.errors import UserError
from codetr.export.onnx import export_onnx
from codetr.inference.loading import LoadedModel, build_detector, load_model, without_backbone_weights
from codetr.structures import Batch, Target
from codetr.training.optim import build_optimizer

MATMUL_SIZE = 2048
BOXES_PER_IMAGE = 8


def parse_size(text: str) -> tuple[int, int]:
    """``"800x1216"`` -> (800, 1216) (height, width); ``"640"`` -> (640, 640)."""
    parts = text.lower().split("x")
    try:
        size = tuple(int(p) for p in parts)
    except ValueError:
        size = ()
    if len(size) == 1:
        size = size * 2
    if len(size) != 2 or min(size) < 32:
        raise UserError(f"--size {text!r}: expected HEIGHTxWIDTH in pixels (at least 32 each), e.g. 800x1216")
    return size[0], size[1]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_runs(fn: Callable[[], Any], warmup: int, iters: int, device: torch.device) -> list[float]:
    """Seconds of each of ``iters`` calls of ``fn`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return times


def summary(times: list[float], images: int, flops: float | None, matmul_flops_per_s: float) -> dict[str, Any]:
    """Median, p90 (nearest rank), images/s and the fraction of the matmul rate of timed runs."""
    median = statistics.median(times)
    out: dict[str, Any] = {"median_s": median, "p90_s": sorted(times)[math.ceil(0.9 * len(times)) - 1],
                           "images_per_s": images / median, "times_s": times}
    if flops is not None:
        out["gflops_per_s"] = flops / median / 1e9
        out["fraction_of_matmul_rate"] = flops / median / matmul_flops_per_s
    return out


def matmul_rate(device: torch.device, size: int = MATMUL_SIZE, repeats: int = 5) -> float:
    """FLOP/s of the fastest of ``repeats`` float32 (size x size) @ (size x size) products."""
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(size, size, generator=g).to(device) for _ in range(2))
    best = min(time_runs(lambda: torch.mm(a, b), 1, repeats, device))
    return 2 * size**3 / best


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of one call of ``fn`` as FlopCounterMode counts them."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def synthetic_batch(batch: int, size: tuple[int, int], num_classes: int, device: torch.device) -> Batch:
    """Normal-noise images of ``size`` (no padding) with ``BOXES_PER_IMAGE`` random boxes each
    (xyxy absolute, 5-50% of the image side), random labels."""
    g = torch.Generator().manual_seed(0)
    height, width = size
    targets = []
    for _ in range(batch):
        wh = torch.rand(BOXES_PER_IMAGE, 2, generator=g) * 0.45 + 0.05
        xy = torch.rand(BOXES_PER_IMAGE, 2, generator=g) * (1 - wh)
        boxes = torch.cat([xy, xy + wh], 1) * torch.tensor([width, height, width, height])
        targets.append(Target(boxes, torch.randint(0, num_classes, (BOXES_PER_IMAGE,), generator=g)))
    images = torch.randn(batch, 3, height, width, generator=g)
    return Batch(images, torch.zeros(batch, height, width, dtype=torch.bool),
                 torch.tensor([[height, width]] * batch), targets).to(device)


def load_benchmark_model(config: str, overrides: list[str], weights: str | None,
                         device: torch.device) -> tuple[nn.Module, Config]:
    """The detector of ``config`` (+ overrides) with ``weights``, or randomly initialised
    (seed 0, nothing downloaded), and its config."""
    if weights is not None:
        loaded = load_model(weights, config, overrides, device)
        return loaded.model, loaded.cfg
    cfg = load_config(config, overrides)
    torch.manual_seed(0)
    return build_detector(without_backbone_weights(cfg.model)).to(device), cfg


def deform_attn_implementation(device: torch.device) -> str:
    """The multi-scale deformable attention the model runs on ``device`` (sampler ``auto``)."""
    from codetr.ops import deform_attn, deform_attn_cpu

    if device.type == "cuda" and deform_attn.TRITON_FOUND:
        return "triton"
    return "fused" if device.type == "cpu" and deform_attn_cpu.kernel_available() else "grid_sample"


def run_benchmark(config: str, overrides: list[str] | None = None, weights: str | None = None,
                  size: tuple[int, int] | None = None, batch: int = 1, threads: int | None = None,
                  device: str = "cpu", compile: bool = False, onnx: bool = False, iters: int = 10, warmup: int = 2,
                  train: bool = True) -> dict[str, Any]:
    """Measure the detector of ``config`` (a packaged config name or a YAML file, + dotted
    ``overrides``) as described in the module docstring; returns the JSON record.

    weights: a .safetensors or checkpoint (default: random weights). size (height, width):
    default the config's ``data.test_scale`` square. ``compile`` adds ``torch.compile``d
    inference (its first call, the compilation, reported apart); ``onnx`` adds the exported
    graph run by onnxruntime (CPU) on the same input; ``train=False`` skips the training step.
    """
    if batch < 1 or iters < 1 or warmup < 0:
        raise UserError(f"--batch {batch}, --iters {iters}, --warmup {warmup}: need batch, iters >= 1, warmup >= 0")
    if threads is not None:
        if threads < 1:
            raise UserError(f"--threads {threads}: need at least 1")
        torch.set_num_threads(threads)
    device_ = torch.device(device)
    model, cfg = load_benchmark_model(config, list(overrides or []), weights, device_)
    size = size or (cfg.data.test_scale, cfg.data.test_scale)
    data = synthetic_batch(batch, size, cfg.model.num_classes, device_)
    rate = matmul_rate(device_)
    record: dict[str, Any] = {
        "config": str(config), "overrides": list(overrides or []), "weights": weights, "device": str(device_),
        "threads": torch.get_num_threads(), "batch": batch,
        "size": list(size), "dtype": "float32", "iters": iters, "warmup": warmup,
        "deform_attn": deform_attn_implementation(device_),
        "params": sum(p.numel() for p in model.parameters()),
        "inference_params": sum(t.numel() for t in model.inference_state_dict().values() if t.is_floating_point()),
        "matmul_gflops_per_s": rate / 1e9, "matmul_size": MATMUL_SIZE,
    }

    model.eval()

    def infer(fn: Callable = model.predict_tensors, mode: Callable = torch.inference_mode) -> Callable[[], Any]:
        def run() -> Any:
            with mode():
                return fn(data.images, data.masks, data.image_sizes)
        return run

    # with autograd on: FlopCounterMode's module hooks fail on views of parameters without it
    flops = count_flops(infer(mode=torch.enable_grad))
    record["inference_gflops_per_image"] = flops / batch / 1e9
    record["inference"] = summary(time_runs(infer(), warmup, iters, device_), batch, flops, rate)
    if compile:
        compiled = infer(torch.compile(model.predict_tensors, dynamic=False))
        start = time.perf_counter()
        compiled()
        record["compile_s"] = time.perf_counter() - start
        record["inference_compiled"] = summary(time_runs(compiled, warmup, iters, device_), batch, flops, rate)
    if onnx:
        record["onnx"] = summary(onnx_times(model, cfg, data, warmup, iters), batch, flops, rate)
    if train:
        record["training"] = training_record(model, cfg, data, warmup, iters, device_, rate)
    return record


def training_record(model: nn.Module, cfg: Config, data: Batch, warmup: int, iters: int, device: torch.device,
                    rate: float) -> dict[str, Any]:
    """Seconds per training step (forward + loss + backward + AdamW step) on ``data``."""
    model.train()
    optimizer = build_optimizer(model, cfg.train)

    def step() -> None:
        loss = sum(model.loss(data).values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def forward_backward() -> None:
        sum(model.loss(data).values()).backward()

    flops = count_flops(forward_backward)
    optimizer.zero_grad(set_to_none=True)
    out = summary(time_runs(step, warmup, iters, device), len(data.images), flops, rate)
    model.eval()
    return {"gflops_per_step": flops / 1e9, **out}


def onnx_times(model: nn.Module, cfg: Config, data: Batch, warmup: int, iters: int) -> list[float]:
    """Seconds per run of the ONNX export of ``model`` under onnxruntime (CPU, torch's thread count)."""
    import onnxruntime

    with tempfile.TemporaryDirectory() as tmp:
        path = export_onnx(LoadedModel(model.cpu().eval(), cfg, None, None), Path(tmp) / "model.onnx")
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    inputs = {"images": data.images.cpu().numpy(), "orig_sizes": data.image_sizes.cpu().numpy()}
    model.to(data.images.device)
    return time_runs(lambda: session.run(None, inputs), warmup, iters, torch.device("cpu"))


def format_summary(record: dict[str, Any]) -> str:
    """A few human-readable lines of a :func:`run_benchmark` record."""
    h, w = record["size"]
    lines = [f"{record['config']}: batch {record['batch']} at {h}x{w}, {record['threads']} threads on "
             f"{record['device']}, deformable attention: {record['deform_attn']}",
             f"  parameters {record['params'] / 1e6:.1f} M; inference {record['inference_gflops_per_image']:.1f} "
             f"GFLOPs per image; matmul rate {record['matmul_gflops_per_s']:.1f} GFLOP/s"]
    for key, name in (("inference", "inference"), ("inference_compiled", "compiled"), ("onnx", "onnxruntime"),
                      ("training", "training step")):
        if key in record:
            r = record[key]
            fraction = f", {100 * r['fraction_of_matmul_rate']:.0f}% of the matmul rate" if "fraction_of_matmul_rate" in r else ""
            lines.append(f"  {name}: median {r['median_s'] * 1e3:.1f} ms, p90 {r['p90_s'] * 1e3:.1f} ms, "
                         f"{r['images_per_s']:.2f} images/s{fraction}")
    if "compile_s" in record:
        lines.append(f"  torch.compile took {record['compile_s']:.1f} s")
    return "\n".join(lines)
