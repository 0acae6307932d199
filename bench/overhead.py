"""Cost of collaborative training: training-step time and peak memory of Co- versus plain
Deformable-DETR, and inference latency of both, measured in one run.

Each (scale, variant) runs in its own subprocess so peak memory (max RSS on CPU, max allocated
on CUDA) is its own. Step = forward + backward + AdamW step on a batch of the built-in
synthetic data; inference = eval-mode ``predict``. Median of N after warm-up.

    python bench/overhead.py --scales tiny r50 --repeats 5
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
from common import append_result, machine, write_json  # noqa: E402

# scale -> (plain config, Co- config, overrides for both)
SCALES = {
    "tiny": ("deformable_detr_tiny", "co_deformable_detr_tiny", ["data.batch_size=4"]),
    "r50": ("deformable_detr_r50_1x_coco", "co_deformable_detr_r50_1x_coco",
            ["model.backbone.weights=null", "model.num_classes=6", "data.synthetic=true",
             "data.train_images=data/synth/train", "data.train_annotations=data/synth/annotations/instances_train.json",
             "data.val_images=data/synth/val", "data.val_annotations=data/synth/annotations/instances_val.json",
             "data.train_scales=[512]", "data.max_size=512", "data.test_scale=512",
             "data.crop_resize_scales=[512]", "data.crop_size=[512,512]", "data.batch_size=1"]),
}


def measure(config: str, overrides: list[str], warmup: int, repeats: int, threads: int) -> dict:
    """Runs in the child process."""
    from codetr.config import load_config
    from codetr.data import build_dataloader
    from codetr.engine.trainer import build_optimizer
    from codetr.models.build import build_model

    torch.manual_seed(0)
    torch.set_num_threads(threads)
    cfg = load_config(config, [*overrides, "data.num_workers=0"])
    batch = next(iter(build_dataloader(cfg.data, "train", seed=0)))
    model = build_model(cfg.model)
    optimizer = build_optimizer(model, cfg.train)
    step_times = []
    for i in range(warmup + repeats):
        start = time.perf_counter()
        loss = sum(model.loss(batch).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if i >= warmup:
            step_times.append(time.perf_counter() - start)
    train_peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    model.eval()
    infer_times = []
    with torch.no_grad():
        for i in range(warmup + repeats):
            start = time.perf_counter()
            model.predict(batch)
            if i >= warmup:
                infer_times.append(time.perf_counter() - start)
    return {"step_s": statistics.median(step_times), "infer_s": statistics.median(infer_times),
            "peak_rss_mb": train_peak_mb, "batch": int(batch.images.shape[0]),
            "image": list(batch.images.shape[-2:]), "params_m": sum(p.numel() for p in model.parameters()) / 1e6}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scales", nargs="+", default=["tiny", "r50"], choices=list(SCALES))
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("bench/results/overhead.json"))
    parser.add_argument("--child", nargs=2, metavar=("SCALE", "VARIANT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        scale, variant = args.child
        plain, co, overrides = SCALES[scale]
        print(json.dumps(measure(co if variant == "co" else plain, overrides, args.warmup, args.repeats,
                                 args.threads)))
        return
    results = {}
    for scale in args.scales:
        for variant in ("plain", "co"):
            out = subprocess.run([sys.executable, __file__, "--child", scale, variant, "--warmup", str(args.warmup),
                                  "--repeats", str(args.repeats), "--threads", str(args.threads)],
                                 check=True, capture_output=True, text=True)
            results.setdefault(scale, {})[variant] = json.loads(out.stdout.strip().splitlines()[-1])
            print(scale, variant, results[scale][variant], flush=True)
    ratios = {scale: {"step": r["co"]["step_s"] / r["plain"]["step_s"],
                      "memory": r["co"]["peak_rss_mb"] / r["plain"]["peak_rss_mb"],
                      "inference": r["co"]["infer_s"] / r["plain"]["infer_s"]} for scale, r in results.items()}
    write_json(args.out, {"results": results, "co_over_plain": ratios})
    summary = "; ".join(
        f"{scale} (batch {results[scale]['plain']['batch']}, {results[scale]['plain']['image']} px): step "
        f"{results[scale]['plain']['step_s']:.2f}s -> {results[scale]['co']['step_s']:.2f}s (x{ratio['step']:.2f}), "
        f"peak RSS x{ratio['memory']:.2f}, inference {results[scale]['plain']['infer_s'] * 1000:.0f} -> "
        f"{results[scale]['co']['infer_s'] * 1000:.0f} ms (x{ratio['inference']:.2f})"
        for scale, ratio in ratios.items())
    protocol = (f"float32, {args.threads} threads, warm-up {args.warmup}, median of {args.repeats}, "
                f"forward+backward+AdamW step, one subprocess per measurement; {machine()}")
    append_result("overhead", protocol, summary)
    print(summary)


if __name__ == "__main__":
    main()
