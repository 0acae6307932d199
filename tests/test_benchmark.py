"""``codetr bench`` on the tiny Co-Deformable-DETR: the JSON record's fields and their arithmetic."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from codetr.benchmark import parse_size
from codetr.cli import main
from codetr.config_parsing import load_config
from codetr.errors import UserError
from codetr.models.build import build_model

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.slow
def test_bench_writes_the_record(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "bench.json"
    assert main(["bench", "co_deformable_detr_tiny", "model.num_classes=3", "--size", "96x128", "--batch", "2",
                 "--iters", "2", "--warmup", "0", "--threads", "1", "--json", str(out)]) == 0
    assert "training step: median" in capsys.readouterr().out
    record = json.loads(out.read_text())
    assert record["config"] == "co_deformable_detr_tiny" and record["size"] == [96, 128] and record["batch"] == 2
    assert record["threads"] == 1 and record["deform_attn"] in ("fused", "grid_sample")
    model = build_model(load_config("co_deformable_detr_tiny", ["model.num_classes=3"]).model)
    assert record["params"] == sum(p.numel() for p in model.parameters())
    assert record["matmul_gflops_per_s"] > 0.1 and record["inference_gflops_per_image"] > 0.01
    for key in ("inference", "training"):
        r = record[key]
        assert len(r["times_s"]) == 2 and r["median_s"] > 0 and r["p90_s"] == max(r["times_s"])
        assert r["images_per_s"] == pytest.approx(2 / r["median_s"])
        assert r["fraction_of_matmul_rate"] == pytest.approx(r["gflops_per_s"] / record["matmul_gflops_per_s"])
        assert 0 < r["fraction_of_matmul_rate"] < 1
    # a training step (forward + backward) costs more FLOPs than inference of the same batch
    assert record["training"]["gflops_per_step"] > 2 * 2 * record["inference_gflops_per_image"]


def test_size_argument() -> None:
    assert parse_size("800x1216") == (800, 1216) and parse_size("640") == (640, 640)
    for bad in ("800x", "axb", "16x16", "1x2x3"):
        with pytest.raises(UserError, match="HEIGHTxWIDTH"):
            parse_size(bad)
