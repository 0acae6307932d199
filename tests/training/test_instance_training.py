"""``codetr train`` of the tiny Co-DINO-Inst (co_dino_inst_tiny) on the synthetic data with its exact masks,
fine-tuned from box-only Co-DINO weights: the mask branch starts afresh and the log says so, the mask losses
are logged, and the weights written hold the branch (the config reads the masks: ``data.with_masks``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from synthetic_config import synthetic_data

from codetr.cli import main
from codetr.config_parsing import load_config
from codetr.models.build import build_model

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.slow
def test_train_instance_tiny_from_box_only_weights(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    torch.manual_seed(0)
    boxes = build_model(load_config("co_dino_tiny").model).inference_state_dict()
    assert not any(k.startswith("mask_branch.") for k in boxes)
    save_file({k: v.contiguous() for k, v in boxes.items()}, str(tmp_path / "boxes.safetensors"))
    cfg = {"base": "co_dino_inst_tiny", "data": synthetic_data(tmp_path / "synth"),  # masks: the config asks for them
           "train": {"epochs": 1, "device": "cpu", "log_every": 1, "eval_every": 1, "max_iters": 2}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    out = tmp_path / "run"
    assert main(["train", str(tmp_path / "c.yaml"), "--out", str(out), "--init", str(tmp_path / "boxes.safetensors")]) == 0
    printed = capsys.readouterr().out
    assert "the mask branch starts afresh" in printed
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["type"] == "train"]
    assert [r["iter"] for r in train] == [1, 2]
    assert all({"mask.loss_mask", "mask.loss_mask_iou"} <= set(r["losses"]) for r in train)
    assert any(k.startswith("mask_branch.") for k in load_file(str(out / "model.safetensors")))
