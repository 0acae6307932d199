"""What the fused CPU kernel of the deformable attention saves in a whole training step: peak
memory (max RSS) and time of one Co-DINO R50 LSJ step at the 1024 canvas, batch 1, with the fused
kernel against the pure ``grid_sample`` path, with the released activation checkpointing of the
encoder (4 layers) and without it; and with ``--knobs``, the effect of each memory knob of
docs/training.md on the fused, released-checkpointing step: bf16 autocast, all backbone stages
frozen, backbone checkpointing, the 768 canvas.

Each (sampler, checkpointing) runs in its own subprocess so its peak is its own: random weights,
one 1024 x 1024 image with three boxes, one forward + backward + AdamW step (the first: its time
includes one-time costs; the memory is what a training step needs, optimizer state included). The
memory of the built model before the step is reported too, so the step's own share is the difference.

    python bench/cpu_memory.py --threads 2 --checkpointing off released
    python bench/cpu_memory.py --threads 2 --checkpointing --knobs bf16 frozen_stages_4 backbone_cp lsj_768
"""

from __future__ import annotations

import argparse
import json
import os
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
# One knob each, on the fused kernel with the released checkpointing: config overrides.
KNOBS = {"bf16": ["train.amp=bf16"], "frozen_stages_4": ["model.backbone.frozen_stages=4"],
         "backbone_cp": ["model.backbone.with_cp=true"], "lsj_768": ["data.lsj_size=768"]}


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
    from codetr.training.amp import amp_dtype, keep_float32
    from codetr.training.optim import build_optimizer

    torch.manual_seed(0)
    torch.set_num_threads(threads)
    cfg = load_config(CONFIG, ["model.backbone.weights=null", *overrides])
    model = build_model(cfg.model).train()
    amp = amp_dtype(cfg.train.amp)
    if amp is not None:
        keep_float32(model)
    optimizer = build_optimizer(model, cfg.train)
    size = cfg.data.lsj_size
    image = torch.randn(3, size, size, generator=torch.Generator().manual_seed(0))
    boxes = torch.tensor([[40.0, 60.0, 400.0, 500.0], [500.0, 300.0, 900.0, 1000.0], [100.0, 700.0, 300.0, 980.0]])
    boxes = boxes * size / 1024
    batch = collate([(image, Target(boxes, torch.tensor([0, 5, 17])))])
    before = rss_mb()
    start = time.perf_counter()
    with use_sampler(sampler):
        with torch.autocast("cpu", dtype=amp, enabled=amp is not None):
            loss = sum(model.loss(batch).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return {"before_first_step_mb": before, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "step_s": time.perf_counter() - start, "loss": float(loss)}


def describe(name: str, result: dict) -> str:
    if "exit_code" in result:
        return f"{name} did not finish (exit code {result['exit_code']}: out of memory)"
    return (f"{name} peak RSS {result['peak_rss_mb']:.0f} MB ({result['before_first_step_mb']:.0f} before the step), "
            f"step {result['step_s']:.0f} s, loss {result['loss']:.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--checkpointing", nargs="*", default=list(CHECKPOINTING), choices=list(CHECKPOINTING),
                        help="encoder activation checkpointing: as released (4 layers) and / or off (none: skip)")
    parser.add_argument("--knobs", nargs="*", default=[], choices=list(KNOBS),
                        help="memory knobs, each alone on the fused kernel with the released checkpointing")
    parser.add_argument("--out", type=Path, default=Path("bench/results/cpu_memory.json"))
    parser.add_argument("--child", nargs="+", metavar="SAMPLER [OVERRIDE ...]", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child[0], args.child[1:], args.threads)))
        return
    runs = {f"encoder checkpointing {cp}, {sampler}": (sampler, CHECKPOINTING[cp])
            for cp in args.checkpointing for sampler in SAMPLERS}
    if args.knobs and "released" not in args.checkpointing:  # the knobs' baseline, in the same run
        runs["fused, no knob"] = ("fused", CHECKPOINTING["released"])
    runs |= {f"fused + {knob} ({' '.join(KNOBS[knob])})": ("fused", KNOBS[knob]) for knob in args.knobs}
    results: dict[str, dict] = {}
    for name, (sampler, overrides) in runs.items():
        out = subprocess.run([sys.executable, __file__, "--threads", str(args.threads), "--child", sampler, *overrides],
                             capture_output=True, text=True)
        # a child killed for memory (by the kernel or a watchdog) is a result too: it did not fit
        results[name] = (json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0
                         else {"exit_code": out.returncode, "stderr": out.stderr[-500:]})
        print(name, results[name], flush=True)
    write_json(args.out, {"config": CONFIG, "results": results})
    summary = "; ".join(describe(name, r) for name, r in results.items())
    allocator = f"MALLOC_MMAP_THRESHOLD_={os.environ['MALLOC_MMAP_THRESHOLD_']}, " if "MALLOC_MMAP_THRESHOLD_" in os.environ else ""
    protocol = (f"{allocator}{CONFIG}, random weights, batch 1 at the 1024 x 1024 canvas (768 for lsj_768), float32 unless "
                f"bf16, {args.threads} threads, one forward+backward+AdamW step, one subprocess per run; {machine()}")
    append_result("cpu_memory", protocol, summary)
    print(summary)


if __name__ == "__main__":
    main()
