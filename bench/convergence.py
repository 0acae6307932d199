"""Plain versus Co- tiny detectors (Deformable-DETR; DINO with --variants plain_dino co_dino; DAB-DETR with
plain_dab co_k1_dab co_dab, Conditional DETR likewise; the tiny Co-DINO-Inst's box and mask AP with co_dino_inst)
on the built-in synthetic dataset: AP versus iteration.

Both models are trained with the same seed, data, schedule and number of iterations; each is
evaluated (COCO box AP on a 64-image synthetic val split) after every epoch, and the final
weights once more on a larger held-out synthetic split (another generator seed, so no image is
shared with training or the 64-image split). Writes JSON, a plot of AP versus iteration and a
row in bench/RESULTS.md.

Protocol: 256 synthetic training images, batch 4, 8 epochs (512 iterations) with the learning
rate divided by 10 after epoch 7, like the paper's 12-epoch schedule: every image is seen only a
few times, so the comparison is about how fast each model learns, not how well it memorises.
Both models train at lr 2.5e-4, half the tiny configs' 5e-4 (``--lr`` changes it): over 6 seeds
the Co- minus plain difference had a std of 1.4 AP there against 3.6 at 5e-4 (README,
"Benchmarks"), and a comparison of one pair per seed needs the steadier setting.

    python bench/convergence.py --seeds 0 1 --jobs 2

Training runs go to runs/bench/<epochs>ep_lr<lr>/<variant>_seed<k> and are resumed when present.
"""

from __future__ import annotations

import argparse
import multiprocessing
import multiprocessing.synchronize
import signal
import statistics
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import scipy.stats  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from common import append_result, machine, write_json  # noqa: E402

from codetr.config_parsing import load_config  # noqa: E402
from codetr.data import build_dataloader, build_dataset, generate_synthetic_coco, synthetic_is_current  # noqa: E402
from codetr.inference.evaluate import evaluate  # noqa: E402
from codetr.inference.loading import LoadedModel, load_model  # noqa: E402
from codetr.training.plots import read_metrics  # noqa: E402
from codetr.training.run import train  # noqa: E402

EPOCHS, LR_STEP, LR, TRAIN_IMAGES, VAL_IMAGES = 8, 7, 2.5e-4, 256, 64
HELDOUT_SEED = 1  # generator seed of the held-out split (the training data use the config's)

VARIANTS = {
    "plain": ("deformable_detr_tiny", []),
    "co": ("co_deformable_detr_tiny", []),
    # the paper's Table 9 ablation: auxiliary-head losses without positive queries, and positive
    # queries without auxiliary-head losses (lambda2 = 0: the heads only assign)
    "aux_only": ("co_deformable_detr_tiny", ["model.co.positive_queries=false"]),
    "queries_only": ("co_deformable_detr_tiny", ["model.co.lambda2=0"]),
    # the official positive-query weight (the tiny config uses 0.25; the paper's Table 13 tries
    # lambda1 in {0.25, 0.5, 1, 2})
    "co_lambda1_1": ("co_deformable_detr_tiny", ["model.co.lambda1=1.0"]),
    # the official cap of a positive-query group (the tiny config caps at its 50 queries, like the
    # official 300 queries and cap 300)
    "co_cap300": ("co_deformable_detr_tiny", ["model.co.max_pos_queries=300"]),
    # the DINO pair: tiny DINO and tiny Co-DINO, differing only in the Co- parts
    "plain_dino": ("dino_tiny", []),
    "co_dino": ("co_dino_tiny", []),
    # the single-scale base detectors (issue 32; the paper's Table 2): plain, K = 1 (ATSS), K = 2 (ATSS + Faster R-CNN)
    "plain_dab": ("dab_detr_tiny", []),
    "co_k1_dab": ("co_dab_detr_k1_tiny", []),
    "co_dab": ("co_dab_detr_tiny", []),
    "plain_conditional": ("conditional_detr_tiny", []),
    "co_k1_conditional": ("co_conditional_detr_k1_tiny", []),
    "co_conditional": ("co_conditional_detr_tiny", []),
    # tiny Co-DINO-Inst on the synthetic instance masks (issue 31): box and mask AP
    "co_dino_inst": ("co_dino_inst_tiny", ["data.with_masks=true"]),
}
# Co- variants compared with a plain variant other than plain<name[2:]>
PLAIN_OF = {"co_k1_dab": "plain_dab", "co_k1_conditional": "plain_conditional"}
# K = 2 against K = 1 as well (the paper's Table 2 orders plain < K = 1 < K = 2)
K2_OVER_K1 = [("co_dab", "co_k1_dab"), ("co_conditional", "co_k1_conditional")]


def protocol_overrides(data_root: Path, epochs: int, lr: float, seed: int, lr_step: int = LR_STEP) -> list[str]:
    """The config overrides every benchmark run shares: data, schedule, evaluation, seed."""
    return [
        f"data.train_images={data_root / 'train'}", f"data.val_images={data_root / 'val'}",
        f"data.train_annotations={data_root / 'annotations/instances_train.json'}",
        f"data.val_annotations={data_root / 'annotations/instances_val.json'}",
        f"data.synthetic_train={TRAIN_IMAGES}", f"data.synthetic_val={VAL_IMAGES}",
        f"train.epochs={epochs}", f"train.lr={lr}", f"train.lr_steps=[{min(lr_step, epochs - 1)}]",
        "train.eval_every=1", f"train.seed={seed}",
    ]


def run_dir(work: Path, epochs: int, lr: float, variant: str, seed: int, lr_step: int = LR_STEP) -> Path:
    """Where one training of the protocol lives (its schedule and learning rate in the path)."""
    step = "" if lr_step == LR_STEP else f"_step{lr_step}"
    return work / f"{epochs}ep_lr{lr:g}{step}" / f"{variant}_seed{seed}"


def heldout_overrides(heldout_root: Path) -> list[str]:
    """Point the val split at the held-out data (already generated)."""
    return [f"data.val_images={heldout_root / 'val'}", "data.synthetic=false",
            f"data.val_annotations={heldout_root / 'annotations/instances_val.json'}"]


def load_on_heldout(run_dir: Path, heldout_root: Path) -> tuple[LoadedModel, DataLoader]:
    """A finished run's inference weights, with a loader over the held-out split."""
    loaded = load_model(run_dir / "model.safetensors", run_dir / "config.yaml", heldout_overrides(heldout_root))
    return loaded, build_dataloader(loaded.cfg.data, "val", shuffle=False)


def ensure_heldout(heldout_root: Path, count: int, size: int) -> None:
    """Generate the held-out split of ``size``-px images unless it is there with these settings."""
    ann = heldout_root / "annotations/instances_val.json"
    if not synthetic_is_current(ann, "val", count, size, HELDOUT_SEED):
        generate_synthetic_coco(heldout_root, 0, count, size, HELDOUT_SEED)


# Set by the parent when it stops (stop_workers); a worker's copy, given by ``share_stop``.
stop_requested: multiprocessing.synchronize.Event | None = None


def share_stop(event: multiprocessing.synchronize.Event) -> None:
    """Pool worker initializer: the parent's stop event."""
    global stop_requested
    stop_requested = event


def run(variant: str, seed: int, epochs: int, lr: float, data_root: Path, heldout_root: Path, out: Path,
        threads: int, lr_step: int = LR_STEP) -> tuple[list[dict], dict]:
    """Train one variant (resuming a finished or interrupted run).

    Returns its per-epoch evaluations [{iter, AP, ...}] and the metrics of its final weights on
    the held-out split.
    """
    if stop_requested is not None and stop_requested.is_set():  # queued before the stop
        raise RuntimeError(f"{variant} seed {seed}: not started, the benchmark was stopped")
    torch.set_num_threads(threads)
    config, overrides = VARIANTS[variant]
    cfg = load_config(config, [*overrides, *protocol_overrides(data_root, epochs, lr, seed, lr_step)])
    train(cfg, out, resume=(out / "last.pt").exists())
    evals = {e["iter"]: e for e in read_metrics(out / "metrics.jsonl") if e.get("type") == "eval"}
    final, loader = load_on_heldout(out, heldout_root)
    return [evals[k] for k in sorted(evals)], evaluate(final.model, loader.dataset, loader)


def stop_workers(pool: ProcessPoolExecutor, stop: multiprocessing.synchronize.Event) -> None:
    """On an error or a stop (Ctrl-C, SIGTERM): no queued training starts (those already handed to the pool
    see ``stop``), and the running ones stop after their current step with a checkpoint (SIGTERM is codetr's
    stop signal; a later run resumes them). No worker outlives the script: a pool worker whose parent is
    gone would go on with the queued runs."""
    stop.set()
    pool.shutdown(wait=False, cancel_futures=True)
    workers = multiprocessing.active_children()
    for worker in workers:
        worker.terminate()
    for worker in workers:
        worker.join(timeout=300)
        if worker.is_alive():
            worker.kill()


def paired_variants(names: list[str]) -> list[tuple[str, str]]:
    """(Co- variant, plain variant) pairs that differ only in the Co- parts: co<x> with plain<x> (or PLAIN_OF's);
    then (K = 2, K = 1) pairs of K2_OVER_K1."""
    plain_of = {name: PLAIN_OF.get(name, "plain" + name[2:]) for name in names if name.startswith("co")}
    pairs = [(co, plain) for co, plain in plain_of.items() if plain in names]
    return pairs + [(k2, k1) for k2, k1 in K2_OVER_K1 if k2 in names and k1 in names]


def paired_summary(diffs: list[float], target: float = 3.0, digits: int = 1) -> str:
    """Per-seed differences, then (from 3 seeds) their mean, std, 95% t-interval and how many reach ``target``."""
    text = ", ".join(f"{d:+.{digits}f}" for d in diffs)
    if len(diffs) >= 3:
        ci = scipy.stats.ttest_1samp(diffs, 0.0).confidence_interval(0.95)
        reached = sum(d >= target for d in diffs)
        text += (f" (mean {statistics.mean(diffs):+.{digits}f} +- {statistics.stdev(diffs):.{digits}f}, "
                 f"95% CI [{ci.low:+.{digits}f}, {ci.high:+.{digits}f}], >= {target:+.0f} on {reached} of {len(diffs)})")
    return text


def per_run(metrics: dict[str, dict[int, dict]], key: str) -> dict[str, dict[int, float]]:
    """``key`` of each run's metrics {variant: {seed: value}}, for the variants whose every run has it."""
    return {name: {seed: m[key] for seed, m in per_seed.items()} for name, per_seed in metrics.items()
            if all(key in m for m in per_seed.values())}


def plot(results: dict[str, dict[int, list[dict]]], heldout: dict[str, dict[int, float]], png: Path,
         title: str) -> None:
    """AP versus iteration: one colour per variant, one line style per seed; the final held-out
    AP of each run as a star just right of its last point."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    styles = ["-", "--", ":", "-."]
    for colour, (name, per_seed) in enumerate(results.items()):
        for k, (seed, evals) in enumerate(sorted(per_seed.items())):
            ax.plot([e["iter"] for e in evals], [e["AP"] for e in evals], marker="o", markersize=3,
                    color=f"C{colour}", linestyle=styles[k % len(styles)], label=f"{name} seed {seed}")
            ax.plot([evals[-1]["iter"] * 1.03], [heldout[name][seed]], marker="*", markersize=9,
                    color=f"C{colour}", markeredgecolor="black", markeredgewidth=0.5)
    ax.plot([], [], "*", color="gray", markeredgecolor="black", markeredgewidth=0.5, label="final, held-out split")
    ax.set_xlabel("iteration")
    ax.set_ylabel("box AP (synthetic val)")
    ax.set_title(title)
    ax.legend(loc="upper left", fontsize="small", ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=EPOCHS, help=f"{TRAIN_IMAGES // 4} iterations each")
    parser.add_argument("--lr", type=float, default=LR, help="learning rate of every run (the tiny configs': 5e-4)")
    parser.add_argument("--lr-step", type=int, default=LR_STEP,
                        help=f"epoch after which the lr drops /10 (default {LR_STEP}, at most --epochs - 1; the "
                        "single-scale DETRs' 30-epoch schedule: 25)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--variants", nargs="+", default=["plain", "co"], help=f"from {list(VARIANTS)}")
    parser.add_argument("--out", type=Path, help="JSON and plot (default: bench/results/convergence, "
                        "with an _<N>ep suffix for a non-default --epochs)")
    parser.add_argument("--work", type=Path, default=Path("runs/bench"),
                        help="data and training runs (in <N>ep_lr<lr>/<variant>_seed<k>)")
    parser.add_argument("--heldout", type=int, default=500, help="images of the held-out split for the final AP")
    parser.add_argument("--jobs", type=int, default=1, help="trainings run in parallel processes")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per training (default: cores / jobs)")
    parser.add_argument("--digits", type=int, default=1,
                        help="decimals of the APs in the RESULTS.md row (2 for models near AP 0, as the tiny single-scale DETRs)")
    args = parser.parse_args()
    unknown = sorted(set(args.variants) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    threads = args.threads or max(1, torch.get_num_threads() // args.jobs)
    if args.out is None:
        suffix = "" if args.epochs == EPOCHS else f"_{args.epochs}ep"
        args.out = Path(f"bench/results/convergence{suffix}")
    data_root = args.work / "synth"
    # generate the data once, before parallel trainings could race to write it
    plain_cfg = load_config(VARIANTS["plain"][0], protocol_overrides(data_root, args.epochs, args.lr, 0))
    data_cfg = plain_cfg.data
    if data_cfg.synthetic_seed == HELDOUT_SEED:
        parser.error(f"the training data use generator seed {HELDOUT_SEED}, the held-out split's: no longer held out")
    build_dataset(data_cfg, "train")
    heldout_root = args.work / f"heldout{args.heldout}"
    ensure_heldout(heldout_root, args.heldout, data_cfg.synthetic_size)
    runs = [(name, seed) for seed in args.seeds for name in args.variants]
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a stop runs stop_workers, as Ctrl-C does
    stop = multiprocessing.Event()
    with ProcessPoolExecutor(max_workers=args.jobs, initializer=share_stop, initargs=(stop,)) as pool:
        try:
            futures = {key: pool.submit(run, *key, args.epochs, args.lr, data_root, heldout_root,
                                        run_dir(args.work, args.epochs, args.lr, *key, args.lr_step), threads,
                                        args.lr_step) for key in runs}
            results: dict[str, dict[int, list[dict]]] = {}
            heldout: dict[str, dict[int, dict]] = {}
            for (name, seed), future in futures.items():
                results.setdefault(name, {})[seed], heldout.setdefault(name, {})[seed] = future.result()
        except BaseException:
            stop_workers(pool, stop)
            raise
    iters = results[args.variants[0]][args.seeds[0]][-1]["iter"]
    final = {name: {seed: evals[-1]["AP"] for seed, evals in per_seed.items()} for name, per_seed in results.items()}
    final_heldout = per_run(heldout, "AP")
    write_json(args.out.with_suffix(".json"), {"iters": iters, "epochs": args.epochs, "results": results,
                                               "final_AP": final, "heldout_images": args.heldout,
                                               "heldout": heldout, "final_heldout_AP": final_heldout})
    plot(results, final_heldout, args.out.with_suffix(".png"),
         f"{Path(sys.argv[0]).stem}: tiny configs, {args.epochs} epochs, lr {args.lr:g}, CPU")

    def describe(aps: dict[str, dict[int, float]]) -> str:
        text = "; ".join(f"seed {s}: " + ", ".join(f"{n} {aps[n][s]:.{args.digits}f}" for n in aps)
                         for s in args.seeds)
        for co, plain in paired_variants(list(aps)):
            text += f"; {co} minus {plain}: " + paired_summary([aps[co][s] - aps[plain][s] for s in args.seeds],
                                                               digits=args.digits)
        return text

    heldout_ap50 = per_run(heldout, "AP50")
    summary = (f"{VAL_IMAGES} val images: {describe(final)}. "
               f"{args.heldout} held-out images: {describe(final_heldout)}. "
               f"AP50, {args.heldout} held-out images: {describe(heldout_ap50)}")
    segm = per_run(heldout, "segm_AP")
    if segm:
        summary += f". Mask AP (segm), {args.heldout} held-out images: {describe(segm)}"
    backbone = plain_cfg.model.backbone
    protocol = (f"tiny configs ({backbone.name}, {backbone.norm}), {TRAIN_IMAGES} synthetic train images, batch 4, "
                f"{args.epochs} epochs = {iters} iterations at lr {args.lr:g} (/10 after epoch {min(args.lr_step, args.epochs - 1)}), "
                f"same seed/data/schedule per pair, final COCO box (and mask) AP on {VAL_IMAGES} val images and on "
                f"{args.heldout} held-out images (generator seed {HELDOUT_SEED}), {args.jobs} jobs x {threads} threads; {machine()}")
    append_result(Path(sys.argv[0]).stem, protocol, summary)
    print(summary)
    print(f"wrote {args.out.with_suffix('.json')} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
