"""``codetr predict``: detect objects in images (PyTorch weights or an ONNX model) and draw them."""

from __future__ import annotations

import argparse
from typing import Any

from codetr.cli.common import DEVICE_HELP, TTA_HELP, WEIGHTS_HELP, with_tta
from codetr.errors import UserError


def add_parser(commands: Any) -> None:
    p = commands.add_parser("predict", help="detect objects in images and draw them",
                            description="Run weights on an image or a folder of images.")
    p.add_argument("source", metavar="IMAGE_OR_DIR")
    model = p.add_mutually_exclusive_group(required=True)
    model.add_argument("--weights", help=WEIGHTS_HELP)
    model.add_argument("--onnx", help="an ONNX model written by `codetr export`, run with onnxruntime")
    p.add_argument("--out", required=True, help="folder for the drawn images and predictions.json")
    p.add_argument("--config", help="config to build the model (default: config.yaml next to the weights, "
                                    "else the one stored in them)")
    p.add_argument("--score-thr", type=float, default=0.3, help="minimum score (default 0.3)")
    p.add_argument("--device", default="auto", help=DEVICE_HELP + " (with --onnx: onnxruntime's CUDA or CPU provider)")
    p.add_argument("--tta", action="store_true", help=TTA_HELP)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from codetr.devices import resolve_device
    from codetr.inference.loading import load_model
    from codetr.inference.predict import check_prediction_outputs, list_images, predict_images

    images = list_images(args.source)
    check_prediction_outputs(images, args.out, args.score_thr)  # before loading the model
    if args.onnx:
        from codetr.export import OnnxDetector

        if args.config:
            raise UserError("--config applies to --weights; an ONNX model carries its own config")
        try:
            detector = OnnxDetector(args.onnx, device=args.device)
        except ValueError as err:  # not an ONNX model, or not one of `codetr export`
            raise UserError(str(err)) from err
    else:
        detector = load_model(args.weights, args.config, device=resolve_device(args.device))
    if args.tta:
        detector = with_tta(detector)
    records = predict_images(detector, images, args.out, args.score_thr)
    print(f"{len(records)} detections (score >= {args.score_thr}) in {len(images)} images; "
          f"drawings and predictions.json in {args.out}")
    return 0
