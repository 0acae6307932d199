"""codetr versus transformers' Deformable-DETR on the same CPU, with the same weights, in one process.

transformers' ``DeformableDetrForObjectDetection`` (ResNet-50 from timm, two-stage, iterative box
refinement, 300 queries, 91 classes, random initialisation plus small noise so no value is
trivial, dropout 0) is converted to codetr with ``codetr.convert.hf_deformable_detr``. Every
measurement alternates the two implementations (which goes first flips each round), after
``--warmup`` untimed rounds; medians of ``--repeats``; outputs are checked to agree.

- the multi-scale deformable attention alone (8 heads x 32 channels, 4 levels at strides 8-64
  of an 800x1216 image, 4 points), at the encoder shape (20197 queries sampling around their own
  pixel) and at the decoder shape (300 queries sampling inside random boxes): forward, and
  forward + backward; outputs within 1e-5; peak RSS added by one forward (and forward +
  backward), each in a fresh process whose allocator returns freed blocks at once, from the
  kernel's high-water mark (``/proc/self/clear_refs``);
- end-to-end inference, batch 1, at 640x640 and 800x1216: transformers' forward against
  codetr's ``predict_tensors`` (forward + top-k), both under ``torch.inference_mode``; the top-100
  detections (codetr's post-processing applied to both outputs) must be the same;
- a training step, batch 2 at 512x512 (8 random boxes per image): forward, the same losses
  (6 decoder layers of focal classification, L1 and GIoU with weights 1 / 5 / 2 and the same
  Hungarian costs; no two-stage encoder loss, which transformers does not compute), backward,
  AdamW; the first step's losses must agree;
- the fraction of the FLOP-bound limit: FLOPs of codetr's forward (FlopCounterMode) per second,
  over the rate of a large float32 matmul on the same threads; with ``--compile`` also for
  ``torch.compile``d codetr inference.

transformers' timm ResNet-50 gets its stem and layer1 frozen, as in the original and in codetr
(transformers 5 leaves them trainable). The allocator settings (``MALLOC_*`` environment
variables, ``LD_PRELOAD``) are recorded with the results: they move the numbers.

    python bench/peers.py --threads 2 --warmup 2 --repeats 7 [--compile]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import append_result, machine, write_json  # noqa: E402

import transformers  # noqa: E402
from transformers.models.deformable_detr.modeling_deformable_detr import MultiScaleDeformableAttention  # noqa: E402

from codetr.convert.hf_deformable_detr import config_from_hf, convert_hf_deformable_detr  # noqa: E402
from codetr.benchmark import count_flops, matmul_rate  # noqa: E402
from codetr.models.deformable_detr import DeformableDETR  # noqa: E402
from codetr.ops.deform_attn import multi_scale_deformable_attn  # noqa: E402
from codetr.structures import Target  # noqa: E402

LEVELS = [(100, 152), (50, 76), (25, 38), (13, 19)]  # an 800x1216 image at strides 8, 16, 32, 64
HEADS, HEAD_DIM, POINTS = 8, 32, 4


# ------------------------------------------------------------------------------ measuring


def alternate(fns: dict[str, Callable[[], Any]], warmup: int, repeats: int) -> dict[str, list[float]]:
    """Seconds of each function, run in alternating order (the first of a round flips every round)."""
    names = list(fns)
    times: dict[str, list[float]] = {name: [] for name in names}
    for i in range(warmup + repeats):
        for name in names if i % 2 == 0 else names[::-1]:
            start = time.perf_counter()
            fns[name]()
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
    return times


def peak_rss_added_mb(fn: Callable[[], Any]) -> float | None:
    """Peak resident memory added by ``fn`` (MB): the high-water mark after resetting it, minus
    the resident memory before. None where /proc/self/clear_refs is not available (not Linux)."""
    def status(key: str) -> float:
        line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith(key))
        return int(line.split()[1]) / 1024

    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    except OSError:
        return None
    before = status("VmRSS:")
    result = fn()
    peak = status("VmHWM:")
    del result
    return peak - before


def op_peak_rss_mb(queries: int, implementation: str, backward: bool) -> float | None:
    """:func:`peak_rss_added_mb` of one op call, in a fresh process whose allocator maps every
    block above 64 kB on its own and returns it when freed (so the resident memory follows the
    live tensors, and no block freed earlier hides part of the peak)."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "65536"}
    out = subprocess.run([sys.executable, __file__, "--child-memory", str(queries), implementation,
                          "backward" if backward else "forward"], env=env, check=True, capture_output=True, text=True)
    value = out.stdout.strip().splitlines()[-1]
    return None if value == "None" else float(value)


def allocator() -> str:
    """The memory allocator settings of this process (they move the numbers: fresh pages are
    costly to fault in, and the implementations allocate differently)."""
    settings = [f"{k}={v}" for k, v in sorted(os.environ.items()) if k.startswith("MALLOC_") or k == "LD_PRELOAD"]
    return "allocator: " + (", ".join(settings) if settings else "glibc malloc defaults")


def medians(times: dict[str, list[float]]) -> dict[str, float]:
    return {name: statistics.median(t) for name, t in times.items()}


# ------------------------------------------------------------------------------ the op alone


def op_inputs(queries: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """value (1, S, 8, 32); locations (1, Q, 8, 4, 4, 2) normalised: for the encoder (Q = S)
    each token's pixel centre plus offsets of ~2 pixels of each level; for the decoder random
    boxes plus offsets inside them; softmax attention weights."""
    g = torch.Generator().manual_seed(seed)
    tokens = sum(h * w for h, w in LEVELS)
    value = torch.randn(1, tokens, HEADS, HEAD_DIM, generator=g)
    offsets = torch.randn(1, queries, HEADS, len(LEVELS), POINTS, 2, generator=g)
    if queries == tokens:
        centres = torch.cat([torch.stack(torch.meshgrid((torch.arange(w) + 0.5) / w, (torch.arange(h) + 0.5) / h,
                                                        indexing="xy"), -1).reshape(-1, 2) for h, w in LEVELS])
        scale = torch.tensor([[1 / w, 1 / h] for h, w in LEVELS])  # 2 pixels of each level
        locations = centres[None, :, None, None, None] + 2 * offsets * scale[:, None]
    else:
        wh = torch.rand(1, queries, 1, 1, 1, 2, generator=g) * 0.45 + 0.05
        centre = torch.rand(1, queries, 1, 1, 1, 2, generator=g) * (1 - wh) + wh / 2
        locations = centre + offsets / POINTS * wh * 0.5
    weights = torch.randn(1, queries, HEADS, len(LEVELS) * POINTS, generator=g).softmax(-1)
    return value, locations, weights.view(1, queries, HEADS, len(LEVELS), POINTS)


def op_implementations() -> dict[str, Callable[..., torch.Tensor]]:
    """(value, locations, weights) -> output of transformers' and codetr's deformable attention."""
    theirs_op = MultiScaleDeformableAttention()
    shapes = torch.tensor(LEVELS)
    starts = torch.cat([shapes.new_zeros(1), shapes.prod(1).cumsum(0)[:-1]])

    def theirs(v: torch.Tensor, loc: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return theirs_op(v, shapes, LEVELS, starts, loc, w, 64)

    def ours(v: torch.Tensor, loc: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return multi_scale_deformable_attn(v, LEVELS, loc, w)

    return {"transformers": theirs, "codetr": ours}


def child_memory(queries: int, implementation: str, backward: bool) -> None:
    """Print the peak RSS (MB) added by one call (with backward: forward + backward) of the op."""
    value, locations, weights = op_inputs(queries)
    fn = op_implementations()[implementation]
    with torch.no_grad():
        fn(value, locations[:, :1], weights[:, :1])  # one query: libraries, thread pool and kernel loaded
    grad = torch.randn(1, queries, HEADS * HEAD_DIM)

    def run() -> Any:
        if not backward:
            with torch.no_grad():
                return fn(value, locations, weights)
        inputs = [t.clone().requires_grad_() for t in (value, locations, weights)]
        fn(*inputs).backward(grad)
        return [t.grad for t in inputs]

    print(peak_rss_added_mb(run))


def measure_op(queries: int, warmup: int, repeats: int) -> dict[str, Any]:
    value, locations, weights = op_inputs(queries)
    impls = op_implementations()
    with torch.no_grad():
        outputs = {name: fn(value, locations, weights) for name, fn in impls.items()}
    difference = (outputs["codetr"] - outputs["transformers"]).abs().max().item()
    if difference > 1e-5:
        raise RuntimeError(f"deformable attention ({queries} queries): outputs differ by {difference:.2e}")
    grad = torch.randn(outputs["codetr"].shape, generator=torch.Generator().manual_seed(1))

    def forward(fn: Callable) -> Callable[[], Any]:
        def run() -> Any:
            with torch.no_grad():
                return fn(value, locations, weights)
        return run

    def forward_backward(fn: Callable) -> Callable[[], Any]:
        def run() -> Any:
            inputs = [t.clone().requires_grad_() for t in (value, locations, weights)]
            fn(*inputs).backward(grad)
            return [t.grad for t in inputs]
        return run

    grads = {name: forward_backward(fn)() for name, fn in impls.items()}
    grad_difference = max((a - b).abs().max().item() / max(b.abs().max().item(), 1.0)
                          for a, b in zip(grads["codetr"], grads["transformers"]))
    if grad_difference > 1e-4:
        raise RuntimeError(f"deformable attention ({queries} queries): gradients differ by {grad_difference:.2e}")
    fwd = medians(alternate({name: forward(fn) for name, fn in impls.items()}, warmup, repeats))
    both = medians(alternate({name: forward_backward(fn) for name, fn in impls.items()}, warmup, repeats))
    return {"queries": queries, "max_abs_difference": difference, "max_grad_difference_relative": grad_difference,
            "forward_s": fwd, "forward_backward_s": both,
            "forward_speedup": fwd["transformers"] / fwd["codetr"],
            "forward_backward_speedup": both["transformers"] / both["codetr"],
            "forward_peak_rss_mb": {name: op_peak_rss_mb(queries, name, False) for name in impls},
            "forward_backward_peak_rss_mb": {name: op_peak_rss_mb(queries, name, True) for name in impls}}


# ------------------------------------------------------------------------------ the models


def build_models() -> tuple[torch.nn.Module, DeformableDETR]:
    """transformers' model and codetr's with the same weights."""
    torch.manual_seed(0)
    config = transformers.DeformableDetrConfig(
        backbone="resnet50", use_timm_backbone=True, use_pretrained_backbone=False, two_stage=True,
        with_box_refine=True, num_queries=300, two_stage_num_proposals=300, auxiliary_loss=True,
        dropout=0.0, attention_dropout=0.0, activation_dropout=0.0)
    theirs = transformers.DeformableDetrForObjectDetection(config)
    with torch.no_grad():  # non-trivial values everywhere (the initialisation leaves many zeros)
        for name, p in theirs.named_parameters():
            if "backbone" not in name:
                p.add_(torch.randn_like(p) * 0.02)
    for name, p in theirs.model.backbone.named_parameters():
        # the stem and layer1 are frozen as in the original (and codetr's frozen_stages=1);
        # transformers 5 leaves them trainable in its timm backbone
        if not any(layer in name for layer in ("layer2", "layer3", "layer4")):
            p.requires_grad_(False)
    cfg = config_from_hf(config.to_dict())
    cfg.loss.cls_weight = 1.0  # transformers' loss and matcher weigh classification 1 (bbox 5, GIoU 2 as codetr)
    ours = DeformableDETR(cfg)
    ours.load_state_dict(convert_hf_deformable_detr(theirs.state_dict()), strict=True)
    return theirs.eval(), ours.eval()


def measure_inference(theirs: torch.nn.Module, ours: DeformableDETR, size: tuple[int, int], warmup: int, repeats: int,
                      rate: float, compile: bool) -> dict[str, Any]:
    height, width = size
    images = torch.randn(1, 3, height, width, generator=torch.Generator().manual_seed(2))
    masks = torch.zeros(1, height, width, dtype=torch.bool)
    pixel_mask = torch.ones(1, height, width, dtype=torch.long)
    sizes = torch.tensor([[height, width]])
    with torch.inference_mode():
        their_out = theirs(pixel_values=images, pixel_mask=pixel_mask)
        our_out, _ = ours(images, masks)
        detections = [ours.postprocess(logits, boxes, sizes, top_k=100) for logits, boxes in
                      ((our_out.logits[-1], our_out.boxes[-1]), (their_out.logits, their_out.pred_boxes))]
    check_detections(*detections, f"inference at {height}x{width}")

    def run(fn: Callable[[], Any]) -> Callable[[], Any]:
        def timed() -> Any:
            with torch.inference_mode():
                return fn()
        return timed

    impls = {"transformers": run(lambda: theirs(pixel_values=images, pixel_mask=pixel_mask)),
             "codetr": run(lambda: ours.predict_tensors(images, masks, sizes))}
    flops = count_flops(lambda: ours.predict_tensors(images, masks, sizes))
    record: dict[str, Any] = {"size": [height, width], "codetr_gflops": flops / 1e9}
    if compile:
        compiled = torch.compile(ours.predict_tensors, dynamic=False)  # one graph per size
        start = time.perf_counter()
        with torch.inference_mode():
            check_detections(compiled(images, masks, sizes), ours.predict_tensors(images, masks, sizes),
                             "compiled codetr")
        record["compile_s"] = time.perf_counter() - start
        impls["codetr_compiled"] = run(lambda: compiled(images, masks, sizes))
    record["latency_s"] = medians(alternate(impls, warmup, repeats))
    record["codetr_over_transformers"] = record["latency_s"]["codetr"] / record["latency_s"]["transformers"]
    record["fraction_of_matmul_rate"] = {name: flops / t / rate for name, t in record["latency_s"].items()}
    return record


def check_detections(ours: tuple, theirs: tuple, what: str) -> None:
    """The same detections: each of ours (boxes (K, 4) xyxy pixels, scores (K,), labels (K,)) has
    one of theirs with the same label, a box within 0.01 px and a score within 1e-4 (the order of
    nearly equal scores may differ)."""
    boxes, scores, labels = (t[0] for t in ours)
    their_boxes, their_scores, their_labels = (t[0] for t in theirs)
    same = (labels[:, None] == their_labels[None]) & ((scores[:, None] - their_scores[None]).abs() <= 1e-4) & \
        ((boxes[:, None] - their_boxes[None]).abs() <= 1e-2).all(-1)
    if not same.any(1).all() or len(labels) != len(their_labels):
        raise RuntimeError(f"{what}: {int((~same.any(1)).sum())} of {len(labels)} detections have no equal "
                           f"(max score difference {(scores - their_scores).abs().max():.2e})")


def training_inputs(batch: int, size: int, num_classes: int) -> tuple[torch.Tensor, list[Target], list[dict]]:
    """Images and 8 random boxes per image, as codetr targets (xyxy pixels) and transformers labels
    (cxcywh normalised)."""
    g = torch.Generator().manual_seed(3)
    images = torch.randn(batch, 3, size, size, generator=g)
    targets, labels = [], []
    for _ in range(batch):
        wh = torch.rand(8, 2, generator=g) * 0.45 + 0.05
        xy = torch.rand(8, 2, generator=g) * (1 - wh)
        classes = torch.randint(0, num_classes, (8,), generator=g)
        targets.append(Target(torch.cat([xy, xy + wh], 1) * size, classes))
        labels.append({"class_labels": classes, "boxes": torch.cat([xy + wh / 2, wh], 1)})
    return images, targets, labels


def measure_training(theirs: torch.nn.Module, ours: DeformableDETR, batch: int, size: int, warmup: int,
                     repeats: int, rate: float) -> dict[str, Any]:
    images, targets, labels = training_inputs(batch, size, ours.cfg.num_classes)
    masks = torch.zeros(batch, size, size, dtype=torch.bool)
    pixel_mask = torch.ones(batch, size, size, dtype=torch.long)
    sizes = torch.tensor([[size, size]] * batch)

    def our_loss() -> torch.Tensor:
        out, _ = ours(images, masks)
        out.enc_logits = out.enc_boxes = None  # transformers computes no two-stage encoder loss
        return sum(ours.criterion(out, targets, sizes).values())

    def their_loss() -> torch.Tensor:
        return theirs(pixel_values=images, pixel_mask=pixel_mask, labels=labels).loss

    theirs.train()
    ours.train()
    first = {"codetr": our_loss().item(), "transformers": their_loss().item()}
    if abs(first["codetr"] - first["transformers"]) > 1e-4 * abs(first["transformers"]):
        raise RuntimeError(f"training losses differ: {first}")
    flops = count_flops(lambda: our_loss().backward())

    def step(model: torch.nn.Module, loss: Callable[[], torch.Tensor]) -> Callable[[], None]:
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

        def run() -> None:
            value = loss()
            optimizer.zero_grad(set_to_none=True)
            value.backward()
            optimizer.step()
        return run

    trainable = {name: sum(p.numel() for p in m.parameters() if p.requires_grad)
                 for name, m in (("codetr", ours), ("transformers", theirs))}
    if trainable["codetr"] != trainable["transformers"]:
        raise RuntimeError(f"different trainable parameters: {trainable}")
    times = medians(alternate({"transformers": step(theirs, their_loss), "codetr": step(ours, our_loss)}, warmup, repeats))
    theirs.eval()
    ours.eval()
    return {"batch": batch, "size": [size, size], "first_loss": first, "trainable_params": trainable["codetr"],
            "step_s": times, "codetr_over_transformers": times["codetr"] / times["transformers"],
            "codetr_gflops_per_step": flops / 1e9,
            "fraction_of_matmul_rate": {name: flops / t / rate for name, t in times.items()}}


# ------------------------------------------------------------------------------ main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--sizes", nargs="*", default=["640x640", "800x1216"], help="end-to-end inference sizes")
    parser.add_argument("--no-train", action="store_true", help="skip the training step")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile'd codetr inference")
    parser.add_argument("--note", default="", help="added to the protocol of the RESULTS.md row (e.g. machine loaded)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/peers.json"))
    parser.add_argument("--child-memory", nargs=3, metavar=("QUERIES", "IMPLEMENTATION", "PASS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.child_memory:
        queries, implementation, which = args.child_memory
        child_memory(int(queries), implementation, which == "backward")
        return
    rate = matmul_rate(torch.device("cpu"))
    print(f"matmul rate {rate / 1e9:.1f} GFLOP/s", flush=True)
    results: dict[str, Any] = {"threads": args.threads, "matmul_gflops_per_s": rate / 1e9, "allocator": allocator(),
                               "note": args.note}
    tokens = sum(h * w for h, w in LEVELS)
    for name, queries in (("op_encoder", tokens), ("op_decoder", 300)):
        results[name] = measure_op(queries, args.warmup, args.repeats)
        print(name, results[name], flush=True)
    theirs, ours = build_models()
    for size in args.sizes:
        h, w = (int(x) for x in size.split("x"))
        results[f"inference_{h}x{w}"] = measure_inference(theirs, ours, (h, w), args.warmup, args.repeats, rate,
                                                          args.compile)
        print(size, results[f"inference_{h}x{w}"], flush=True)
    if not args.no_train:
        results["training"] = measure_training(theirs, ours, 2, 512, args.warmup, args.repeats, rate)
        print("training", results["training"], flush=True)
    write_json(args.out, results)

    parts = []
    for name, label in (("op_encoder", "attention op, encoder shape"), ("op_decoder", "attention op, decoder shape")):
        r = results[name]
        parts.append(f"{label} ({r['queries']} queries): forward {r['forward_s']['transformers'] * 1e3:.1f} -> "
                     f"{r['forward_s']['codetr'] * 1e3:.1f} ms (x{r['forward_speedup']:.1f} faster), forward+backward "
                     f"{r['forward_backward_s']['transformers'] * 1e3:.0f} -> {r['forward_backward_s']['codetr'] * 1e3:.0f} ms "
                     f"(x{r['forward_backward_speedup']:.1f}), forward peak RSS {r['forward_peak_rss_mb']['transformers']:.0f} "
                     f"-> {r['forward_peak_rss_mb']['codetr']:.0f} MB")
    for key, r in results.items():
        if key.startswith("inference_"):
            latency = r["latency_s"]
            compiled = f", compiled {latency['codetr_compiled']:.2f} s" if "codetr_compiled" in latency else ""
            fractions = ", ".join(f"{n} {100 * f:.0f}%" for n, f in r["fraction_of_matmul_rate"].items())
            parts.append(f"inference {r['size'][0]}x{r['size'][1]}: {latency['transformers']:.2f} -> {latency['codetr']:.2f} s "
                         f"(x{r['codetr_over_transformers']:.2f}){compiled}; of the matmul rate: {fractions}")
    if "training" in results:
        r = results["training"]
        parts.append(f"training step (batch 2, 512x512): {r['step_s']['transformers']:.2f} -> {r['step_s']['codetr']:.2f} s "
                     f"(x{r['codetr_over_transformers']:.2f}), codetr {100 * r['fraction_of_matmul_rate']['codetr']:.0f}% of "
                     "the matmul rate")
    protocol = (f"transformers {transformers.__version__} DeformableDetrForObjectDetection (R50, two-stage, box refinement, "
                f"300 queries) vs codetr with the same weights, one process, alternating, float32, {args.threads} threads, "
                f"warm-up {args.warmup}, median of {args.repeats}, outputs checked; matmul {rate / 1e9:.0f} GFLOP/s; "
                f"{allocator()}; {machine()}" + (f"; {args.note}" if args.note else ""))
    append_result("peers", protocol, "; ".join(parts))
    print("; ".join(parts))


if __name__ == "__main__":
    main()
