"""Can a detector fit one fixed batch? The first check when a model does not learn.

Each config trains on the first batch of its validation loader (no augmentation), the same batch at
every iteration, with the optimizer, learning rate and gradient clipping of its config; the last
decoder layer's loss terms are recorded along the way. A correct detector drives them towards zero
within a few hundred iterations; one that stays on a plateau here has a bug, not a data problem.

    python bench/overfit.py dab_detr_tiny conditional_detr_tiny --iters 300
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import append_result, machine, write_json  # noqa: E402

from codetr.config_parsing import load_config  # noqa: E402
from codetr.data import build_dataloader  # noqa: E402
from codetr.models.build import build_model  # noqa: E402
from codetr.training.optim import build_optimizer  # noqa: E402

TERMS = ("loss_cls", "loss_bbox", "loss_giou")


def fit_one_batch(name: str, iters: int, every: int) -> list[dict[str, float]]:
    """Train config ``name`` on one batch for ``iters`` steps; its last-layer loss terms every ``every`` steps."""
    torch.manual_seed(0)
    cfg = load_config(name)
    batch = next(iter(build_dataloader(cfg.data, "val", shuffle=False, seed=0)))
    model = build_model(cfg.model).train()
    optimizer = build_optimizer(model, cfg.train)
    curve = []
    for step in range(1, iters + 1):
        losses = model.loss(batch)
        optimizer.zero_grad()
        sum(losses.values()).backward()
        if cfg.train.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        optimizer.step()
        if step == 1 or step % every == 0:
            curve.append({"iter": step, **{k: losses[k].item() for k in TERMS}})
            print(name, {k: round(v, 3) for k, v in curve[-1].items()}, flush=True)
    return curve


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("configs", nargs="+")
    parser.add_argument("--iters", type=int, default=300)
    parser.add_argument("--every", type=int, default=50, help="record the loss terms every N iterations")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "overfit")
    args = parser.parse_args()
    curves = {name: fit_one_batch(name, args.iters, args.every) for name in args.configs}
    write_json(args.out.with_suffix(".json"), {"iters": args.iters, "machine": machine(), "curves": curves})
    result = "; ".join(f"{name}: " + ", ".join(f"{k} {c[0][k]:.3f} -> {c[-1][k]:.3f}" for k in TERMS)
                       for name, c in curves.items())
    append_result("overfit", f"first validation batch of each config (no augmentation), {args.iters} iterations with "
                  f"the config's optimizer, lr and clipping, last decoder layer's weighted terms; {machine()}", result)


if __name__ == "__main__":
    main()
