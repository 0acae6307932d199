"""Soak test: a long tiny-model training run (the real ``codetr.training.run.train``: data loading,
hooks, checkpoints, evaluations) whose resident memory is sampled as it goes. Memory must stay
flat after the warm-up: a leak in the training loop, the hooks, the evaluation or the data
loading shows as a positive slope.

RSS is VmRSS of /proc/self/status (Linux), sampled before the first step and every ``--every``
iterations, then again after a garbage collection and glibc's ``malloc_trim(0)``, which returns the
allocator's free memory to the system (``rss_trimmed_mb``: the memory in use, without what malloc
keeps for reuse), with the number of Python objects the garbage collector tracks. The slope is the least-squares line through
the samples after ``--warmup`` iterations, in MB per 100 iterations; the verdict is on the trimmed
RSS (a leak), the raw slope is reported too. Writes bench/results/soak.json and a bench/RESULTS.md row.

    nice -n 10 python bench/soak.py --iters 300
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import append_result, machine, write_json  # noqa: E402

from codetr.config_parsing import load_config  # noqa: E402
from codetr.training.loop import Hook, Trainer  # noqa: E402
from codetr.training.run import train  # noqa: E402


def resident_mb() -> float:
    """This process' resident set size in MB (VmRSS)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status: the soak test needs Linux")


def malloc_trim() -> None:
    """Return glibc malloc's free memory to the system (no-op elsewhere)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class MemoryHook(Hook):
    """Records ``{"iter", "rss_mb", "rss_trimmed_mb", "python_objects", "seconds"}`` before the first
    step and every ``every`` iterations."""

    def __init__(self, every: int) -> None:
        self.every = every
        self.samples: list[dict[str, float]] = []
        self.iters_per_epoch = 0
        self._start = time.perf_counter()

    def before_train(self, trainer: Trainer) -> None:
        self.iters_per_epoch = len(trainer.sampler)
        self._sample(trainer)

    def after_step(self, trainer: Trainer) -> None:
        if trainer.iteration % self.every == 0:
            self._sample(trainer)

    def _sample(self, trainer: Trainer) -> None:
        rss = resident_mb()
        gc.collect()  # unreachable cycles are not in use either (and would blur the object count)
        malloc_trim()
        self.samples.append({"iter": trainer.iteration, "rss_mb": round(rss, 2), "rss_trimmed_mb": round(resident_mb(), 2),
                             "python_objects": len(gc.get_objects()),
                             "seconds": round(time.perf_counter() - self._start, 2)})


def slope_per_100(samples: list[dict[str, float]], key: str) -> float:
    """Least-squares slope of ``key`` against iteration, per 100 iterations."""
    iters = np.array([s["iter"] for s in samples], dtype=np.float64)
    values = np.array([s[key] for s in samples], dtype=np.float64)
    return float(np.polyfit(iters, values, 1)[0] * 100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="deformable_detr_tiny")
    parser.add_argument("--iters", type=int, default=300, help="training iterations (default 300)")
    parser.add_argument("--warmup", type=int, help="iterations left out of the slope (default: a fifth of --iters, "
                                                   "at least the first two evaluations)")
    parser.add_argument("--every", type=int, default=5, help="sample RSS every N iterations (default 5)")
    parser.add_argument("--eval-every", type=int, default=2, help="evaluate every N epochs (default 2)")
    parser.add_argument("--tolerance", type=float, default=2.0,
                        help="largest slope still called flat, MB per 100 iterations (default 2)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="bench/results/soak.json")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    # as many epochs as iterations: train.max_iters ends the run, not the config's schedule
    cfg = load_config(args.config, [f"train.max_iters={args.iters}", f"train.epochs={args.iters}",
                                    f"train.eval_every={args.eval_every}",
                                    "train.device=cpu", "train.log_every=50", *args.overrides])
    memory = MemoryHook(args.every)
    malloc_env = {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}  # glibc tunables change the raw RSS
    with tempfile.TemporaryDirectory() as run:
        metrics = train(cfg, run, extra_hooks=[memory])
    # the samples after a step are taken before that epoch's evaluation: the warm-up ends one sample after the second
    first_evals = 2 * args.eval_every * memory.iters_per_epoch + args.every
    warmup = args.warmup if args.warmup is not None else max(args.iters // 5, first_evals)
    after = [s for s in memory.samples if s["iter"] >= warmup]
    if len(after) < 3:
        raise SystemExit(f"only {len(after)} samples after the warm-up of {warmup} iterations: raise --iters")
    slope, raw_slope = slope_per_100(after, "rss_trimmed_mb"), slope_per_100(after, "rss_mb")
    late_slope = slope_per_100(after[len(after) // 2:], "rss_trimmed_mb")  # does the growth fade?
    objects_slope = slope_per_100(after, "python_objects")
    flat = abs(slope) <= args.tolerance
    summary: dict[str, Any] = {
        "config": args.config, "overrides": args.overrides, "iters": args.iters, "warmup": warmup,
        "every": args.every, "eval_every_epochs": args.eval_every, "threads": args.threads,
        "rss_start_mb": memory.samples[0]["rss_mb"], "rss_after_warmup_mb": after[0]["rss_mb"],
        "rss_end_mb": after[-1]["rss_mb"], "rss_max_after_warmup_mb": max(s["rss_mb"] for s in after),
        "trimmed_after_warmup_mb": after[0]["rss_trimmed_mb"], "trimmed_end_mb": after[-1]["rss_trimmed_mb"],
        "slope_mb_per_100_iters": round(slope, 3), "second_half_slope_mb_per_100_iters": round(late_slope, 3),
        "raw_slope_mb_per_100_iters": round(raw_slope, 3), "malloc_env": malloc_env,
        "python_objects_slope_per_100_iters": round(objects_slope, 1),
        "tolerance_mb_per_100_iters": args.tolerance, "flat": flat,
        "seconds": memory.samples[-1]["seconds"], "final_metrics": metrics, "samples": memory.samples,
    }
    write_json(args.out, summary)
    result = (f"in use (RSS after malloc_trim) {summary['trimmed_after_warmup_mb']:.0f} MB after the warm-up (iteration "
              f"{after[0]['iter']}), {summary['trimmed_end_mb']:.0f} MB at the end: slope {slope:+.2f} MB / 100 "
              f"iterations ({late_slope:+.2f} over the second half), {'flat' if flat else 'GROWING'} (tolerance "
              f"{args.tolerance:g}); Python objects "
              f"{objects_slope:+.0f} / 100 iterations; raw RSS {summary['rss_start_mb']:.0f} MB before the first step, "
              f"{summary['rss_after_warmup_mb']:.0f} after the warm-up, {summary['rss_end_mb']:.0f} at the end, slope "
              f"{raw_slope:+.2f} MB / 100 iterations; {summary['seconds']:.0f} s")
    data = (f"{cfg.data.synthetic_train} synthetic train images of {cfg.data.synthetic_size} px, batch "
            f"{cfg.data.batch_size}" if cfg.data.synthetic else f"{cfg.data.train_annotations}, batch {cfg.data.batch_size}")
    protocol = (f"{args.config} {' '.join(args.overrides)}".strip() + f", {data}, {args.iters} iterations, evaluation "
                f"every {args.eval_every} epochs ({cfg.data.synthetic_val if cfg.data.synthetic else '?'} val images), "
                f"last.pt every epoch, {args.threads} thread(s); VmRSS every {args.every} iterations, slope over "
                f"iterations >= {warmup}" + "".join(f"; {k}={v}" for k, v in malloc_env.items()) + f"; {machine()}")
    append_result("soak", protocol, result)
    print(result)


if __name__ == "__main__":
    main()
