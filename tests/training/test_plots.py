"""The training plot draws the mask AP beside the box AP when the evaluation has it."""

import json

from codetr.training import plots


def _figure_of(records, tmp_path, monkeypatch):
    """The figure plot_training draws for ``records`` (caught before it is closed)."""
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    drawn = []
    monkeypatch.setattr(plots.plt, "close", drawn.append)
    plots.plot_training(path, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").is_file()
    return drawn[0]


def test_mask_ap_is_drawn_only_when_evaluated(tmp_path, monkeypatch):
    boxes = {"AP": 10.0, "AP50": 20.0, "AP75": 5.0}
    evals = [{"type": "eval", "iter": i, **boxes, "segm_AP": 8.0 + i} for i in (10, 20)]
    ax = _figure_of(evals, tmp_path, monkeypatch).axes[1]
    assert ax.get_legend_handles_labels()[1] == ["AP", "AP50", "AP75", "mask AP"]
    assert list(ax.lines[-1].get_ydata()) == [18.0, 28.0] and ax.get_ylabel() == "COCO AP (%)"
    box_only = _figure_of([{"type": "eval", "iter": 10, **boxes}], tmp_path, monkeypatch).axes[1]
    assert box_only.get_legend_handles_labels()[1] == ["AP", "AP50", "AP75"]
    assert box_only.get_ylabel() == "COCO box AP (%)"
