"""Plain versus Co- tiny Deformable-DETR on the built-in synthetic dataset: AP versus iteration.

Both models are trained with the same seed, data, schedule and number of iterations; each is
evaluated (COCO box AP on the synthetic val split) at the same iterations. Writes JSON, a plot
of AP versus iteration and a row in bench/RESULTS.md.

    python bench/convergence.py --iters 480 --seeds 0 1
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from common import append_result, machine, write_json  # noqa: E402

from codetr.config import load_config  # noqa: E402
from codetr.engine import train  # noqa: E402

VARIANTS = {
    "plain": ("deformable_detr_tiny", []),
    "co": ("co_deformable_detr_tiny", []),
    # the paper's Table 9 ablation: auxiliary-head losses without positive queries, and positive
    # queries without auxiliary-head losses (lambda2 = 0: the heads only assign)
    "aux_only": ("co_deformable_detr_tiny", ["model.co.positive_queries=false"]),
    "queries_only": ("co_deformable_detr_tiny", ["model.co.lambda2=0"]),
}


def run(config: str, overrides: list[str], seed: int, iters: int, eval_every: int, out: Path) -> list[dict]:
    """Train one model; return its evaluations [{iter, AP, AP50, ...}]."""
    cfg = load_config(config, [*overrides, f"train.seed={seed}", f"train.max_iters={iters}",
                               f"train.eval_every={eval_every}"])
    train(cfg, out, resume=(out / "last.pt").exists())
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = {e["iter"]: e for e in lines if e.get("type") == "eval"}
    return [evals[k] for k in sorted(evals)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iters", type=int, default=480)
    parser.add_argument("--eval-every", type=int, default=5, help="epochs between evaluations")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--variants", nargs="+", default=["plain", "co"], help=f"from {list(VARIANTS)}")
    parser.add_argument("--out", type=Path, default=Path("bench/results/convergence"), help="JSON and plot")
    parser.add_argument("--work", type=Path, default=Path("runs/bench"), help="training runs (checkpoints)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results: dict[str, dict[int, list[dict]]] = {}
    for seed in args.seeds:
        for name in args.variants:
            config, overrides = VARIANTS[name]
            results.setdefault(name, {})[seed] = run(config, overrides, seed, args.iters, args.eval_every,
                                                     args.work / f"{name}_seed{seed}")
    final = {name: {seed: evals[-1]["AP"] for seed, evals in per_seed.items()} for name, per_seed in results.items()}
    write_json(args.out.with_suffix(".json"), {"iters": args.iters, "results": results, "final_AP": final})
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, per_seed in results.items():
        for seed, evals in per_seed.items():
            ax.plot([e["iter"] for e in evals], [e["AP"] for e in evals], marker="o",
                    linestyle="-" if name == "co" else "--", label=f"{name} seed {seed}")
    ax.set_xlabel("iteration")
    ax.set_ylabel("box AP (synthetic val)")
    ax.set_title("Co-Deformable-DETR vs Deformable-DETR (tiny, CPU)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(args.out.with_suffix(".png"), dpi=100)
    summary = "; ".join(f"seed {s}: " + ", ".join(f"{n} {final[n][s]:.1f}" for n in final) for s in args.seeds)
    if "plain" in final and "co" in final:
        summary += "; Co- minus plain: " + ", ".join(f"{final['co'][s] - final['plain'][s]:+.1f}" for s in args.seeds)
    protocol = (f"tiny configs, synthetic data, {args.iters} iterations, same seed/data/schedule per pair, "
                f"final COCO box AP on val, {args.threads} threads; {machine()}")
    append_result(Path(sys.argv[0]).stem, protocol, summary)
    print(summary)
    print(f"wrote {args.out.with_suffix('.json')} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
