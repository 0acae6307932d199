"""Cost of the mask branch (Co-DINO-Inst): training-step time and peak memory of co_dino_inst_tiny
against co_dino_tiny (the same model without the branch), and the inference latency of both.

Each variant trains in its own subprocess so its peak memory (max RSS) is its own: step = forward +
backward + AdamW step on one batch of the built-in synthetic data, median of N after warm-up. The
instance masks are the ellipses inscribed in the ground-truth boxes (the cost depends on the boxes,
through the sampled RoIs, not on the masks' content). Inference: both models in eval mode share the
box weights, run ``predict`` on one validation batch, alternating which goes first; the masked model's
boxes are checked equal to the box-only model's.

    python bench/mask_cost.py --warmup 3 --repeats 11
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

VARIANTS = {"boxes": "co_dino_tiny", "masks": "co_dino_inst_tiny"}
OVERRIDES = ["data.batch_size=4", "data.eval_batch_size=4", "data.num_workers=0"]


def with_ellipse_masks(batch):
    """``batch`` with each target's masks: the ellipse inscribed in each box, in the unpadded frame."""
    for target, (h, w) in zip(batch.targets, batch.image_sizes.tolist()):
        ys, xs = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")
        b = target.boxes
        cx, cy = (b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2
        rx, ry = ((b[:, 2] - b[:, 0]) / 2).clamp(min=0.5), ((b[:, 3] - b[:, 1]) / 2).clamp(min=0.5)
        target.masks = ((xs - cx[:, None, None]) / rx[:, None, None]) ** 2 + \
            ((ys - cy[:, None, None]) / ry[:, None, None]) ** 2 <= 1
    return batch


def measure_training(variant: str, warmup: int, repeats: int, threads: int) -> dict:
    from codetr.config_parsing import load_config
    from codetr.data import build_dataloader
    from codetr.models.build import build_model
    from codetr.training.optim import build_optimizer

    torch.manual_seed(0)
    torch.set_num_threads(threads)
    cfg = load_config(VARIANTS[variant], OVERRIDES)
    batch = with_ellipse_masks(next(iter(build_dataloader(cfg.data, "train", seed=0))))
    model = build_model(cfg.model)
    optimizer = build_optimizer(model, cfg.train)
    times = []
    for i in range(warmup + repeats):
        seconds = timed_step(model, optimizer, batch)
        if i >= warmup:
            times.append(seconds)
    return {"step_s": statistics.median(times), "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "batch": int(batch.images.shape[0]), "image": list(batch.images.shape[-2:]),
            "params_m": sum(p.numel() for p in model.parameters()) / 1e6}


def measure_inference(warmup: int, repeats: int) -> dict:
    from codetr.config_parsing import load_config
    from codetr.data import build_dataloader
    from codetr.models.build import build_model

    torch.manual_seed(0)
    cfgs = {name: load_config(config, OVERRIDES) for name, config in VARIANTS.items()}
    batch = next(iter(build_dataloader(cfgs["boxes"].data, "val", seed=0)))
    models = {name: build_model(cfg.model).eval() for name, cfg in cfgs.items()}
    models["masks"].load_state_dict(models["boxes"].state_dict(), strict=False)
    times: dict[str, list[float]] = {name: [] for name in models}
    outputs = {}
    with torch.no_grad():
        for i in range(warmup + repeats):
            for name in ("boxes", "masks") if i % 2 == 0 else ("masks", "boxes"):
                start = time.perf_counter()
                outputs[name] = models[name].predict(batch)
                if i >= warmup:
                    times[name].append(time.perf_counter() - start)
    for a, b in zip(outputs["boxes"], outputs["masks"], strict=True):
        if not (torch.equal(a.boxes, b.boxes) and torch.equal(a.scores, b.scores)):
            raise RuntimeError("the masked model's detections differ from the box-only model's")
    return {name: statistics.median(t) for name, t in times.items()} | {
        "batch": int(batch.images.shape[0]), "detections": sum(len(d.scores) for d in outputs["masks"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("bench/results/mask_cost.json"))
    parser.add_argument("--child", choices=list(VARIANTS), help=argparse.SUPPRESS)
    parser.add_argument("--note", default="", help="appended to the protocol (e.g. 'machine not quiet')")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure_training(args.child, args.warmup, args.repeats, args.threads)))
        return
    torch.set_num_threads(args.threads)
    training = {}
    for variant in VARIANTS:
        out = subprocess.run([sys.executable, __file__, "--child", variant, "--warmup", str(args.warmup),
                              "--repeats", str(args.repeats), "--threads", str(args.threads)],
                             check=True, capture_output=True, text=True)
        training[variant] = json.loads(out.stdout.strip().splitlines()[-1])
        print(variant, training[variant], flush=True)
    inference = measure_inference(args.warmup, args.repeats)
    print("inference", inference, flush=True)
    b, m = training["boxes"], training["masks"]
    ratios = {"step": m["step_s"] / b["step_s"], "memory": m["peak_rss_mb"] / b["peak_rss_mb"],
              "inference": inference["masks"] / inference["boxes"]}
    write_json(args.out, {"training": training, "inference": inference, "masks_over_boxes": ratios})
    summary = (f"co_dino_tiny -> co_dino_inst_tiny (train batch {b['batch']} at {b['image']} px): step "
               f"{b['step_s']:.2f}s -> {m['step_s']:.2f}s (x{ratios['step']:.2f}), peak RSS {b['peak_rss_mb']:.0f} -> "
               f"{m['peak_rss_mb']:.0f} MB (x{ratios['memory']:.2f}), params {b['params_m']:.2f}M -> {m['params_m']:.2f}M; "
               f"inference (batch {inference['batch']}, {inference['detections']} detections with masks) "
               f"{inference['boxes'] * 1000:.0f} -> {inference['masks'] * 1000:.0f} ms (x{ratios['inference']:.2f})")
    protocol = (f"float32, {args.threads} threads, warm-up {args.warmup}, median of {args.repeats}; training step "
                f"(forward+backward+AdamW) in one subprocess per model on one synthetic batch, masks = ellipses "
                f"inscribed in the boxes; inference of both models sharing the box weights, alternating order; "
                f"{machine()}{'; ' + args.note if args.note else ''}")
    append_result("mask_cost", protocol, summary)
    print(summary)


if __name__ == "__main__":
    main()
