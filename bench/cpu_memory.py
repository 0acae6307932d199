"""What the fused CPU kernel of the deformable attention saves in a whole training step: peak
memory (max RSS) and time of one Co-DINO R50 LSJ step at the 1024 canvas, batch 1, with the fused
kernel against the pure ``grid_sample`` path, with the released activation checkpointing of the
encoder (4 layers) and without it.

Each (sampler, checkpointing) runs in its own subprocess so its peak is its own: random weights,
one 1024 x 1024 image with three boxes, one forward + backward + AdamW step (the first: its time
includes one-time costs; the memory is what a training step needs, optimizer state included). The
memory of the built model before the step is reported too, so the step's own share is the difference.

    python bench/cpu_memory.py --threads 2 --checkpointing off released
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import append_result, machine, write_json  # noqa: E402

CONFIG = "co_dino_5scale_lsj_r50_1x_coco"
SAMPLERS = ("fused", "grid_sample")
CHECKPOINTING = {"released": [], "off": ["model.transformer.enc_with_cp=0"]}


def rss_mb() -> float:
    """Current resident memory of this process in MB."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize() / 2**20


def measure(sampler: str, overrides: list[str], threads: int) -> dict:
    """One training step; runs in a child process."""
    from codetr.config_parsing import load_config
    from codetr.data.batch import collate
    from codetr.models.build import build_model
    from codetr.ops.deform_attn import use_sampler
    from codetr.structures import Target
    from codetr.training.optim import build_optimizer

    torch.manual_seed(0)
    torch.set_num_threads(threads)
    cfg = load_config(CONFIG, ["model.backbone.weights=null", *overrides])
    model = build_model(cfg.model).train()
    optimizer = build_optimizer(model, cfg.train)
    size = cfg.data.lsj_size
    image = torch.randn(3, size, size, generator=torch.Generator().manual_seed(0))
    boxes = torch.tensor([[40.0, 60.0, 400.0, 500.0], [500.0, 300.0, 900.0, 1000.0], [100.0, 700.0, 300.0, 980.0]])
    batch = collate([(image, Target(boxes, torch.tensor([0, 5, 17])))])
    before = rss_mb()
    start = time.perf_counter()
    with use_sampler(sampler):
        loss = sum(model.loss(batch).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return {"before_first_step_mb": before, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "step_s": time.perf_counter() - start, "loss": float(loss)}


def describe(sampler: str, result: dict) -> str:
    if "exit_code" in result:
        return f"{sampler} did not finish (exit code {result['exit_code']}: out of memory)"
    return (f"{sampler} peak RSS {result['peak_rss_mb']:.0f} MB ({result['before_first_step_mb']:.0f} before the step), "
            f"step {result['step_s']:.0f} s, loss {result['loss']:.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--checkpointing", nargs="+", default=list(CHECKPOINTING), choices=list(CHECKPOINTING),
                        help="encoder activation checkpointing: as released (4 layers) and / or off")
    parser.add_argument("--out", type=Path, default=Path("bench/results/cpu_memory.json"))
    parser.add_argument("--child", nargs=2, metavar=("SAMPLER", "CHECKPOINTING"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        sampler, cp = args.child
        print(json.dumps(measure(sampler, CHECKPOINTING[cp], args.threads)))
        return
    results: dict[str, dict] = {}
    for cp in args.checkpointing:
        for sampler in SAMPLERS:
            out = subprocess.run([sys.executable, __file__, "--child", sampler, cp, "--threads", str(args.threads)],
                                 capture_output=True, text=True)
            # a child killed for memory (by the kernel or a watchdog) is a result too: it did not fit
            results.setdefault(cp, {})[sampler] = (json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0
                                                   else {"exit_code": out.returncode, "stderr": out.stderr[-500:]})
            print(cp, sampler, results[cp][sampler], flush=True)
    write_json(args.out, {"config": CONFIG, "results": results})
    summary = "; ".join(f"encoder checkpointing {cp}: " + ", ".join(describe(sampler, r[sampler]) for sampler in SAMPLERS)
                        for cp, r in results.items())
    protocol = (f"{CONFIG}, random weights, batch 1 at the 1024 x 1024 canvas, float32, {args.threads} threads, one "
                f"forward+backward+AdamW step, one subprocess per (checkpointing, sampler); {machine()}")
    append_result("cpu_memory", protocol, summary)
    print(summary)


if __name__ == "__main__":
    main()
