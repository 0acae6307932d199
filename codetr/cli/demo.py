"""``codetr demo``: synthetic data, a tiny training, its evaluation and drawn predictions."""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path
from typing import Any

from codetr.cli.common import DEVICE_HELP, OVERRIDE_HELP, report_interruption
from codetr.config_parsing import CONFIG_DIR, load_config
from codetr.errors import UserError
from codetr.files import CHECKPOINT_NAME, CONFIG_NAME, METRICS_NAME, PLOT_NAME, WEIGHTS_NAME

DEMO_CONFIGS = ("co_deformable_detr_tiny", "deformable_detr_tiny")
DEMO_PREDICTION_IMAGES = 4


def add_parser(commands: Any) -> None:
    p = commands.add_parser("demo", help="synthetic data -> tiny training -> evaluation -> drawn predictions",
                            description="Train a tiny detector on the built-in synthetic data, evaluate it and "
                                        "draw its predictions on a few validation images.")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=OVERRIDE_HELP)
    p.add_argument("--config", help=f"default: the first packaged one of {', '.join(DEMO_CONFIGS)}")
    p.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    p.add_argument("--iters", type=int, help="stop after this many training iterations (shorter demo)")
    p.add_argument("--score-thr", type=float, default=0.3, help="minimum score of drawn boxes (default 0.3)")
    p.add_argument("--device", help=DEVICE_HELP)
    p.set_defaults(func=run)


def default_demo_config() -> str:
    """The first packaged tiny config that exists."""
    for name in DEMO_CONFIGS:
        if (CONFIG_DIR / f"{name}.yaml").is_file():
            return name
    raise UserError(f"no demo config: none of {', '.join(DEMO_CONFIGS)} is packaged in {CONFIG_DIR}")


def run(args: argparse.Namespace) -> int:
    from codetr.devices import resolve_device
    from codetr.inference.loading import load_model
    from codetr.inference.predict import list_images, predict_images
    from codetr.training.run import train
    from codetr.training.signals import TrainingInterrupted

    name = args.config or default_demo_config()
    overrides = ["data.synthetic=true", *args.overrides]
    if args.iters is not None:
        overrides.append(f"train.max_iters={args.iters}")
    if args.device:
        overrides.append(f"train.device={args.device}")
    cfg = load_config(name, overrides)
    out = Path(args.out)
    resume = (out / CHECKPOINT_NAME).is_file()
    print(f"demo: config {name}, synthetic data in {Path(cfg.data.train_images).parent} (generated when missing), "
          f"output in {out}" + (" (continuing the run there; delete the folder to start over)" if resume else ""))
    try:
        metrics = train(cfg, out, resume=resume)
    except TrainingInterrupted as stop:
        again = ["codetr", "demo", *args.overrides, "--out", str(out)] + (["--config", args.config] if args.config else []) \
            + (["--iters", str(args.iters)] if args.iters is not None else [])
        return report_interruption(stop, shlex.join(again) + "  (the demo continues the run in its --out)")

    val_images = list_images(cfg.data.val_images)[:DEMO_PREDICTION_IMAGES]
    loaded = load_model(out / WEIGHTS_NAME, device=resolve_device(cfg.train.device))
    records = predict_images(loaded, val_images, out / "predictions", args.score_thr)
    print("\ndemo finished:")
    print(f"  validation AP {metrics.get('AP', float('nan')):.2f}  AP50 {metrics.get('AP50', float('nan')):.2f}")
    print(f"  training curves   {out / PLOT_NAME}")
    print(f"  metrics           {out / METRICS_NAME}")
    print(f"  weights           {out / WEIGHTS_NAME} (+ {CONFIG_NAME}, checkpoint {out / CHECKPOINT_NAME})")
    print(f"  predictions       {out / 'predictions'} ({len(records)} boxes with score >= {args.score_thr} "
          f"on {len(val_images)} val images, predictions.json)")
    return 0
