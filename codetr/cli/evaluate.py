"""``codetr eval``: box AP of weights on the config's validation data."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from codetr.cli.common import CONFIG_HELP, DEVICE_HELP, OVERRIDE_HELP, TTA_HELP, WEIGHTS_HELP, with_tta
from codetr.config_parsing import load_config
from codetr.errors import UserError


def add_parser(commands: Any) -> None:
    p = commands.add_parser("eval", help="COCO (or LVIS) box AP of weights on the validation set",
                            description="Evaluate weights on the config's validation data.")
    p.add_argument("config", help=CONFIG_HELP)
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=OVERRIDE_HELP)
    p.add_argument("--weights", required=True, help=WEIGHTS_HELP)
    p.add_argument("--out", help="folder for metrics.json (default: the folder of --weights)")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--tta", action="store_true", help=TTA_HELP + "; writes metrics_tta.json")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from codetr.devices import resolve_device
    from codetr.files import atomic_write_text, check_writable_folder, remove_interrupted_writes, run_lock
    from codetr.inference.evaluate import evaluate_on_val
    from codetr.inference.loading import load_model

    cfg = load_config(args.config, args.overrides)
    loaded = load_model(args.weights, args.config, args.overrides, resolve_device(args.device))
    what = "--out" if args.out else "the folder of --weights"
    out = check_writable_folder(args.out or Path(args.weights).parent, what)
    with run_lock(out, what):  # not into the folder of a run training there
        remove_interrupted_writes(out, ["metrics.json", "metrics_tta.json"])
        try:
            detect = with_tta(loaded).detect if args.tta else None
            metrics = evaluate_on_val(loaded.model, cfg.data, loaded.category_ids, str(args.weights), detect)
        except ValueError as err:
            raise UserError(str(err)) from err
        path = out / ("metrics_tta.json" if args.tta else "metrics.json")
        atomic_write_text(path, json.dumps(metrics, indent=1) + "\n")
    print(f"wrote {path}")
    return 0
