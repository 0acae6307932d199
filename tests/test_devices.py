"""``--device`` (train, eval, predict, demo, export), ``train.device`` and ``Detector(device=)``:
one resolver, with errors that say why a device cannot be used."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from codetr import Detector
from codetr.cli import build_parser, main
from codetr.devices import resolve_device
from codetr.errors import UserError
from codetr.export.runtime import onnx_providers


@pytest.fixture
def no_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """A machine without CUDA and MPS, whatever this one has."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)


@pytest.fixture
def two_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)


def test_resolver_without_gpu(no_gpu: None) -> None:
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    with pytest.raises(UserError, match=r"--device cuda: cuda requested but torch.cuda.is_available\(\) is False"):
        resolve_device("cuda")
    with pytest.raises(UserError, match=r"train.device cuda:1: cuda requested"):
        resolve_device("cuda:1", "train.device")
    with pytest.raises(UserError, match=r"mps requested but torch.backends.mps.is_available\(\) is False"):
        resolve_device("mps")
    with pytest.raises(UserError, match="'gpu' is not a device: use auto, cpu, cuda, cuda:N or mps"):
        resolve_device("gpu")
    with pytest.raises(UserError, match="unsupported device type 'meta'"):
        resolve_device("meta")


def test_resolver_with_two_gpus(two_gpus: None) -> None:
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device("cuda") == torch.device("cuda")
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(UserError, match=r"cuda:2: this machine has 2 CUDA device\(s\), cuda:0 to cuda:1"):
        resolve_device("cuda:2")


def test_onnx_providers(no_gpu: None) -> None:
    assert onnx_providers("auto") == onnx_providers("cpu") == ["CPUExecutionProvider"]
    with pytest.raises(UserError, match="cuda requested"):
        onnx_providers("cuda")


def test_every_command_takes_device() -> None:
    parser = build_parser()
    commands = {"train": ["train", "deformable_detr_tiny", "--out", "o"],
                "eval": ["eval", "deformable_detr_tiny", "--weights", "w"],
                "predict": ["predict", "i.png", "--weights", "w", "--out", "o"],
                "demo": ["demo"], "export": ["export", "deformable_detr_tiny", "--weights", "w", "--out", "m.onnx"]}
    for name, argv in commands.items():
        assert parser.parse_args([*argv, "--device", "cuda:1"]).device == "cuda:1", name
    defaults = {name: parser.parse_args(argv).device for name, argv in commands.items()}
    # train and demo: None keeps the config's train.device; export traces on the CPU unless asked
    assert defaults == {"train": None, "eval": "auto", "predict": "auto", "demo": None, "export": "cpu"}


def device_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """The message a command stops with: raised as a UserError, or printed by ``main``."""
    try:
        code = main(argv)
    except UserError as err:
        return str(err)
    assert code != 0
    return capsys.readouterr().err


def test_every_command_resolves_its_device_first(no_gpu: None, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """``--device cuda`` on a machine without CUDA stops every command with the resolver's error
    before it reads weights (which do not exist here) or data."""
    image = tmp_path / "i.png"
    Image.new("RGB", (8, 8)).save(image)
    missing = str(tmp_path / "missing.safetensors")
    runs = [["train", "deformable_detr_tiny", "--out", str(tmp_path / "t")],
            ["eval", "deformable_detr_tiny", "--weights", missing],
            ["predict", str(image), "--weights", missing, "--out", str(tmp_path / "p")],
            ["predict", str(image), "--onnx", missing, "--out", str(tmp_path / "p")],
            ["demo", "--out", str(tmp_path / "d")],
            ["export", "deformable_detr_tiny", "--weights", missing, "--out", str(tmp_path / "m.onnx")]]
    for argv in runs:
        assert "cuda requested but torch.cuda.is_available() is False" in device_error([*argv, "--device", "cuda"],
                                                                                       capsys), argv


def test_detector_device(no_gpu: None) -> None:
    assert Detector("deformable_detr_tiny", device="cpu").device == torch.device("cpu")
    with pytest.raises(UserError, match="cuda requested"):
        Detector("deformable_detr_tiny", device="cuda")
