"""Cost of collaborative training: training-step time and peak memory of Co- versus plain
Deformable-DETR, and inference latency of both, measured in one run.

Training: each (scale, variant) runs in its own subprocess so its peak memory (max RSS) is its
own; step = forward + backward + AdamW step on a batch of the built-in synthetic data, median of
N after warm-up. Inference: the plain and the Co- model hold the same shared weights (the Co-
model's auxiliary parts are extra), both in eval mode, run ``predict`` on the same validation
batch in one process, alternating which goes first, median of N after warm-up; their outputs
are checked to be identical.

    python bench/overhead.py --scales tiny r50 --warmup 3 --repeats 11
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import append_result, machine, timed_step, write_json  # noqa: E402

# scale -> (plain config, Co- config, overrides for both)
SCALES = {
    "tiny": ("deformable_detr_tiny", "co_deformable_detr_tiny", ["data.batch_size=4", "data.eval_batch_size=4"]),
    "r50": ("deformable_detr_r50_1x_coco", "co_deformable_detr_r50_1x_coco",
            ["model.backbone.weights=null", "model.num_classes=6", "data.synthetic=true",
             "data.train_images=data/synth/train", "data.train_annotations=data/synth/annotations/instances_train.json",
             "data.val_images=data/synth/val", "data.val_annotations=data/synth/annotations/instances_val.json",
             "data.train_scales=[512]", "data.max_size=512", "data.test_scale=512",
             "data.crop_resize_scales=[512]", "data.crop_size=[512,512]", "data.batch_size=1"]),
}


def measure_training(config: str, overrides: list[str], warmup: int, repeats: int, threads: int) -> dict:
    """Training-step time and peak RSS of one model; runs in a child process."""
    from codetr.config_parsing import load_config
    from codetr.data import build_dataloader
    from codetr.training.optim import build_optimizer
    from codetr.models.build import build_model

    torch.manual_seed(0)
    torch.set_num_threads(threads)
    cfg = load_config(config, [*overrides, "data.num_workers=0"])
    batch = next(iter(build_dataloader(cfg.data, "train", seed=0)))
    model = build_model(cfg.model)
    optimizer = build_optimizer(model, cfg.train)
    step_times = []
    for i in range(warmup + repeats):
        seconds = timed_step(model, optimizer, batch)
        if i >= warmup:
            step_times.append(seconds)
    return {"step_s": statistics.median(step_times),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "batch": int(batch.images.shape[0]), "image": list(batch.images.shape[-2:]),
            "params_m": sum(p.numel() for p in model.parameters()) / 1e6}


def measure_inference(scale: str, warmup: int, repeats: int) -> dict:
    """Eval-mode latency of the plain and the Co- model sharing weights, timed alternately.

    Returns ``{"plain": seconds, "co": seconds, "batch": B, "image": [H, W]}`` (medians).
    """
    from codetr.config_parsing import load_config
    from codetr.data import build_dataloader
    from codetr.models.build import build_model

    plain_name, co_name, overrides = SCALES[scale]
    torch.manual_seed(0)
    cfgs = {name: load_config(cfg, [*overrides, "data.num_workers=0"])
            for name, cfg in (("plain", plain_name), ("co", co_name))}
    batch = next(iter(build_dataloader(cfgs["plain"].data, "val", seed=0)))
    models = {name: build_model(cfg.model).eval() for name, cfg in cfgs.items()}
    _, unexpected = models["co"].load_state_dict(models["plain"].state_dict(), strict=False)
    if unexpected:
        raise RuntimeError(f"plain parameters absent from the Co- model: {unexpected}")
    times: dict[str, list[float]] = {"plain": [], "co": []}
    outputs = {}
    with torch.no_grad():
        for i in range(warmup + repeats):
            for name in ("plain", "co") if i % 2 == 0 else ("co", "plain"):
                start = time.perf_counter()
                outputs[name] = models[name].predict(batch)
                if i >= warmup:
                    times[name].append(time.perf_counter() - start)
    for plain_det, co_det in zip(outputs["plain"], outputs["co"], strict=True):
        for field in ("boxes", "scores", "labels"):
            if not torch.equal(getattr(plain_det, field), getattr(co_det, field)):
                raise RuntimeError(f"eval-mode {field} of the Co- model differ from the plain model's")
    return {"plain": statistics.median(times["plain"]), "co": statistics.median(times["co"]),
            "batch": int(batch.images.shape[0]), "image": list(batch.images.shape[-2:])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scales", nargs="+", default=["tiny", "r50"], choices=list(SCALES))
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("bench/results/overhead.json"))
    parser.add_argument("--child", nargs=2, metavar=("SCALE", "VARIANT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        scale, variant = args.child
        plain, co, overrides = SCALES[scale]
        print(json.dumps(measure_training(co if variant == "co" else plain, overrides, args.warmup, args.repeats,
                                          args.threads)))
        return
    torch.set_num_threads(args.threads)
    results: dict[str, dict] = {}
    for scale in args.scales:
        for variant in ("plain", "co"):
            out = subprocess.run([sys.executable, __file__, "--child", scale, variant, "--warmup", str(args.warmup),
                                  "--repeats", str(args.repeats), "--threads", str(args.threads)],
                                 check=True, capture_output=True, text=True)
            results.setdefault(scale, {})[variant] = json.loads(out.stdout.strip().splitlines()[-1])
            print(scale, variant, "training", results[scale][variant], flush=True)
        results[scale]["inference"] = measure_inference(scale, args.warmup, args.repeats)
        print(scale, "inference", results[scale]["inference"], flush=True)
    ratios = {scale: {"step": r["co"]["step_s"] / r["plain"]["step_s"],
                      "memory": r["co"]["peak_rss_mb"] / r["plain"]["peak_rss_mb"],
                      "inference": r["inference"]["co"] / r["inference"]["plain"]} for scale, r in results.items()}
    write_json(args.out, {"results": results, "co_over_plain": ratios})
    summary = "; ".join(
        f"{scale} (train batch {r['plain']['batch']} at {r['plain']['image']} px): step "
        f"{r['plain']['step_s']:.2f}s -> {r['co']['step_s']:.2f}s (x{ratios[scale]['step']:.2f}), "
        f"peak RSS {r['plain']['peak_rss_mb']:.0f} -> {r['co']['peak_rss_mb']:.0f} MB (x{ratios[scale]['memory']:.2f}); "
        f"inference (batch {r['inference']['batch']} at {r['inference']['image']} px) "
        f"{r['inference']['plain'] * 1000:.0f} -> {r['inference']['co'] * 1000:.0f} ms (x{ratios[scale]['inference']:.2f})"
        for scale, r in results.items())
    protocol = (f"float32, {args.threads} threads, warm-up {args.warmup}, median of {args.repeats}; training step "
                f"(forward+backward+AdamW) in one subprocess per model; inference of both models sharing weights "
                f"in one process, alternating order, outputs checked identical; {machine()}")
    append_result("overhead", protocol, summary)
    print(summary)


if __name__ == "__main__":
    main()
