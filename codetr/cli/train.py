"""``codetr train``: train a detector into an output folder."""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path
from typing import Any

from codetr.cli.common import CONFIG_HELP, DEVICE_HELP, OVERRIDE_HELP, report_interruption
from codetr.config_parsing import load_config
from codetr.files import WEIGHTS_NAME


def add_parser(commands: Any) -> None:
    p = commands.add_parser("train", help="train a detector", description="Train a detector; outputs go to --out.")
    p.add_argument("config", help=CONFIG_HELP)
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=OVERRIDE_HELP)
    p.add_argument("--out", required=True, help="output folder (checkpoint, metrics, plot, weights)")
    start = p.add_mutually_exclusive_group()
    start.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    start.add_argument("--overwrite", action="store_true",
                       help="start a new run in OUT even though it holds another run's outputs (they are deleted)")
    p.add_argument("--init", help="start from these weights (.safetensors, e.g. converted official weights); "
                                  "class layers are re-initialised when the number of classes differs (train.init)")
    p.add_argument("--device", help=DEVICE_HELP + " (train.device; under torchrun each process takes its local GPU)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from codetr.distributed import is_main_process
    from codetr.training.run import train
    from codetr.training.signals import TrainingInterrupted

    cfg = load_config(args.config, args.overrides)
    if args.init:
        cfg.train.init = args.init
    if args.device:
        cfg.train.device = args.device
    try:
        metrics = train(cfg, args.out, resume=args.resume, overwrite=args.overwrite)
    except TrainingInterrupted as stop:
        resume = shlex.join(["codetr", "train", args.config, *args.overrides, "--out", str(args.out), "--resume"])
        return report_interruption(stop, resume)
    if is_main_process():  # under torchrun, rank 0 evaluated and wrote
        print(f"done: {Path(args.out) / WEIGHTS_NAME}  AP {metrics.get('AP', float('nan')):.2f}")
    return 0
