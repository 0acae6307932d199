"""Training cost of the Co- parts on the single-scale DETRs: time per training step of the plain
detector against its Co- versions with K = 1 (ATSS) and K = 2 (Faster R-CNN + ATSS), on the tiny
configs (Conditional DETR and DAB-DETR).

For each detector the three models run in one process on the same synthetic batch, a step (forward +
backward + AdamW step) of each in turn, rotating which goes first, so that a busy machine slows
all three alike; median of N after warm-up. Inference needs no row: a Co- model's eval path is the
plain detector (tests/models/test_single_scale.py checks identical detections).

    python bench/single_scale_cost.py --warmup 3 --repeats 11
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import append_result, machine, timed_step, write_json  # noqa: E402

DETECTORS = {
    "conditional_detr": ("conditional_detr_tiny", "co_conditional_detr_k1_tiny", "co_conditional_detr_tiny"),
    "dab_detr": ("dab_detr_tiny", "co_dab_detr_k1_tiny", "co_dab_detr_tiny"),
}
VARIANTS = ("plain", "k1", "k2")


def step_times(configs: tuple[str, ...], overrides: list[str], warmup: int, repeats: int) -> dict[str, list[float]]:
    """Seconds per training step of each config, steps interleaved; the first ``warmup`` rounds dropped."""
    from codetr.config_parsing import load_config
    from codetr.data import build_dataloader
    from codetr.models.build import build_model
    from codetr.training.optim import build_optimizer

    cfgs = [load_config(name, [*overrides, "data.num_workers=0"]) for name in configs]
    batch = next(iter(build_dataloader(cfgs[0].data, "train", seed=0)))
    runs = []
    for variant, cfg in zip(VARIANTS, cfgs, strict=True):
        torch.manual_seed(0)
        model = build_model(cfg.model)
        runs.append((variant, model, build_optimizer(model, cfg.train)))
    times: dict[str, list[float]] = {variant: [] for variant in VARIANTS}
    for i in range(warmup + repeats):
        for variant, model, optimizer in runs[i % 3:] + runs[: i % 3]:
            seconds = timed_step(model, optimizer, batch)
            if i >= warmup:
                times[variant].append(seconds)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--detectors", nargs="+", default=list(DETECTORS), choices=list(DETECTORS))
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--note", default="", help="added to the protocol (e.g. that the machine was not quiet)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/single_scale_cost.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    overrides = [f"data.batch_size={args.batch}"]
    results = {}
    for detector in args.detectors:
        times = step_times(DETECTORS[detector], overrides, args.warmup, args.repeats)
        medians = {variant: statistics.median(t) for variant, t in times.items()}
        results[detector] = {"configs": dict(zip(VARIANTS, DETECTORS[detector])), "median_step_s": medians,
                             "step_s": times, "over_plain": {v: medians[v] / medians["plain"] for v in VARIANTS}}
        print(detector, results[detector]["median_step_s"], flush=True)
    write_json(args.out, {"results": results})
    summary = "; ".join(
        f"{detector}: plain {r['median_step_s']['plain']:.2f}s, K=1 {r['median_step_s']['k1']:.2f}s "
        f"(x{r['over_plain']['k1']:.2f}), K=2 {r['median_step_s']['k2']:.2f}s (x{r['over_plain']['k2']:.2f})"
        for detector, r in results.items())
    protocol = (f"tiny configs (plain, co_*_k1_tiny, co_*_tiny), synthetic train batch of {args.batch}, float32, "
                f"{args.threads} threads, forward+backward+AdamW step, the three models interleaved in one process "
                f"(rotating order), warm-up {args.warmup}, median of {args.repeats}; {machine()}"
                + (f"; {args.note}" if args.note else ""))
    append_result("single_scale_cost", protocol, summary)
    print(summary)


if __name__ == "__main__":
    main()
