"""The ``codetr`` command: train, eval, predict, export, bench, demo, data, convert."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import sys
import traceback
from pathlib import Path
from typing import Any

import yaml
from PIL import Image

from codetr import __version__
from codetr.config import CONFIG_DIR, load_config
from codetr.errors import UserError

DEMO_CONFIGS = ("co_deformable_detr_tiny", "deformable_detr_tiny")
DEMO_PREDICTION_IMAGES = 4
OVERRIDE_HELP = "config overrides, e.g. train.epochs=2 model.co.aux_heads=[atss]"
DEVICE_HELP = "auto (CUDA when available, else the CPU), cpu, cuda, cuda:N or mps"
TTA_HELP = ("test-time augmentation: every scale of data.tta.scales, also flipped (data.tta.flip), merged by "
            "data.tta.merge (nms, soft_nms or wbf)")


DEBUG_ENV = "CODETR_DEBUG"
# Errors the user can fix: printed in a few lines, exit code 2, no traceback (unless --debug / CODETR_DEBUG=1).
# OSError covers missing files, permissions, folders given as files, full disks and unreadable images.
USER_ERRORS = (UserError, OSError, yaml.YAMLError, Image.DecompressionBombError)
USER_ERROR_EXIT = 2
INTERRUPTED_EXIT = 130  # 128 + SIGINT, as shells report a run stopped by Ctrl-C


# ------------------------------------------------------------------------------ commands


def cmd_train(args: argparse.Namespace) -> int:
    from codetr.engine import train
    from codetr.engine.distributed import is_main_process
    from codetr.engine.trainer import TrainingInterrupted

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
        print(f"done: {Path(args.out) / 'model.safetensors'}  AP {metrics.get('AP', float('nan')):.2f}")
    return 0


def report_interruption(stop: Any, resume_command: str) -> int:
    """Print how a run stopped by a signal (a ``TrainingInterrupted``) resumes; returns the exit code
    (128 + the signal number, as shells report it)."""
    print(f"codetr: {stop}", file=sys.stderr)
    print(f"resume with: {resume_command}", file=sys.stderr)
    received = signal.Signals.__members__.get(stop.signal_name)  # None: a signal on another process
    return 128 + received.value if received is not None else INTERRUPTED_EXIT


def cmd_eval(args: argparse.Namespace) -> int:
    from codetr.engine import load_model
    from codetr.engine.checkpoint import check_writable_folder
    from codetr.engine.evaluator import evaluate_on_val
    from codetr.engine.predictor import resolve_device

    cfg = load_config(args.config, args.overrides)
    loaded = load_model(args.weights, args.config, args.overrides, resolve_device(args.device))
    out = check_writable_folder(args.out or Path(args.weights).parent, "--out" if args.out else "the folder of --weights")
    try:
        detect = _tta(loaded).detect if args.tta else None
        metrics = evaluate_on_val(loaded.model, cfg.data, loaded.category_ids, str(args.weights), detect)
    except ValueError as err:
        raise UserError(str(err)) from err
    path = out / ("metrics_tta.json" if args.tta else "metrics.json")
    path.write_text(json.dumps(metrics, indent=1) + "\n")
    print(f"wrote {path}")
    return 0


def _tta(detector: Any) -> Any:
    """``detector`` with test-time augmentation (``data.tta``); config errors as UserError."""
    from codetr.engine.tta import TTADetector

    try:
        return TTADetector(detector)
    except ValueError as err:
        raise UserError(str(err)) from err


def cmd_predict(args: argparse.Namespace) -> int:
    from codetr.engine import load_model, predict_images
    from codetr.engine.predictor import check_prediction_outputs, list_images, resolve_device

    images = list_images(args.source)
    check_prediction_outputs(images, args.out)  # before loading the model
    if args.onnx:
        from codetr.export import OnnxDetector

        if args.config:
            raise UserError("--config applies to --weights; an ONNX model carries its own config")
        detector = OnnxDetector(args.onnx, device=args.device)
    else:
        detector = load_model(args.weights, args.config, device=resolve_device(args.device))
    if args.tta:
        detector = _tta(detector)
    records = predict_images(detector, images, args.out, args.score_thr)
    print(f"{len(records)} detections (score >= {args.score_thr}) in {len(images)} images; "
          f"drawings and predictions.json in {args.out}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from codetr.engine import load_model
    from codetr.engine.predictor import resolve_device
    from codetr.export import export_onnx

    loaded = load_model(args.weights, args.config, args.overrides, resolve_device(args.device))
    try:
        path = export_onnx(loaded, args.out, args.opset, grid_sample=not args.no_grid_sample)
    except ValueError as err:
        raise UserError(str(err)) from err
    sampler = "gathers (no GridSample)" if args.no_grid_sample else "GridSample"
    print(f"wrote {path} (opset {args.opset}, deformable attention sampled with {sampler}); run it with "
          f"`codetr predict IMAGE_OR_DIR --onnx {path} --out DIR`")
    return 0


def default_demo_config() -> str:
    """The first packaged tiny config that exists."""
    for name in DEMO_CONFIGS:
        if (CONFIG_DIR / f"{name}.yaml").is_file():
            return name
    raise UserError(f"no demo config: none of {', '.join(DEMO_CONFIGS)} is packaged in {CONFIG_DIR}")


def cmd_demo(args: argparse.Namespace) -> int:
    from codetr.engine import load_model, predict_images, train
    from codetr.engine.predictor import list_images, resolve_device
    from codetr.engine.trainer import CHECKPOINT_NAME, METRICS_NAME, PLOT_NAME, WEIGHTS_NAME, TrainingInterrupted

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
    print(f"  weights           {out / WEIGHTS_NAME} (+ config.yaml, checkpoint {out / CHECKPOINT_NAME})")
    print(f"  predictions       {out / 'predictions'} ({len(records)} boxes with score >= {args.score_thr} "
          f"on {len(val_images)} val images, predictions.json)")
    return 0


def cmd_data_synth(args: argparse.Namespace) -> int:
    from codetr.data.synthetic import run_synth

    return run_synth(args)


def cmd_data_check(args: argparse.Namespace) -> int:
    from codetr.data.check import run_check

    return run_check(args)


def cmd_convert_hf(args: argparse.Namespace) -> int:
    from codetr.convert.hf_deformable_detr import run

    run(args)
    return 0


def cmd_convert_mmdet(args: argparse.Namespace) -> int:
    from codetr.convert.mmdet import CheckpointError, run

    try:
        run(args)
    except (CheckpointError, KeyError, TypeError, ValueError, yaml.YAMLError) as err:
        raise UserError(str(err)) from err
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from codetr.engine.benchmark import format_summary, parse_size, run_benchmark
    from codetr.engine.predictor import resolve_device

    record = run_benchmark(args.config, args.overrides, args.weights, parse_size(args.size) if args.size else None,
                           args.batch, args.threads, str(resolve_device(args.device)), args.compile, args.onnx,
                           args.iters, args.warmup, train=not args.no_train)
    if args.json == "-":
        print(json.dumps(record, indent=1))
        return 0
    print(format_summary(record))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(record, indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0


# -------------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="codetr", description="Co-DETR detectors in pure PyTorch: train, evaluate and run them.")
    parser.add_argument("--version", action="version", version=f"codetr {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    config_help = "config file, or the name of a packaged config (e.g. deformable_detr_tiny)"
    p = commands.add_parser("train", help="train a detector", description="Train a detector; outputs go to --out.")
    p.add_argument("config", help=config_help)
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=OVERRIDE_HELP)
    p.add_argument("--out", required=True, help="output folder (checkpoint, metrics, plot, weights)")
    start = p.add_mutually_exclusive_group()
    start.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    start.add_argument("--overwrite", action="store_true",
                       help="start a new run in OUT even though it holds another run's outputs (they are deleted)")
    p.add_argument("--init", help="start from these weights (.safetensors, e.g. converted official weights); "
                                  "class layers are re-initialised when the number of classes differs (train.init)")
    p.add_argument("--device", help=DEVICE_HELP + " (train.device; under torchrun each process takes its local GPU)")
    p.set_defaults(func=cmd_train)

    p = commands.add_parser("eval", help="COCO (or LVIS) box AP of weights on the validation set",
                            description="Evaluate weights on the config's validation data.")
    p.add_argument("config", help=config_help)
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=OVERRIDE_HELP)
    p.add_argument("--weights", required=True, help="model.safetensors or a training checkpoint (last.pt)")
    p.add_argument("--out", help="folder for metrics.json (default: the folder of --weights)")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--tta", action="store_true", help=TTA_HELP + "; writes metrics_tta.json")
    p.set_defaults(func=cmd_eval)

    p = commands.add_parser("predict", help="detect objects in images and draw them",
                            description="Run weights on an image or a folder of images.")
    p.add_argument("source", metavar="IMAGE_OR_DIR")
    model = p.add_mutually_exclusive_group(required=True)
    model.add_argument("--weights", help="model.safetensors or a training checkpoint (last.pt)")
    model.add_argument("--onnx", help="an ONNX model written by `codetr export`, run with onnxruntime")
    p.add_argument("--out", required=True, help="folder for the drawn images and predictions.json")
    p.add_argument("--config", help="config to build the model (default: config.yaml next to the weights, "
                                    "else the one stored in them)")
    p.add_argument("--score-thr", type=float, default=0.3, help="minimum score (default 0.3)")
    p.add_argument("--device", default="auto", help=DEVICE_HELP + " (with --onnx: onnxruntime's CUDA or CPU provider)")
    p.add_argument("--tta", action="store_true", help=TTA_HELP)
    p.set_defaults(func=cmd_predict)

    p = commands.add_parser("demo", help="synthetic data -> tiny training -> evaluation -> drawn predictions",
                            description="Train a tiny detector on the built-in synthetic data, evaluate it and "
                                        "draw its predictions on a few validation images.")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=OVERRIDE_HELP)
    p.add_argument("--config", help=f"default: the first packaged one of {', '.join(DEMO_CONFIGS)}")
    p.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    p.add_argument("--iters", type=int, help="stop after this many training iterations (shorter demo)")
    p.add_argument("--score-thr", type=float, default=0.3, help="minimum score of drawn boxes (default 0.3)")
    p.add_argument("--device", help=DEVICE_HELP)
    p.set_defaults(func=cmd_demo)

    p = commands.add_parser("data", help="dataset tools", description="Dataset tools.")
    data_commands = p.add_subparsers(dest="data_command", required=True, metavar="DATA_COMMAND")
    from codetr.data.synthetic import add_synth_arguments

    synth = data_commands.add_parser("synth", help="write the built-in synthetic COCO-format dataset",
                                     description="Write the synthetic COCO-format shapes dataset.")
    add_synth_arguments(synth)
    synth.set_defaults(func=cmd_data_synth)
    from codetr.data.check import add_check_arguments

    check = data_commands.add_parser("check", help="validate a COCO-format dataset (annotations and image files)",
                                     description="Check a COCO-format dataset: JSON structure and field types, ids, "
                                                 "duplicates, boxes, categories, image files present and decodable, "
                                                 "their sizes and EXIF orientation. Prints a report; exit code 2 when "
                                                 "it finds errors, 0 otherwise (warnings allowed).")
    add_check_arguments(check)
    check.set_defaults(func=cmd_data_check)

    p = commands.add_parser("convert", help="convert weights from other implementations",
                            description="Convert weights from other implementations to codetr safetensors.")
    convert_commands = p.add_subparsers(dest="convert_command", required=True, metavar="SOURCE_FORMAT")
    from codetr.convert.hf_deformable_detr import add_arguments as add_convert_arguments

    hf = convert_commands.add_parser("hf-deformable-detr", help="Hugging Face transformers Deformable-DETR",
                                     description="Convert a Hugging Face transformers Deformable-DETR model "
                                                 "folder to codetr safetensors.")
    add_convert_arguments(hf)
    hf.set_defaults(func=cmd_convert_hf)
    from codetr.convert.mmdet import add_arguments as add_mmdet_arguments

    mmdet = convert_commands.add_parser(
        "mmdet", help="official Co-DETR checkpoints (Sense-X/Co-DETR, mmdet)",
        description="Convert an official Co-DETR checkpoint (Co-Deformable-DETR or Co-DINO of the Sense-X/Co-DETR "
                    "release, Co-DINO of mmdetection 3.x; ResNet or Swin backbone) to codetr safetensors for the "
                    "config of its model-zoo row.")
    add_mmdet_arguments(mmdet)
    mmdet.set_defaults(func=cmd_convert_mmdet)

    from codetr.export.onnx import DEFAULT_OPSET

    p = commands.add_parser("export", help="export the inference graph to ONNX",
                            description="Export the inference graph (no auxiliary heads) to ONNX: normalised images "
                                        "(B, 3, H, W) and original sizes (B, 2) in, top-k xyxy boxes, scores and "
                                        "labels out; dynamic batch and image size.")
    p.add_argument("config", help=config_help)
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=OVERRIDE_HELP)
    p.add_argument("--weights", required=True, help="model.safetensors or a training checkpoint (last.pt)")
    p.add_argument("--out", required=True, help="the ONNX file to write, e.g. model.onnx")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET,
                   help=f"ONNX opset (default {DEFAULT_OPSET}, the first with GridSample; 14 or later with "
                        "--no-grid-sample)")
    p.add_argument("--no-grid-sample", action="store_true",
                   help="sample the deformable attention with gathers instead of GridSample (for runtimes without it)")
    p.add_argument("--device", default="cpu", help="the device the graph is traced on (default cpu): " + DEVICE_HELP)
    p.set_defaults(func=cmd_export)

    p = commands.add_parser("bench", help="inference latency, training-step time, FLOPs, fraction of the matmul rate",
                            description="Time a detector on synthetic inputs: inference latency (median, p90) and "
                                        "images/s, seconds per training step, FLOPs and parameters, and the machine's "
                                        "float32 matmul rate (each time also as a fraction of it). Random weights "
                                        "unless --weights.")
    p.add_argument("config", help=config_help)
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
    p.set_defaults(func=cmd_bench)
    return parser


def _add_debug_flag(parser: argparse.ArgumentParser, default: Any) -> None:
    """``--debug`` on ``parser`` and on every subcommand below it, so it may come anywhere."""
    parser.add_argument("--debug", action="store_true", default=default,
                        help=f"show the traceback of an error (also: environment variable {DEBUG_ENV}=1)")
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _add_debug_flag(sub, argparse.SUPPRESS)  # SUPPRESS: leaves the main parser's value alone


def report_error(err: BaseException, debug: bool) -> None:
    """``codetr: error: <message>`` on stderr, after the traceback when ``debug``."""
    if debug:
        traceback.print_exception(err)
    message = str(err) or type(err).__name__
    if isinstance(err, yaml.YAMLError):
        message = f"invalid YAML: {message}"
    print(f"codetr: error: {message}", file=sys.stderr)
    if not debug:
        print(f"(run with --debug or {DEBUG_ENV}=1 for the traceback)", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Run the command line ``argv`` (default: ``sys.argv[1:]``); returns the exit code: 0, 2 for an
    error the user can fix (a short message naming the culprit), 130 when interrupted."""
    parser = build_parser()
    _add_debug_flag(parser, False)
    args, extra = parser.parse_known_args(argv)
    if extra:
        # ``train CONFIG --out DIR a=b``: overrides after options are left over by argparse.
        if not hasattr(args, "overrides") or any("=" not in e or e.startswith("-") for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    debug = args.debug or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    try:
        return args.func(args)
    except USER_ERRORS as err:
        report_error(err, debug)
        return USER_ERROR_EXIT
    except KeyboardInterrupt:
        if debug:
            traceback.print_exc()
        print("codetr: interrupted", file=sys.stderr)
        return INTERRUPTED_EXIT


if __name__ == "__main__":
    raise SystemExit(main())
