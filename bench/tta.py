"""Test-time augmentation against none on a tiny detector trained on the built-in synthetic data.

The model is one run of the convergence protocol (``bench/convergence.py``: 256 synthetic training
images, batch 4, 8 epochs = 512 iterations; the run is reused when it is there). Its final
weights are evaluated (COCO box AP) on the 64-image synthetic val split (and with --heldout N on an
N-image held-out split), without TTA and with each TTA setting: flip only, three scales, three scales and
flip merged by NMS (mmdet's TTA default), by Soft-NMS and, when ensemble-boxes is installed, by
weighted box fusion (without and with a score floor). Writes JSON and a row in bench/RESULTS.md.

    python bench/tta.py --variant co --seed 0

The scales are the config's test scale and 32 px either side (224, 256, 288 for the tiny configs,
whose data.max_size 384 lets each through on the square synthetic images).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import append_result, machine, write_json  # noqa: E402
from convergence import (  # noqa: E402
    EPOCHS,
    HELDOUT_SEED,
    LR,
    LR_STEP,
    TRAIN_IMAGES,
    VAL_IMAGES,
    VARIANTS,
    ensure_heldout,
    heldout_overrides,
    protocol_overrides,
    run_dir,
)

from codetr.config import TTAConfig  # noqa: E402
from codetr.config_parsing import load_config  # noqa: E402
from codetr.data import build_dataset  # noqa: E402
from codetr.inference.evaluate import evaluate_on_val  # noqa: E402
from codetr.inference.loading import load_model  # noqa: E402
from codetr.inference.tta import TTADetector  # noqa: E402
from codetr.training.run import train  # noqa: E402


def settings(scales: list[int]) -> dict[str, TTAConfig | None]:
    """The evaluated settings by name; None: no TTA."""
    multi = dict(scales=scales, flip=True)
    found = {"none": None, "flip": TTAConfig(flip=True), "scales": TTAConfig(scales=scales, flip=False),
             "scales+flip nms": TTAConfig(**multi, merge="nms", iou=0.5),
             "scales+flip soft_nms": TTAConfig(**multi, merge="soft_nms", iou=0.5)}
    if importlib.util.find_spec("ensemble_boxes") is not None:
        found["scales+flip wbf"] = TTAConfig(**multi, merge="wbf", iou=0.55)
        # the floor that did best among 0, 0.02, 0.05, 0.1, 0.2 on the val split of the co_dino seed-0
        # model (docs/evaluation.md); the held-out split checks it on other images
        found["scales+flip wbf min_score 0.2"] = TTAConfig(**multi, merge="wbf", iou=0.55, min_score=0.2)
    return found


def evaluate_settings(weights: Path, config: Path, overrides: list[str], tta: dict[str, TTAConfig | None],
                      split: str) -> dict[str, dict]:
    """Metrics and seconds per image of every setting on the val split the overrides point at."""
    loaded = load_model(weights, config, overrides)
    images = len(build_dataset(loaded.cfg.data, "val"))
    results = {}
    for name, setting in tta.items():
        detector = None if setting is None else TTADetector(loaded, setting)
        start = time.perf_counter()
        metrics = evaluate_on_val(loaded.model, loaded.cfg.data, loaded.category_ids, str(weights),
                                  None if detector is None else detector.detect)
        seconds = (time.perf_counter() - start) / images  # inference and evaluation
        results[name] = {"metrics": metrics, "seconds_per_image": round(seconds, 4),
                         "views": 1 if detector is None else len(detector.views)}
        print(f"{split} {name}: AP {metrics['AP']:.1f}, {seconds * 1000:.0f} ms/image", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", default="co", help=f"the trained model, from {list(VARIANTS)}")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=EPOCHS)
    parser.add_argument("--lr", type=float, default=LR)
    parser.add_argument("--work", type=Path, default=Path("runs/bench"),
                        help="data and training runs, shared with bench/convergence.py")
    parser.add_argument("--heldout", type=int, default=0,
                        help="also evaluate on a held-out split of this many images (bench/convergence.py uses 500)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--out", type=Path, default=Path("bench/results/tta.json"))
    args = parser.parse_args()
    if args.variant not in VARIANTS:
        parser.error(f"unknown variant {args.variant!r}; choose from {list(VARIANTS)}")
    torch.set_num_threads(args.threads)

    config_name, variant_overrides = VARIANTS[args.variant]
    data_root = args.work / "synth"
    cfg = load_config(config_name, [*variant_overrides, *protocol_overrides(data_root, args.epochs, args.lr, args.seed)])
    out = run_dir(args.work, args.epochs, args.lr, args.variant, args.seed)
    train(cfg, out, resume=(out / "last.pt").exists())  # returns at once for a finished run
    scale = cfg.data.test_scale
    tta = settings([scale - 32, scale, scale + 32])
    weights, config = out / "model.safetensors", out / "config.yaml"

    results = {"val": evaluate_settings(weights, config, [], tta, "val")}
    if args.heldout:
        heldout_root = args.work / f"heldout{args.heldout}"
        ensure_heldout(heldout_root, args.heldout, cfg.data.synthetic_size)
        results["heldout"] = evaluate_settings(weights, config, heldout_overrides(heldout_root), tta, "heldout")

    write_json(args.out, {"variant": args.variant, "seed": args.seed, "run": str(out),
                          "settings": {k: None if v is None else dataclasses.asdict(v) for k, v in tta.items()},
                          "results": results})
    summary = "; ".join(
        f"{split} ({VAL_IMAGES if split == 'val' else args.heldout} images): " + ", ".join(
            f"{name} {r['metrics']['AP']:.1f}" for name, r in per_setting.items())
        for split, per_setting in results.items())
    summary += "; ms/image: " + ", ".join(f"{n} {r['seconds_per_image'] * 1000:.0f}" for n, r in results["val"].items())
    protocol = (f"{config_name} ({args.variant}) seed {args.seed}, {TRAIN_IMAGES} synthetic train images, batch 4, "
                f"{args.epochs} epochs at lr {args.lr:g} (/10 after epoch {min(LR_STEP, args.epochs - 1)}); COCO box AP "
                f"without and with TTA (scales {[scale - 32, scale, scale + 32]}, max_size {cfg.data.max_size}), "
                f"val split" + (f" and held-out split (generator seed {HELDOUT_SEED})" if args.heldout else "")
                + f", {args.threads} threads; {machine()}")
    append_result(Path(sys.argv[0]).stem, protocol, summary)
    print(summary)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
