"""``codetr export``: the inference graph as ONNX."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from codetr.cli.common import CONFIG_HELP, DEVICE_HELP, OVERRIDE_HELP, WEIGHTS_HELP
from codetr.errors import UserError


def add_parser(commands: Any) -> None:
    from codetr.export.onnx import DEFAULT_OPSET

    p = commands.add_parser("export", help="export the inference graph to ONNX",
                            description="Export the inference graph (no auxiliary heads) to ONNX: normalised images "
                                        "(B, 3, H, W) and original sizes (B, 2) in, top-k xyxy boxes, scores and "
                                        "labels out; dynamic batch and image size.")
    p.add_argument("config", help=CONFIG_HELP)
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=OVERRIDE_HELP)
    p.add_argument("--weights", required=True, help=WEIGHTS_HELP)
    p.add_argument("--out", required=True, help="the ONNX file to write, e.g. model.onnx")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET,
                   help=f"ONNX opset (default {DEFAULT_OPSET}, the first with GridSample; 14 or later with "
                        "--no-grid-sample)")
    p.add_argument("--no-grid-sample", action="store_true",
                   help="sample the deformable attention with gathers instead of GridSample (for runtimes without it)")
    p.add_argument("--device", default="cpu", help="the device the graph is traced on (default cpu): " + DEVICE_HELP)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from codetr.devices import resolve_device
    from codetr.export import export_onnx
    from codetr.files import remove_interrupted_writes
    from codetr.inference.loading import load_model

    loaded = load_model(args.weights, args.config, args.overrides, resolve_device(args.device))
    remove_interrupted_writes(Path(args.out).parent, [Path(args.out).name])
    try:
        path = export_onnx(loaded, args.out, args.opset, grid_sample=not args.no_grid_sample)
    except ValueError as err:
        raise UserError(str(err)) from err
    sampler = "gathers (no GridSample)" if args.no_grid_sample else "GridSample"
    print(f"wrote {path} (opset {args.opset}, deformable attention sampled with {sampler}); run it with "
          f"`codetr predict IMAGE_OR_DIR --onnx {path} --out DIR`")
    return 0
