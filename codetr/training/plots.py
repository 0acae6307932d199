"""Training curves from ``metrics.jsonl``: loss terms and COCO AP."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

from codetr.errors import UserError
from codetr.inference.evaluate import SEGM_PREFIX

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after selecting the non-interactive backend)

AP_CURVES = ("AP", "AP50", "AP75")
SEGM_AP = SEGM_PREFIX + "AP"  # the mask AP of a model with masks


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl file (missing file: none).

    An unfinished last line (no newline: the write was cut by a kill) is left out; any other line
    that is not a JSON record with ``type`` and ``iter`` is a UserError naming the file and line.
    """
    path = Path(path)
    if not path.is_file():
        return []
    text = path.read_text(errors="replace")
    lines = text.split("\n")
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            if number == len(lines):  # unfinished last line
                continue
            raise UserError(f"{path} line {number} is not a JSON record ({err.msg}: {line[:60]!r}); "
                            "delete that line or the file") from None
        if not isinstance(record, dict) or not isinstance(record.get("iter"), int) or "type" not in record:
            raise UserError(f"{path} line {number} is not a metrics record (needs 'type' and an integer 'iter'): "
                            f"{line[:60]!r}; delete that line or the file")
        records.append(record)
    return records


def _is_final_layer_term(name: str) -> bool:
    """``loss_cls`` yes; ``d0.loss_cls`` (earlier decoder layers) and ``enc.loss_cls`` no."""
    return name.startswith("loss_")


def plot_training(metrics_file: str | Path, out_png: str | Path) -> None:
    """Write a PNG: total loss and final-layer loss terms against iteration (log scale), and
    AP / AP50 / AP75 against iteration (and the mask AP, dashed, when evaluated)."""
    records = read_metrics(metrics_file)
    train = [r for r in records if r.get("type") == "train"]
    evals = [r for r in records if r.get("type") == "eval"]
    fig, (ax_loss, ax_ap) = plt.subplots(1, 2, figsize=(11, 5), dpi=100)

    if train:
        iters = [r["iter"] for r in train]
        ax_loss.plot(iters, [r["loss"] for r in train], color="black", linewidth=2, label="total")
        terms = sorted({k for r in train for k in r.get("losses", {}) if _is_final_layer_term(k)})
        for term in terms:
            ax_loss.plot(iters, [r["losses"].get(term, float("nan")) for r in train], linewidth=1, label=term)
        ax_loss.set_yscale("log")
        ax_loss.legend(fontsize=7, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.14))
    ax_loss.set_xlabel("iteration")
    ax_loss.set_title("training loss")
    ax_loss.grid(alpha=0.3)

    if evals:
        iters = [r["iter"] for r in evals]
        for name in AP_CURVES:
            ax_ap.plot(iters, [r[name] for r in evals], marker="o", label=name)
        if any(SEGM_AP in r for r in evals):
            ax_ap.plot(iters, [r.get(SEGM_AP, float("nan")) for r in evals], marker="s", linestyle="--", label="mask AP")
        ax_ap.legend(fontsize=8, loc="upper left")
    ax_ap.set_xlabel("iteration")
    ax_ap.set_ylabel("COCO AP (%)" if any(SEGM_AP in r for r in evals) else "COCO box AP (%)")
    ax_ap.set_title("validation")
    ax_ap.grid(alpha=0.3)

    fig.tight_layout()
    Path(out_png).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png)
    plt.close(fig)
