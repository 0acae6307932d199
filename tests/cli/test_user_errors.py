"""Errors the user can fix end ``codetr`` with a short message naming the culprit and exit code 2
(no traceback unless ``--debug`` / ``CODETR_DEBUG=1``); ``codetr predict`` never writes over its
inputs and goes on past unreadable images."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file as safetensors_tensors
from safetensors.torch import save_file

from codetr.cli import main
from codetr.cli.common import short_warnings
from codetr.config import Config, DataConfig, TrainConfig
from codetr.config_parsing import ConfigError, config_to_dict, load_config
from codetr.errors import UserError
from codetr.inference.weights import save_inference_weights
from codetr.models.build import build_model
from codetr.training.plots import read_metrics
from codetr.training.run import train
from full_disk import FullDisk

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = "deformable_detr_tiny"
SMALL = ["data.test_scale=32", "data.max_size=48"]  # fast inference on the test images


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    """Exit code and stderr of ``codetr argv``."""
    code = main(list(argv))
    return code, capsys.readouterr().err


def assert_short(err: str, *culprits: str, lines: int = 8) -> None:
    """A few lines, no traceback, naming every culprit."""
    assert "Traceback" not in err, err
    assert len(err.strip().splitlines()) <= lines, err
    for culprit in culprits:
        assert culprit in err, (culprit, err)


def tiny_weights(folder: Path, num_classes: int = 6) -> Path:
    """Random inference weights of the tiny Deformable-DETR with ``num_classes`` (config stored inside)."""
    cfg = load_config(TINY, [f"model.num_classes={num_classes}", *SMALL])
    torch.manual_seed(0)
    model = build_model(cfg.model)
    path = folder / f"tiny{num_classes}.safetensors"
    save_inference_weights(path, model.inference_state_dict(), [f"c{i}" for i in range(num_classes)],
                           list(range(1, num_classes + 1)), config_to_dict(cfg))
    return path


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_weights(tmp_path_factory.mktemp("weights"))


def write_images(folder: Path, count: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = folder / f"img{i}.png"
        Image.new("RGB", (40, 32), (30 * i, 90, 160)).save(path)
        paths.append(path)
    return paths


# ------------------------------------------------------------------------- files that are not weights


def test_random_bytes_as_safetensors_name_the_file_without_traceback(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    bad = tmp_path / "random.safetensors"
    bad.write_bytes(os.urandom(4096))
    image = write_images(tmp_path / "images", 1)[0]
    argv = ["predict", str(image), "--weights", str(bad), "--out", str(tmp_path / "out")]
    code, err = run(capsys, *argv)
    assert code == 2
    assert_short(err, f"{bad} is not a safetensors weights file", "--debug")
    code, err = run(capsys, "--debug", *argv)  # the traceback on demand
    assert code == 2 and "Traceback" in err and "random.safetensors" in err
    code, err = run(capsys, *argv[:1], "--debug", *argv[1:])  # --debug after the subcommand too
    assert code == 2 and "Traceback" in err
    monkeypatch.setenv("CODETR_DEBUG", "1")
    code, err = run(capsys, *argv)
    assert code == 2 and "Traceback" in err


def test_a_pt_that_is_not_a_checkpoint_names_the_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    plain = tmp_path / "state_dict.pt"
    torch.save({"layer.weight": torch.ones(2)}, plain)  # a bare state dict, not a codetr checkpoint
    code, err = run(capsys, "eval", TINY, "--weights", str(plain))
    assert code == 2
    assert_short(err, f"{plain} is not a codetr training checkpoint")
    mmdet = tmp_path / "official.pth"
    torch.save({"state_dict": {"w": torch.ones(1)}, "meta": {}}, mmdet)
    image = write_images(tmp_path / "images", 1)[0]
    code, err = run(capsys, "predict", str(image), "--weights", str(mmdet), "--out", str(tmp_path / "o"))
    assert code == 2
    assert_short(err, f"{mmdet} is not a codetr training checkpoint", "codetr convert mmdet")
    folder = tmp_path / "weights.safetensors"
    folder.mkdir()
    code, err = run(capsys, "eval", TINY, "--weights", str(folder))
    assert code == 2
    assert_short(err, f"{folder} is a folder, not a file")


def test_a_corrupt_metrics_line_names_the_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    good = json.dumps({"type": "train", "iter": 1, "loss": 1.0})
    path.write_text(f"{good}\n{{\"type\": \"train\", \"it\n{good}\n")
    with pytest.raises(UserError, match=rf"{path} line 2 is not a JSON record"):
        read_metrics(path)
    path.write_text(f"{good}\n[1, 2]\n")
    with pytest.raises(UserError, match=rf"{path} line 2 is not a metrics record"):
        read_metrics(path)
    path.write_text(f"{good}\n{good[:12]}")  # a last line cut by a kill: left out
    assert read_metrics(path) == [json.loads(good)]


# ------------------------------------------------------------------------------------- config values


@pytest.mark.parametrize("override, message", [
    ("train.epochs=abc", "config key train.epochs: 'abc' is not an integer"),
    ("train.lr=x", "config key train.lr: 'x' is not a number"),
    ("train.max_iters=-5", "config key train.max_iters: -5 is out of range (must be >= 1)"),
    ("train.epochs=0", "config key train.epochs: 0 is out of range (must be >= 1)"),
    ("data.batch_size=0", "config key data.batch_size: 0 is out of range (must be >= 1)"),
    ("train.lr=0", "config key train.lr: 0.0 is out of range (must be > 0)"),
    ("train.lr=-1e-4", "config key train.lr: -0.0001 is out of range (must be > 0)"),
    ("model.co.aux_heads=[atss, 3]", "config key model.co.aux_heads[1]: 3 is not a string"),
    ("train.max_iters=2.5", "config key train.max_iters: 2.5 is not an integer or null"),
    ("train.ema=maybe", "config key train.ema: 'maybe' is not true or false"),
    ("train.epoch=3", "unknown config key(s) ['epoch'] in train."),
    ("train.lr=[", "override 'train.lr=[': the value is not valid YAML"),
    ("model.loss.cls_weight=nan", "config key model.loss.cls_weight: 'nan' is not a number"),
    ("data.tta.iou=1.5", "config key data.tta.iou: 1.5 is out of range (must be a number in [0, 1])"),
    ("model.dino.soft_nms_iou=-1", "config key model.dino.soft_nms_iou: -1.0 is out of range (must be a number in [0, 1])"),
    ("model.loss.focal_alpha=.nan", "config key model.loss.focal_alpha: nan is not a number"),
    ("train.skip_nonfinite=-1", "config key train.skip_nonfinite: -1 is out of range (must be >= 0)"),
])
def test_bad_config_values_are_refused_when_read(override: str, message: str, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    code, err = run(capsys, "train", TINY, override, "--out", str(out))
    assert code == 2
    assert_short(err, message)
    assert not out.exists()  # refused before anything was written or trained


def test_training_checks_a_config_built_in_python(tmp_path: Path) -> None:
    cfg = Config(train=TrainConfig(max_iters=-5))
    with pytest.raises(ConfigError, match=r"config key train.max_iters: -5 is out of range \(must be >= 1\)"):
        train(cfg, tmp_path / "run")
    cfg = Config(data=DataConfig(batch_size="2"))  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="config key data.batch_size: '2' is not an integer"):
        train(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_a_config_file_with_a_yaml_error_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("base: deformable_detr_tiny\ntrain: {epochs: 2\n")
    code, err = run(capsys, "train", str(path), "--out", str(tmp_path / "run"))
    assert code == 2
    assert_short(err, f"{path}: not valid YAML (expected ',' or '}}', but got '<stream end>' at line 3, column 1)")


def test_a_config_whose_base_refers_back_to_itself_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "loop.yaml"
    path.write_text("base: loop.yaml\ntrain: {epochs: 2}\n")
    code, err = run(capsys, "train", str(path), "--out", str(tmp_path / "run"))
    assert code == 2
    assert_short(err, f"{path}: the base: chain refers back to a file already in it ({path} -> {path})", lines=2)
    other = tmp_path / "other.yaml"
    other.write_text("base: loop2.yaml\n")
    (tmp_path / "loop2.yaml").write_text("base: other.yaml\n")
    code, err = run(capsys, "train", str(other), "--out", str(tmp_path / "run"))
    assert code == 2
    assert_short(err, f"({other} -> {tmp_path / 'loop2.yaml'} -> {other})", lines=2)
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------ weights of other models


def test_weights_that_do_not_fit_give_a_short_diagnosis(weights: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    three = tiny_weights(tmp_path, num_classes=3)
    image = write_images(tmp_path / "images", 1)[0]
    code, err = run(capsys, "predict", str(image), "--weights", str(three), "--config", TINY, "--out", str(tmp_path / "o"))
    assert code == 2  # the class names stored with the weights tell first
    assert_short(err, f"{three} names 3 classes but model.num_classes is 6")
    bare = tmp_path / "bare.safetensors"  # the same tensors without metadata (e.g. converted elsewhere)
    save_file(safetensors_tensors(three), str(bare))
    code, err = run(capsys, "predict", str(image), "--weights", str(bare), "--config", TINY, "--out", str(tmp_path / "o"))
    assert code == 2
    assert_short(err, f"{bare} does not fit the model built from the config", "of other shapes",
                 "class_branches.0.weight (file 3x64, model 6x64)",
                 "likely cause: another number of classes: 3 in the file, model.num_classes 6 in the config")
    code, err = run(capsys, "eval", TINY, "model.transformer.d_model=32", "--weights", str(weights))
    assert code == 2
    assert_short(err, f"{weights} does not fit",
                 "likely cause: a size of 64 in the file where the model has 32",
                 "(model.transformer.d_model = 32 in the config)")


# ---------------------------------------------------------------------------------------- predict


def test_predict_refuses_to_write_over_its_inputs(weights: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "photos"
    images = write_images(folder, 2)
    before = {p: p.read_bytes() for p in images}
    code, err = run(capsys, "predict", str(folder), "--weights", str(weights), "--out", str(folder))
    assert code == 2
    assert_short(err, f"--out {folder}: writing the drawings there would overwrite 2 input image(s) (img0.png, img1.png)")
    code, err = run(capsys, "predict", str(images[0]), "--weights", str(weights), "--out", str(tmp_path / "." / "photos"))
    assert code == 2
    assert_short(err, "would overwrite 1 input image(s) (img0.png)")
    link = tmp_path / "link"
    link.symlink_to(folder)  # the same folder under another name
    code, err = run(capsys, "predict", str(folder), "--weights", str(weights), "--out", str(link))
    assert code == 2 and "would overwrite 2 input image(s)" in err
    assert {p: p.read_bytes() for p in images} == before
    assert sorted(p.name for p in folder.iterdir()) == ["img0.png", "img1.png"]  # no predictions.json either


@pytest.mark.parametrize("value", ["2", "-1", "nan"])
def test_predict_refuses_a_score_threshold_outside_0_1(value: str, weights: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    image = write_images(tmp_path / "images", 1)[0]
    out = tmp_path / "out"
    code, err = run(capsys, "predict", str(image), "--weights", str(weights), "--out", str(out), "--score-thr", value)
    assert code == 2
    assert_short(err, f"--score-thr: {float(value)!r} is out of range (must be a number in [0, 1])", lines=2)
    assert not out.exists()


def test_predict_goes_on_past_an_unreadable_image_and_counts_it(weights: Path, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "images"
    write_images(folder, 2)
    (folder / "broken.jpg").write_bytes(os.urandom(300))  # not an image
    out = tmp_path / "out"
    code, err = run(capsys, "predict", str(folder), "--weights", str(weights), "--out", str(out), "--score-thr", "0")
    assert code == 2
    assert_short(err, "skipped", "broken.jpg", "1 of 3 images could not be read (broken.jpg", f"are in {out}")
    assert sorted(p.name for p in out.glob("*.png")) == ["img0.png", "img1.png"]  # the others were drawn
    predictions = json.loads((out / "predictions.json").read_text())
    assert {p["file_name"] for p in predictions} == {"img0.png", "img1.png"}


# ------------------------------------------------------------------------------- output folders


def test_unwritable_output_folders_are_named_before_work_starts(weights: Path, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    out = blocker / "out"  # cannot be created: its parent is a file (root ignores permission bits)
    image = write_images(tmp_path / "images", 1)[0]
    code, err = run(capsys, "predict", str(image), "--weights", str(weights), "--out", str(out))
    assert code == 2
    assert_short(err, f"--out {out}: cannot write there")
    code, err = run(capsys, "eval", TINY, "--weights", str(weights), "--out", str(out))
    assert code == 2
    assert_short(err, f"--out {out}: cannot write there")
    code, err = run(capsys, "train", TINY, "--out", str(out))
    assert code == 2
    assert_short(err, f"--out {out}: cannot write there")


# ------------------------------------------------------------------ issue 35: one line, nothing half-written


def test_onnx_files_given_where_they_do_not_belong_get_one_line(weights: Path, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    image = write_images(tmp_path / "images", 1)[0]
    not_onnx = tmp_path / "model.onnx"
    not_onnx.write_bytes(b"not an ONNX model")
    code, err = run(capsys, "predict", str(image), "--onnx", str(not_onnx), "--out", str(tmp_path / "o"))
    assert code == 2
    assert_short(err, f"{not_onnx} is not a readable ONNX model", lines=2)
    code, err = run(capsys, "predict", str(image), "--weights", str(not_onnx), "--out", str(tmp_path / "o"))
    assert code == 2
    assert_short(err, f"{not_onnx} is an ONNX model: run it with --onnx", lines=2)
    assert "pickl" not in err.lower() and "torch.load" not in err


def test_unreadable_checkpoints_are_named_with_the_whole_reason(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    """torch's messages run over many lines of advice; the line saying what failed is kept whole."""
    random_bytes = tmp_path / "random.pt"
    random_bytes.write_bytes(b"\xff" * 3000)  # 255: not a pickle opcode (random bytes may start with one)
    truncated = tmp_path / "truncated.pt"
    torch.save({"model": torch.ones(100)}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:500])
    for path, reason in ((random_bytes, "(Unsupported operand "),
                         (truncated, "(PytorchStreamReader failed reading zip archive: failed finding central directory)")):
        code, err = run(capsys, "eval", TINY, "--weights", str(path))
        assert code == 2
        assert_short(err, f"{path} is not a codetr training checkpoint: torch.load cannot read it", reason, lines=2)
        assert err.splitlines()[0].endswith(")") and "weights_only" not in err


def test_data_warnings_are_one_line_without_python_source(weights: Path, tmp_path: Path,
                                                          recwarn: pytest.WarningsRecorder) -> None:
    """A data warning during `codetr eval` is shown by the command as one line: no file, line number
    or Python source (pytest records the warning; the command's formatting is applied to it)."""
    images = write_images(tmp_path / "val", 2)
    annotations = tmp_path / "val.json"
    annotations.write_text(json.dumps({
        "images": [{"id": i + 1, "file_name": p.name, "width": 40, "height": 32} for i, p in enumerate(images)],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [2, 2, 20, 20], "iscrowd": 0}],  # no area
        "categories": [{"id": i, "name": f"c{i - 1}"} for i in range(1, 7)]}))
    assert main(["eval", TINY, "--weights", str(weights), "--out", str(tmp_path / "o"), *SMALL, "data.synthetic=false",
                 f"data.val_images={tmp_path / 'val'}", f"data.val_annotations={annotations}"]) == 0
    [warned] = [w for w in recwarn if "without 'area'" in str(w.message)]
    with short_warnings():
        shown = warnings.formatwarning(warned.message, warned.category, warned.filename, warned.lineno, warned.line)
    assert shown == (f"codetr: warning: {annotations}: annotation without 'area' (evaluation uses the box area w*h): "
                     "1, e.g. annotation id 1 (image id 1)\n")
    with short_warnings():  # other libraries' warnings keep Python's form
        other = warnings.formatwarning(UserWarning("theirs"), UserWarning, torch.__file__, 1, None)
    assert other == warnings.formatwarning(UserWarning("theirs"), UserWarning, torch.__file__, 1, None)


def test_predict_says_it_leaves_sub_folders_out(weights: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "images"
    write_images(folder, 1)
    write_images(folder / "more", 1)
    code, err = run(capsys, "predict", str(folder), "--weights", str(weights), "--out", str(tmp_path / "o"))
    assert code == 0
    assert f"note: {folder} holds 1 sub-folder(s) (more); only the images directly in it are read" in err
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["img0.png", "predictions.json"]


def test_predict_on_a_full_disk_keeps_the_previous_outputs(weights: Path, tmp_path: Path, full_disk: FullDisk,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "images"
    write_images(folder, 2)
    out = full_disk.folder / "predictions"
    argv = ["predict", str(folder), "--weights", str(weights), "--out", str(out), "--score-thr", "0"]
    assert run(capsys, *argv)[0] == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert len(json.loads(before["predictions.json"])) > 0
    full_disk.fill(leave=len(before["img1.png"]) + len(before["predictions.json"]) // 2)
    code, err = run(capsys, *argv)
    assert code == 2
    assert_short(err, f"cannot write {out / 'predictions.json'}: no space left on device (the previous "
                      "predictions.json is unchanged)", lines=2)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # no temporary, nothing half-written
