"""Fine-tuning from converted weights (``train.init`` / ``codetr train --init``): everything loads but
the class layers when the number of classes differs, and training runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file
from synthetic_config import synthetic_data

from codetr.cli import main
from codetr.config_parsing import load_config
from codetr.errors import UserError
from codetr.models.base import class_dependent_tensors
from codetr.models.build import build_model
from codetr.training.run import init_from_file

pytestmark = pytest.mark.usefixtures("one_thread")

CLASS_DEPENDENT = {"class_branches", "fc_cls", "fc_reg", "atss_cls"}


def tiny(num_classes: int, *overrides: str) -> torch.nn.Module:
    torch.manual_seed(num_classes)
    return build_model(load_config("co_deformable_detr_tiny", [f"model.num_classes={num_classes}", *overrides]).model)


def is_class_layer(name: str) -> bool:
    return any(part in name.split(".") for part in CLASS_DEPENDENT)


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    """Full weights of a 4-class tiny Co-DETR (as --keep-aux conversion writes them)."""
    state = {k: v.clone() for k, v in tiny(4).state_dict().items()}
    path = tmp_path_factory.mktemp("init") / "published.safetensors"
    save_file(state, str(path))
    return path, state


def test_another_class_count_reinitialises_only_the_class_layers(published: tuple[Path, dict]) -> None:
    path, state = published
    model = tiny(3)
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    report = "\n".join(init_from_file(model, path))
    reinit = {k for k, v in model.state_dict().items() if not torch.equal(v, state[k])}
    assert reinit == {k for k in fresh if is_class_layer(k)}  # the class branches, RoI fc_cls / fc_reg, ATSS classifier
    assert len(reinit) == 14 and all(k in class_dependent_tensors(model) for k in reinit)
    assert all(torch.equal(model.state_dict()[k], fresh[k]) for k in reinit)  # their fresh init, untouched
    assert f"re-initialised (the number of classes differs): {', '.join(sorted(reinit))}" in report
    assert "freshly initialised" not in report


def test_same_class_count_loads_everything(published: tuple[Path, dict]) -> None:
    path, state = published
    model = tiny(4)
    report = init_from_file(model, path)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert not any("re-initialised" in line for line in report)


def test_inference_weights_leave_the_training_parts_fresh(published: tuple[Path, dict], tmp_path: Path) -> None:
    _, state = published
    inference = {k: v for k, v in state.items() if not k.startswith(("adapter.", "aux_heads.", "positive_queries."))}
    save_file(inference, str(tmp_path / "inference.safetensors"))
    model = tiny(4)
    report = init_from_file(model, tmp_path / "inference.safetensors")
    assert any(line.startswith("not in the file, freshly initialised") and "adapter, aux_heads, positive_queries" in line
               for line in report)
    plain = tiny(4, "model.co.aux_heads=[]")  # a plain detector skips the file's training-only parts
    assert any("skipped (training-only parts" in line for line in init_from_file(plain, published[0]))


def test_other_mismatches_are_errors_naming_the_tensor_and_the_likely_cause(published: tuple[Path, dict]) -> None:
    with pytest.raises(UserError) as err:
        init_from_file(tiny(4, "model.transformer.ffn_dim=128"), published[0], load_config(
            "co_deformable_detr_tiny", ["model.transformer.ffn_dim=128"]).model)
    message = str(err.value)
    assert "(15 tensors of other shapes, 0 missing, 0 not in the model)" in message
    assert "decoder_layers.0.ffn.0.weight (file 256x64, model 128x64)" in message
    assert "likely cause: a size of 256 in the file where the model has 128" in message
    assert "(model.transformer.ffn_dim = 128 in the config)" in message
    assert len(message.splitlines()) <= 6  # a summary, not one line per tensor
    with pytest.raises(UserError, match=r"missing: decoder_layers.3.*\n.*likely cause: another number of "
                                        r"decoder_layers: 3 in the file, 4 in the model \(model.transformer.dec_layers\)"):
        init_from_file(tiny(4, "model.transformer.dec_layers=4"), published[0])


@pytest.mark.slow
def test_train_init_fine_tunes_on_another_class_count(published: tuple[Path, dict], tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    synth = tmp_path / "synth"
    cfg = {
        "base": "co_deformable_detr_tiny",
        "data": synthetic_data(synth),
        "train": {"epochs": 1, "device": "cpu", "log_every": 1, "eval_every": 1, "max_iters": 2},
    }
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    out = tmp_path / "run"
    assert main(["train", str(tmp_path / "c.yaml"), "--out", str(out), "--init", str(published[0])]) == 0
    printed = capsys.readouterr().out
    assert f"init from {published[0]}" in printed and "re-initialised (the number of classes differs)" in printed
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in records if r["type"] == "train"] == [1, 2]
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["init"] == str(published[0])
