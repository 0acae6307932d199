"""``codetr bench``: inference latency, training-step time, FLOPs and the fraction of the matmul rate."""

from __future__ import annotations

import argparse
import json
from typing import Any

from codetr.cli.common import CONFIG_HELP, OVERRIDE_HELP


def add_parser(commands: Any) -> None:
    p = commands.add_parser("bench", help="inference latency, training-step time, FLOPs, fraction of the matmul rate",
                            description="Time a detector on synthetic inputs: inference latency (median, p90) and "
                                        "images/s, seconds per training step, FLOPs and parameters, and the machine's "
                                        "float32 matmul rate (each time also as a fraction of it). Random weights "
                                        "unless --weights.")
    p.add_argument("config", help=CONFIG_HELP)
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=OVERRIDE_HELP)
    p.add_argument("--weights", help="model.safetensors or a training checkpoint (default: random weights)")
    p.add_argument("--size", help="input HEIGHTxWIDTH, e.g. 800x1216 (default: data.test_scale square)")
    p.add_argument("--batch", type=int, default=1, help="images per forward (default 1)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's default)")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:1, auto")
    p.add_argument("--compile", action="store_true", help="also time torch.compile'd inference")
    p.add_argument("--onnx", action="store_true", help="also time the ONNX export under onnxruntime")
    p.add_argument("--iters", type=int, default=10, help="timed runs after the warm-up (default 10)")
    p.add_argument("--warmup", type=int, default=2, help="untimed runs first (default 2)")
    p.add_argument("--no-train", action="store_true", help="skip the training step")
    p.add_argument("--json", help="write the record as JSON to this file ('-': print it instead of the summary)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from codetr.benchmark import format_summary, parse_size, run_benchmark
    from codetr.devices import resolve_device
    from codetr.files import atomic_write_text

    record = run_benchmark(args.config, args.overrides, args.weights, parse_size(args.size) if args.size else None,
                           args.batch, args.threads, str(resolve_device(args.device)), args.compile, args.onnx,
                           args.iters, args.warmup, train=not args.no_train)
    if args.json == "-":
        print(json.dumps(record, indent=1))
        return 0
    print(format_summary(record))
    if args.json:
        atomic_write_text(args.json, json.dumps(record, indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0
