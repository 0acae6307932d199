"""The CUDA path on one GPU: the Triton deformable-attention kernel against grid_sample, a Co-DINO
R50 LSJ training step per sampler and precision (and per memory knob), and inference.

- the multi-scale deformable attention alone (8 heads x 32 channels, 4 points, batch 1) at the
  encoder shape of Co-DINO at the 1024 LSJ canvas (5 levels at strides 4-64, 87,296 queries
  sampling around their own pixel), of Deformable-DETR at 800x1216 (4 levels at strides 8-64,
  20,197 queries) and at its decoder shape (300 queries sampling inside random boxes): forward
  and forward + backward, float32 and bfloat16, median time (CUDA events) and the peak CUDA memory
  the call adds; the op's compulsory traffic (inputs, outputs and gradients read or written once)
  per second as a fraction of the device's copy bandwidth (measured: a 1 GiB device-to-device
  copy) and of its nominal bandwidth (from the device properties, where torch reports them);
  outputs of the two samplers checked to agree;
- ``codetr train co_dino_5scale_lsj_r50_1x_coco`` (random weights, as released: encoder
  checkpointing of 4 layers, frozen stem + stage 1) on synthetic 1024 px images, batch 2, with
  each sampler and precision (float32, bf16, fp16), and with bf16 + Triton the memory knobs
  (no activation checkpointing, backbone checkpointing, frozen_stages 4, a 768 canvas): median
  seconds per iteration after the warm-up iterations and the peak CUDA memory of the process;
- ``codetr bench co_dino_5scale_r50_1x_coco --size 800x1333 --compile``: inference latency at
  batch 1, eager and ``torch.compile``d, with each sampler.

Each training and inference run is a fresh process (``python -m codetr`` under ``use_sampler``),
so its peak memory is its own. Writes JSON (``--out``) and a dated row in bench/RESULTS.md.

    python bench/gpu.py [--warmup 5] [--repeats 20] [--train-iters 12] [--skip-training]

Without a CUDA device it stops at once with one line.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import append_result, machine, write_json  # noqa: E402

from codetr.ops.deform_attn import multi_scale_deformable_attn, use_sampler  # noqa: E402

CO_DINO_1024 = [(256, 256), (128, 128), (64, 64), (32, 32), (16, 16)]  # the 1024 canvas at strides 4-64
DEFORMABLE_800X1216 = [(100, 152), (50, 76), (25, 38), (13, 19)]  # an 800x1216 image at strides 8-64
OP_SHAPES: dict[str, tuple[list[tuple[int, int]], int | None]] = {  # levels, queries (None: one per pixel)
    "co_dino_1024_encoder": (CO_DINO_1024, None),
    "deformable_detr_800x1216_encoder": (DEFORMABLE_800X1216, None),
    "deformable_detr_800x1216_decoder": (DEFORMABLE_800X1216, 300),
}
HEADS, HEAD_DIM, POINTS = 8, 32, 4
SAMPLERS = ("triton", "grid_sample")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
TRAIN_CONFIG = "co_dino_5scale_lsj_r50_1x_coco"
INFER_CONFIG = "co_dino_5scale_r50_1x_coco"
PRECISIONS = {"fp32": "null", "bf16": "bf16", "fp16": "fp16"}
KNOBS = {  # bf16 + Triton with one memory knob changed from the released config
    "no activation checkpointing": ["model.transformer.enc_with_cp=0"],
    "backbone checkpointing": ["model.backbone.with_cp=true"],
    "frozen_stages 4": ["model.backbone.frozen_stages=4"],
    "768 canvas": ["data.lsj_size=768"],
}


# ------------------------------------------------------------------------------ the op


def op_inputs(levels: list[tuple[int, int]], queries: int | None, dtype: torch.dtype,
              seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """value (1, S, 8, 32), locations (1, Q, 8, L, 4, 2), softmax weights (1, Q, 8, L, 4) on the GPU.
    Encoder (queries None): one query per pixel of every level, sampling within a few pixels of
    it; decoder: ``queries`` random boxes, sampling inside them."""
    g = torch.Generator().manual_seed(seed)
    value = torch.randn(1, sum(h * w for h, w in levels), HEADS, HEAD_DIM, generator=g)
    if queries is None:
        centres = torch.cat([torch.stack(torch.meshgrid((torch.arange(h) + 0.5) / h, (torch.arange(w) + 0.5) / w,
                                                        indexing="ij")[::-1], -1).view(-1, 2) for h, w in levels])
        sizes = torch.tensor([[w, h] for h, w in levels], dtype=torch.float32)  # (L, 2) as (x, y)
        offsets = torch.randn(1, len(centres), HEADS, len(levels), POINTS, 2, generator=g) * 2 / sizes[:, None, :]
        locations = centres[None, :, None, None, None, :] + offsets
    else:
        centre = torch.rand(1, queries, 1, 1, 1, 2, generator=g) * 0.8 + 0.1
        size = torch.rand(1, queries, 1, 1, 1, 2, generator=g) * 0.45 + 0.05
        locations = centre + (torch.rand(1, queries, HEADS, len(levels), POINTS, 2, generator=g) - 0.5) * size
    weights = torch.randn(locations.shape[:3] + (len(levels) * POINTS,), generator=g).softmax(-1)
    weights = weights.view(locations.shape[:-1])
    return tuple(t.to("cuda", dtype) for t in (value, locations, weights))


def median_ms(fn: Callable[[], Any], warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def peak_added_mb(fn: Callable[[], Any]) -> float:
    """CUDA memory allocated at the peak of ``fn`` beyond what was allocated before (MiB)."""
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2 ** 20


def copy_bandwidth() -> float:
    """Bytes per second of a 1 GiB device-to-device copy (read + write)."""
    src = torch.empty(2 ** 28, device="cuda")
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), 3, 10)
    return 2 * src.nbytes / (ms / 1e3)


def nominal_bandwidth() -> float | None:
    """Bytes per second from the memory clock and bus width (double data rate), where reported."""
    props = torch.cuda.get_device_properties(0)
    clock_khz, bus_bits = getattr(props, "memory_clock_rate", 0), getattr(props, "memory_bus_width", 0)
    return 2 * clock_khz * 1e3 * bus_bits / 8 if clock_khz and bus_bits else None


def measure_op(name: str, dtype_name: str, warmup: int, repeats: int, copy_rate: float,
               nominal: float | None) -> dict[str, Any]:
    levels, queries = OP_SHAPES[name]
    value, locations, weights = op_inputs(levels, queries, DTYPES[dtype_name])
    leaves = [t.clone().requires_grad_() for t in (value, locations, weights)]
    out_shape = (1, locations.shape[1], HEADS * HEAD_DIM)
    grad = torch.randn(out_shape, device="cuda", dtype=value.dtype)
    forward_bytes = sum(t.nbytes for t in (value, locations, weights)) + grad.nbytes
    backward_bytes = forward_bytes + 2 * sum(t.nbytes for t in (value, locations, weights))  # reads, gradients
    record: dict[str, Any] = {"shape": name, "dtype": dtype_name, "queries": locations.shape[1],
                              "levels": levels}
    outputs = {}
    for sampler in SAMPLERS:
        def forward() -> torch.Tensor:
            with torch.no_grad():
                return multi_scale_deformable_attn(value, levels, locations, weights, sampler=sampler)

        def forward_backward() -> None:
            for t in leaves:
                t.grad = None
            multi_scale_deformable_attn(leaves[0], levels, leaves[1], leaves[2], sampler=sampler).backward(grad)

        outputs[sampler] = forward().float()
        ms_f, ms_fb = median_ms(forward, warmup, repeats), median_ms(forward_backward, warmup, repeats)
        forward_peak = peak_added_mb(forward)
        for t in leaves:  # the peak of forward + backward then counts the gradients it allocates
            t.grad = None
        record[sampler] = {
            "forward_ms": ms_f, "forward_backward_ms": ms_fb,
            "forward_peak_mb": forward_peak, "forward_backward_peak_mb": peak_added_mb(forward_backward),
            "forward_of_copy_bandwidth": forward_bytes / (ms_f / 1e3) / copy_rate,
            "forward_backward_of_copy_bandwidth": backward_bytes / (ms_fb / 1e3) / copy_rate,
        }
        if nominal:
            record[sampler]["forward_of_nominal_bandwidth"] = forward_bytes / (ms_f / 1e3) / nominal
            record[sampler]["forward_backward_of_nominal_bandwidth"] = backward_bytes / (ms_fb / 1e3) / nominal
    record["max_abs_difference"] = (outputs["triton"] - outputs["grid_sample"]).abs().max().item()
    tolerance = 1e-4 if dtype_name == "fp32" else 0.05
    if record["max_abs_difference"] > tolerance:
        raise SystemExit(f"{name} {dtype_name}: Triton and grid_sample outputs differ by "
                         f"{record['max_abs_difference']:.2e} (> {tolerance}); not reporting times")
    return record


# ------------------------------------------------------------------------------ whole runs, each its own process


def child(sampler: str, result_file: str, args: list[str]) -> None:
    """``codetr ARGS`` in this process under ``use_sampler(sampler)``; its exit code and peak CUDA
    memory written to ``result_file`` as JSON."""
    from codetr.cli import main

    with use_sampler(sampler):
        code = main(args)
    Path(result_file).write_text(json.dumps({
        "code": code, "peak_allocated_mb": torch.cuda.max_memory_allocated() / 2 ** 20,
        "peak_reserved_mb": torch.cuda.max_memory_reserved() / 2 ** 20}))


def run_child(sampler: str, args: list[str], work: Path) -> dict[str, Any]:
    result_file = work / "child.json"
    result_file.unlink(missing_ok=True)
    command = [sys.executable, __file__, "--child", sampler, str(result_file), "--", *args]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0 or not result_file.exists():
        return {"error": (done.stderr or done.stdout).strip().splitlines()[-1:]}
    result = json.loads(result_file.read_text())
    if result["code"] != 0:
        return {"error": (done.stderr or done.stdout).strip().splitlines()[-1:]}
    return result


def training_overrides(work: Path, iters: int) -> list[str]:
    synth = work / "synth"
    return [f"data.train_images={synth / 'train'}", f"data.train_annotations={synth / 'annotations/instances_train.json'}",
            f"data.val_images={synth / 'val'}", f"data.val_annotations={synth / 'annotations/instances_val.json'}",
            "data.synthetic=true", f"data.synthetic_train={2 * iters}", "data.synthetic_val=1",
            "data.synthetic_size=1024", "data.batch_size=2", "data.num_workers=4", "model.num_classes=6",
            f"train.max_iters={iters}", "train.epochs=1", "train.log_every=1", "train.eval_every=0"]


def training_args(out: Path, precision: str, extra: list[str], work: Path, iters: int) -> list[str]:
    """The ``codetr`` command line of one training run into ``out``."""
    return ["train", TRAIN_CONFIG, "--out", str(out), "--overwrite", "--device", "cuda",
            *training_overrides(work, iters), f"train.amp={PRECISIONS[precision]}", *extra]


def inference_args(json_file: Path) -> list[str]:
    """The ``codetr`` command line of the inference measurement, its record written to ``json_file``."""
    return ["bench", INFER_CONFIG, "--device", "cuda", "--size", "800x1333", "--compile", "--no-train",
            "--iters", "20", "--warmup", "5", "--json", str(json_file)]


def measure_training(sampler: str, precision: str, extra: list[str], work: Path, iters: int,
                     warmup: int) -> dict[str, Any]:
    out = work / f"train_{len(list(work.glob('train_*')))}"
    result = run_child(sampler, training_args(out, precision, extra, work, iters), work)
    if "error" not in result:
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        times = [r["time"] for r in records if r["type"] == "train" and r["iter"] > warmup]
        result["step_s"] = statistics.median(times)
        result["finite_losses"] = all(r["loss"] == r["loss"] for r in records if r["type"] == "train")
    return {"sampler": sampler, "precision": precision, "overrides": extra, **result}


def measure_inference(sampler: str, work: Path) -> dict[str, Any]:
    json_file = work / f"infer_{sampler}.json"
    result = run_child(sampler, inference_args(json_file), work)
    if "error" not in result:
        record = json.loads(json_file.read_text())
        result.update(eager_ms=record["inference"]["median_s"] * 1e3,
                      compiled_ms=record["inference_compiled"]["median_s"] * 1e3, compile_s=record["compile_s"])
    return {"sampler": sampler, **result}


# ------------------------------------------------------------------------------ report


def summary_line(ops: list[dict], training: list[dict], inference: list[dict]) -> str:
    parts = []
    for r in ops:
        t, g = r["triton"], r["grid_sample"]
        parts.append(f"op {r['shape']} {r['dtype']}: forward {g['forward_ms']:.2f} -> {t['forward_ms']:.2f} ms, "
                     f"fwd+bwd {g['forward_backward_ms']:.2f} -> {t['forward_backward_ms']:.2f} ms "
                     f"(x{g['forward_backward_ms'] / t['forward_backward_ms']:.1f}), fwd+bwd peak "
                     f"{g['forward_backward_peak_mb']:.0f} -> {t['forward_backward_peak_mb']:.0f} MiB, Triton at "
                     f"{t['forward_backward_of_copy_bandwidth']:.0%} of the copy bandwidth")
    for r in training:
        what = f"train {r['sampler']} {r['precision']}" + (f" {' '.join(r['overrides'])}" if r["overrides"] else "")
        parts.append(f"{what}: " + (f"error {r['error']}" if "error" in r else
                                    f"{r['step_s']:.3f} s/step, peak {r['peak_allocated_mb'] / 1024:.1f} GiB "
                                    f"(reserved {r['peak_reserved_mb'] / 1024:.1f})"))
    for r in inference:
        parts.append(f"inference 800x1333 {r['sampler']}: " + (f"error {r['error']}" if "error" in r else
                                                               f"eager {r['eager_ms']:.1f} ms, compiled "
                                                               f"{r['compiled_ms']:.1f} ms"))
    return "; ".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--warmup", type=int, default=5, help="untimed op calls first")
    parser.add_argument("--repeats", type=int, default=20, help="timed op calls (median)")
    parser.add_argument("--train-iters", type=int, default=12, help="training iterations per run")
    parser.add_argument("--train-warmup", type=int, default=4, help="first iterations left out of the step time")
    parser.add_argument("--skip-training", action="store_true", help="only the op and inference")
    parser.add_argument("--out", default="bench/results/gpu.json")
    parser.add_argument("--child", nargs=2, metavar=("SAMPLER", "RESULT"), help=argparse.SUPPRESS)
    parser.add_argument("args", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/gpu.py: no CUDA device (torch.cuda.is_available() is False); nothing measured")
    if args.child:
        child(args.child[0], args.child[1], args.args)
        return

    device = torch.cuda.get_device_name(0)
    copy_rate, nominal = copy_bandwidth(), nominal_bandwidth()
    ops = [measure_op(name, dtype, args.warmup, args.repeats, copy_rate, nominal)
           for name in OP_SHAPES for dtype in DTYPES]
    training: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if not args.skip_training:
            for precision in PRECISIONS:
                for sampler in SAMPLERS:
                    training.append(measure_training(sampler, precision, [], work, args.train_iters, args.train_warmup))
            for extra in KNOBS.values():
                training.append(measure_training("triton", "bf16", extra, work, args.train_iters, args.train_warmup))
        inference = [measure_inference(sampler, work) for sampler in SAMPLERS]
    protocol = (f"{device}; op: batch 1, 8 heads x 32, 4 points, warm-up {args.warmup}, median of {args.repeats} "
                f"(CUDA events), peak = CUDA memory added by the call; copy bandwidth {copy_rate / 1e9:.0f} GB/s"
                + (f", nominal {nominal / 1e9:.0f} GB/s" if nominal else "")
                + f"; training: {TRAIN_CONFIG} random weights, synthetic 1024 px, batch 2, {args.train_iters} "
                f"iterations, median after {args.train_warmup}; inference: {INFER_CONFIG} 800x1333 batch 1; "
                f"{machine()}")
    write_json(args.out, {"device": device, "copy_bandwidth": copy_rate, "nominal_bandwidth": nominal,
                          "ops": ops, "training": training, "inference": inference})
    line = summary_line(ops, training, inference)
    append_result("gpu", protocol, line)
    print(line.replace("; ", "\n"))
    print(f"wrote {args.out} and a row in bench/RESULTS.md")


if __name__ == "__main__":
    main()
