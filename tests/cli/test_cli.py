"""Smoke tests of every ``codetr`` command through ``codetr.cli.main``, on the real tiny
Co-Deformable-DETR and a 64 px synthetic dataset."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from codetr import __version__
from codetr.cli import main
from synthetic_config import synthetic_data


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def config_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The packaged tiny Co-DETR config on a 64 px synthetic dataset (generated on first use)."""
    root = tmp_path_factory.mktemp("cli")
    synth = root / "synth"
    cfg = {
        "base": "co_deformable_detr_tiny",
        "data": synthetic_data(synth),
        "train": {"epochs": 1, "device": "cpu", "log_every": 1, "eval_every": 1},
    }
    path = root / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"codetr {__version__}"


def test_data_synth(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["data", "synth", "--out", str(tmp_path), "--train", "2", "--val", "1", "--size", "64"]) == 0
    data = json.loads((tmp_path / "annotations/instances_val.json").read_text())
    assert len(data["images"]) == 1 and len(list((tmp_path / "train").glob("*.png"))) == 2
    assert "val_annotations" in capsys.readouterr().out


def test_config_errors_are_reported_without_traceback(config_file: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", str(config_file), "train.nope=1", "--out", str(tmp_path)]) == 2
    assert "unknown config key(s) ['nope'] in train." in capsys.readouterr().err
    assert main(["train", "no_such_config", "--out", str(tmp_path)]) == 2
    assert "config 'no_such_config' not found" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", str(config_file), "--out", str(tmp_path), "--bogus"])


@pytest.mark.slow
def test_train_resume_eval_predict(config_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    # Overrides after the options are accepted too.
    assert main(["train", str(config_file), "--out", str(out), "train.max_iters=1"]) == 0
    assert json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["iter"] == 1
    assert main(["train", str(config_file), "--out", str(out)]) == 2  # would overwrite
    assert "pass --resume" in capsys.readouterr().err
    assert main(["train", str(config_file), "--out", str(out), "--resume"]) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in records if r["type"] == "train"] == [1, 2]
    assert any(k.endswith("_pos_atss") for k in records[-2]["losses"])  # the Co-DETR losses are logged
    assert (out / "model.safetensors").is_file() and (out / "training.png").is_file()
    capsys.readouterr()

    assert main(["eval", str(config_file), "--weights", str(out / "model.safetensors")]) == 0
    printed = capsys.readouterr().out
    assert printed.count("Average Precision") == 6 and printed.count("Average Recall") == 6
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) == {"AP", "AP50", "AP75", "APs", "APm", "APl"}
    assert metrics["AP"] == records[-1]["AP"]  # the same weights, the same numbers as in training
    assert main(["eval", str(config_file), "--weights", str(out / "last.pt"), "--out", str(tmp_path / "ev")]) == 0
    assert json.loads((tmp_path / "ev" / "metrics.json").read_text()) == metrics

    val_dir = config_file.parent / "synth" / "val"
    assert main(["predict", str(val_dir), "--weights", str(out / "model.safetensors"), "--out",
                 str(tmp_path / "pred"), "--score-thr", "0"]) == 0
    predictions = json.loads((tmp_path / "pred" / "predictions.json").read_text())
    assert {p["file_name"] for p in predictions} == {p.name for p in val_dir.glob("*.png")}
    assert all(1 <= p["category_id"] <= 6 and len(p["bbox"]) == 4 for p in predictions)
    assert sorted(p.name for p in (tmp_path / "pred").glob("*.png")) == sorted(p.name for p in val_dir.glob("*.png"))
    assert main(["predict", str(tmp_path / "missing.png"), "--weights", str(out / "model.safetensors"),
                 "--out", str(tmp_path / "pred")]) == 2


@pytest.mark.slow
def test_demo(config_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "demo"
    assert main(["demo", "--config", str(config_file), "--out", str(out), "--iters", "1", "--score-thr", "0"]) == 0
    printed = capsys.readouterr().out
    assert "demo finished" in printed and str(out / "training.png") in printed
    assert (out / "training.png").is_file() and (out / "model.safetensors").is_file()
    assert len(json.loads((out / "predictions" / "predictions.json").read_text())) > 0
    assert len(list((out / "predictions").glob("*.png"))) == 2  # the 2 val images (at most 4 are drawn)


@pytest.mark.slow
def test_convert_hf_deformable_detr_then_predict(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf_config = transformers.DeformableDetrConfig(
        backbone="resnet18", use_timm_backbone=True, use_pretrained_backbone=False, d_model=64,
        encoder_layers=1, decoder_layers=2, encoder_attention_heads=2, decoder_attention_heads=2,
        encoder_n_points=2, decoder_n_points=2, encoder_ffn_dim=64, decoder_ffn_dim=64, num_queries=10,
        two_stage_num_proposals=10, two_stage=True, with_box_refine=True,
        id2label={0: "N/A", 1: "person", 2: "bicycle"}, label2id={"N/A": 0, "person": 1, "bicycle": 2})
    # A model folder as on the hub, written by transformers itself (config.json + model.safetensors).
    transformers.DeformableDetrForObjectDetection(hf_config).save_pretrained(tmp_path / "hf")

    weights = tmp_path / "converted" / "model.safetensors"
    assert main(["convert", "hf-deformable-detr", str(tmp_path / "hf"), str(weights)]) == 0
    # A small test scale for speed, with the converted config as the base.
    (tmp_path / "converted" / "small.yaml").write_text("base: config.yaml\ndata: {test_scale: 64, max_size: 80}\n")
    image = tmp_path / "street.jpg"
    Image.new("RGB", (80, 64), (120, 90, 60)).save(image)
    assert main(["predict", str(image), "--weights", str(weights), "--config",
                 str(tmp_path / "converted" / "small.yaml"), "--out", str(tmp_path / "pred"), "--score-thr", "0"]) == 0
    predictions = json.loads((tmp_path / "pred" / "predictions.json").read_text())
    assert len(predictions) == 30  # top-100 (query, class) pairs of 10 queries x 3 classes, threshold 0
    assert {(p["category_id"], p["category_name"]) for p in predictions} <= {(0, "N/A"), (1, "person"), (2, "bicycle")}
