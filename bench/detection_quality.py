"""Where the AP of plain and Co- runs differs: box localisation versus one-to-one scoring.

For each finished convergence run, on the first N held-out images, from the final decoder layer
of the DETR head (every query, no score threshold):

- box recall: fraction of ground-truth boxes with some predicted box at IoU > 0.5;
- best IoU: mean over ground-truth boxes of the highest IoU of any predicted box;
- right-class score: for each ground-truth box, the highest score of its class among predicted
  boxes at IoU > 0.5 (0 if none); the median, and the fraction above 0.3;
- duplicates: among the top-100 detections scored above 0.3, those with a same-class detection
  of higher score at IoU > 0.7 (what the one-to-one head should have suppressed);
- the final epoch's mean one-to-one classification loss (last decoder layer) from metrics.jsonl;
- the std of the backbone's C5 activations on the first batch (an unnormalised backbone's grow).

    python bench/detection_quality.py --epochs 8 --seeds 0 1 2 3

Writes JSON and a plot to bench/results/detection_quality.{json,png} and a row in RESULTS.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torchvision.ops import box_convert, box_iou  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from common import append_result, machine, write_json  # noqa: E402
from convergence import EPOCHS, LR, load_on_heldout, run_dir  # noqa: E402

from codetr.training.plots import read_metrics  # noqa: E402
from codetr.structures import Detections  # noqa: E402


def duplicates(boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor) -> int:
    """Detections (sorted by descending score) with a higher-scored same-class one at IoU > 0.7."""
    same = labels[:, None] == labels[None]
    higher = torch.ones_like(same).triu(1)  # [i, j]: i ranks above j
    return int(((box_iou(boxes, boxes) > 0.7) & same & higher).any(0).sum())


@torch.no_grad()
def quality(run: Path, heldout_root: Path, images: int) -> dict[str, float]:
    """The statistics above for one run directory."""
    loaded, loader = load_on_heldout(run, heldout_root)
    model = loaded.model
    best_iou, right_score, found, dup, kept, seen = [], [], 0, 0, 0, 0
    for batch in loader:
        if not seen:
            c5_std = float(getattr(model, "detector", model).backbone(batch.images)[-1].std())
        output, _ = model(batch.images, batch.masks)
        detections = [Detections(*d) for d in zip(*model.postprocess(output.logits[-1], output.boxes[-1],
                                                                     batch.image_sizes))]  # as predict()
        for b, (target, det) in enumerate(zip(batch.targets, detections)):
            h, w = batch.image_sizes[b].tolist()
            keep = det.scores > 0.3
            kept += int(keep.sum())
            dup += duplicates(det.boxes[keep], det.scores[keep], det.labels[keep])
            if not len(target.boxes):
                continue
            boxes = box_convert(output.boxes[-1, b], "cxcywh", "xyxy") * torch.tensor([w, h, w, h])
            iou = box_iou(target.boxes, boxes)  # (G, Q)
            scores = output.logits[-1, b].sigmoid()[:, target.labels].T  # (G, Q): each GT's class
            best_iou.append(iou.max(1).values)
            right_score.append((scores * (iou > 0.5)).max(1).values)
            found += int((iou > 0.5).any(1).sum())
        seen += len(batch.targets)
        if seen >= images:
            break
    ious, right = torch.cat(best_iou), torch.cat(right_score)
    steps = [r for r in read_metrics(run / "metrics.jsonl") if r.get("type") == "train"]
    final_epoch = [r["losses"]["loss_cls"] for r in steps if r["epoch"] == steps[-1]["epoch"]]
    return {"images": seen, "gt_boxes": len(ious), "box_recall": found / len(ious),
            "mean_best_iou": float(ious.mean()), "median_right_class_score": float(right.median()),
            "right_class_score_above_0.3": float((right > 0.3).float().mean()),
            "detections_above_0.3": kept, "duplicates": dup,
            "final_epoch_loss_cls": sum(final_epoch) / len(final_epoch), "c5_std": c5_std}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=EPOCHS, help="which convergence runs (<work>/<N>ep_lr<lr>)")
    parser.add_argument("--lr", type=float, default=LR, help="which convergence runs (their learning rate)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--variants", nargs="+", default=["plain", "co"])
    parser.add_argument("--images", type=int, default=200, help="held-out images to use")
    parser.add_argument("--work", type=Path, default=Path("runs/bench"))
    parser.add_argument("--heldout", type=int, default=500, help="size of the held-out split (its folder)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/detection_quality"))
    args = parser.parse_args()
    heldout_root = args.work / f"heldout{args.heldout}"
    runs = {name: {seed: run_dir(args.work, args.epochs, args.lr, name, seed) for seed in args.seeds}
            for name in args.variants}
    missing = [str(r) for per_seed in runs.values() for r in per_seed.values() if not (r / "model.safetensors").exists()]
    if missing or not heldout_root.exists():
        parser.error(f"run bench/convergence.py first: missing {missing or [str(heldout_root)]}")
    results = {name: {seed: quality(run, heldout_root, args.images) for seed, run in per_seed.items()}
               for name, per_seed in runs.items()}
    write_json(args.out.with_suffix(".json"), {"epochs": args.epochs, "lr": args.lr, "results": results})

    shown = [("mean_best_iou", "mean best IoU per GT box"), ("median_right_class_score", "median right-class score"),
             ("duplicates", "duplicates among detections > 0.3")]
    fig, axes = plt.subplots(1, len(shown), figsize=(11, 3.4))
    width = 0.8 / len(args.variants)
    for ax, (key, title) in zip(axes, shown):
        for k, name in enumerate(args.variants):
            ax.bar([i + k * width for i in range(len(args.seeds))], [results[name][s][key] for s in args.seeds],
                   width, label=name, color=f"C{k}")
        ax.set_xticks([i + width * (len(args.variants) - 1) / 2 for i in range(len(args.seeds))],
                      [f"seed {s}" for s in args.seeds])
        ax.set_title(title, fontsize="medium")
    axes[0].set_ylim(0.6, 0.8)
    axes[0].legend(fontsize="small")
    fig.suptitle(f"{args.epochs}-epoch tiny runs at lr {args.lr:g}, {args.images} held-out images, DETR head")
    fig.tight_layout()
    fig.savefig(args.out.with_suffix(".png"), dpi=100)
    plt.close(fig)

    summary = "; ".join(
        f"{name} seed {s}: box recall {m['box_recall']:.2f}, best IoU {m['mean_best_iou']:.3f}, right-class score "
        f"median {m['median_right_class_score']:.2f} (>0.3: {m['right_class_score_above_0.3']:.2f}), duplicates "
        f"{m['duplicates']}/{m['detections_above_0.3']}, last-epoch loss_cls {m['final_epoch_loss_cls']:.3f}, C5 std {m['c5_std']:.3g}"
        for s in args.seeds for name, per_seed in results.items() for m in [per_seed[s]])
    protocol = (f"final weights of the {args.epochs}-epoch lr {args.lr:g} convergence runs, first {args.images} held-out images, "
                f"DETR head's last decoder layer; {machine()}")
    append_result(Path(sys.argv[0]).stem, protocol, summary)
    print(summary.replace("; ", "\n"))
    print(f"wrote {args.out.with_suffix('.json')} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
