"""The Python API (codetr.Detector): train from Python, save, load, predict every input kind,
the same detections and metrics as the ``codetr`` commands, clear errors."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from codetr import Detector, Prediction
from codetr.api import override_key
from codetr.cli import main
from codetr.errors import UserError
from synthetic_config import synthetic_data

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def config_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The packaged tiny Co-DETR config on a 64 px synthetic dataset (generated on first use)."""
    root = tmp_path_factory.mktemp("api")
    synth = root / "synth"
    cfg = {
        "base": "co_deformable_detr_tiny",
        "data": synthetic_data(synth),
        "train": {"epochs": 1, "log_every": 1, "eval_every": 1},
    }
    path = root / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def run(config_file: Path) -> tuple[Path, dict[str, float]]:
    """A Detector trained 3 steps from Python: the run folder and the returned metrics."""
    det = Detector(config_file, device="cpu")
    out = config_file.parent / "run"
    metrics = det.train(out=out, epochs=2, max_iters=3, **{"train.lr": 1e-4})
    assert det.source == out / "model.safetensors"  # the detector now holds the trained weights
    return out, metrics


def val_images(config_file: Path) -> list[Path]:
    return sorted((config_file.parent / "synth" / "val").glob("*.png"))


@pytest.mark.slow
def test_train_applies_overrides_and_writes_a_run(run: tuple[Path, dict[str, float]]) -> None:
    out, metrics = run
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["train"]["max_iters"] == 3 and saved["train"]["lr"] == 1e-4 and saved["train"]["device"] == "cpu"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in records if r["type"] == "train"] == [1, 2, 3]
    assert metrics["AP"] == records[-1]["AP"]
    assert (out / "model.safetensors").is_file() and (out / "last.pt").is_file()


def test_override_keys() -> None:
    assert override_key("epochs") == "train.epochs"
    assert override_key("batch_size") == "data.batch_size"
    assert override_key("lambda1") == "model.co.lambda1"
    assert override_key("model.co.lambda1") == "model.co.lambda1"
    assert override_key("weights") == "model.backbone.weights"
    with pytest.raises(KeyError, match="'lr' is ambiguous: a.lr, b.lr; pass the dotted key"):
        override_key("lr", ["a.lr", "b.lr", "b.lr_steps"])
    with pytest.raises(KeyError, match="'nope' names no config field"):
        override_key("nope")


def test_predict_and_evaluate_match_the_cli(run: tuple[Path, dict[str, float]], config_file: Path, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    out, metrics = run
    det = Detector.from_pretrained(out, device="cpu")
    images = val_images(config_file)
    results = det.predict(config_file.parent / "synth" / "val", score_thr=0.0)
    assert [r.path for r in results] == images

    assert main(["predict", str(images[0].parent), "--weights", str(out / "model.safetensors"), "--out",
                 str(tmp_path / "pred"), "--score-thr", "0"]) == 0
    cli = json.loads((tmp_path / "pred" / "predictions.json").read_text())
    api = [{"file_name": r.path.name, "category_id": det.category_ids[label], "category_name": name,
            "bbox": [round(x1, 3), round(y1, 3), round(x2 - x1, 3), round(y2 - y1, 3)], "score": round(score, 5)}
           for r in results
           for (x1, y1, x2, y2), score, label, name in zip(r.boxes.tolist(), r.scores.tolist(), r.labels.tolist(),
                                                           r.names)]
    assert len(api) == len(cli) == 2 * 100  # max_detections per image, no threshold
    for a, c in zip(api, cli):
        assert {k: a[k] for k in ("file_name", "category_id", "category_name", "score")} == \
               {k: c[k] for k in ("file_name", "category_id", "category_name", "score")}
        np.testing.assert_allclose(a["bbox"], c["bbox"], atol=2e-3)  # rounding of x2 - x1 vs of the difference

    capsys.readouterr()
    assert main(["eval", str(config_file), "--weights", str(out / "model.safetensors"), "--out", str(tmp_path)]) == 0
    assert det.evaluate() == json.loads((tmp_path / "metrics.json").read_text())
    assert det.evaluate()["AP"] == metrics["AP"]  # and the training's own final evaluation


def test_every_input_kind_gives_the_same_detections(run: tuple[Path, dict[str, float]], config_file: Path) -> None:
    det = Detector.from_pretrained(run[0], device="cpu")
    path = val_images(config_file)[0]
    pil = Image.open(path).convert("RGB")
    array = np.asarray(pil)
    tensor = torch.from_numpy(array.copy()).permute(2, 0, 1)
    reference = det.predict(path, score_thr=0.0)[0]
    assert reference.path == path and len(reference) == 100
    assert reference.names == [det.class_names[i] for i in reference.labels.tolist()]
    same = [det.predict(str(path), 0.0)[0], det.predict(pil, 0.0)[0], det.predict(array, 0.0)[0],
            det.predict(tensor, 0.0)[0], *det.predict([path, pil, array, tensor], 0.0)]
    assert len(same) == 8
    for result in same:
        assert torch.equal(result.boxes, reference.boxes) and torch.equal(result.scores, reference.scores)
        assert torch.equal(result.labels, reference.labels)
    # a float image in [0, 1] at the test size: no resize, so the same normalised pixels
    as_float = det.predict(tensor.float() / 255, 0.0)[0]
    torch.testing.assert_close(as_float.boxes, reference.boxes, atol=1e-4, rtol=0)
    torch.testing.assert_close(as_float.scores, reference.scores, atol=1e-6, rtol=0)
    # the score threshold keeps the leading detections
    kept = det.predict(path, score_thr=float(reference.scores[9]))[0]
    assert len(kept) >= 10 and torch.equal(kept.boxes, reference.boxes[:len(kept)])
    # boxes are in pixels of the input: a 2x larger copy of the image gives ~2x larger boxes
    big = det.predict(pil.resize((pil.width * 2, pil.height * 2), Image.BILINEAR), 0.0)[0]
    assert big.boxes.max() > 64 and (big.boxes[:, 2:] <= torch.tensor([pil.width * 2, pil.height * 2])).all()


def test_save_pretrained_roundtrip(run: tuple[Path, dict[str, float]], config_file: Path, tmp_path: Path) -> None:
    det = Detector.from_pretrained(run[0], device="cpu")
    det.save_pretrained(tmp_path / "saved")
    assert sorted(p.name for p in (tmp_path / "saved").iterdir()) == ["config.yaml", "model.safetensors"]
    again = Detector.from_pretrained(tmp_path / "saved", device="cpu")
    annotations = json.loads((config_file.parent / "synth/annotations/instances_train.json").read_text())
    assert again.class_names == det.class_names == [c["name"] for c in annotations["categories"]]
    assert again.category_ids == det.category_ids == [c["id"] for c in annotations["categories"]]
    image = val_images(config_file)[1]
    a, b = det.predict(image, 0.0)[0], again.predict(image, 0.0)[0]
    assert torch.equal(a.boxes, b.boxes) and torch.equal(a.scores, b.scores)
    # only the inference weights are saved: no auxiliary head
    from safetensors import safe_open

    with safe_open(str(tmp_path / "saved" / "model.safetensors"), "pt") as f:
        assert not any(k.startswith(("aux_heads.", "adapter.", "positive_queries.")) for k in f.keys())


@pytest.mark.slow
def test_train_from_loaded_weights_starts_from_them(run: tuple[Path, dict[str, float]], tmp_path: Path) -> None:
    """A detector loaded from weights continues from them: with a learning rate multiplier 0 for every parameter
    (the "" key matches every name) the new run's weights are the old ones."""
    det = Detector.from_pretrained(run[0], device="cpu")
    before = {k: v.clone() for k, v in det.model.inference_state_dict().items()}
    det.train(out=tmp_path / "again", max_iters=1, lr_mult={"": 0.0}, eval_every=100)
    after = det.model.inference_state_dict()
    assert det.source == tmp_path / "again" / "model.safetensors"
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_to_supervision(run: tuple[Path, dict[str, float]], config_file: Path) -> None:
    supervision = pytest.importorskip("supervision")
    result = Detector.from_pretrained(run[0], device="cpu").predict(val_images(config_file)[0], 0.0)[0]
    sv = result.to_supervision()
    assert isinstance(sv, supervision.Detections) and len(sv) == len(result)
    np.testing.assert_array_equal(sv.xyxy, result.boxes.numpy())
    np.testing.assert_array_equal(sv.confidence, result.scores.numpy())
    np.testing.assert_array_equal(sv.class_id, result.labels.numpy())
    assert list(sv.data["class_name"]) == result.names


def test_to_supervision_without_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "supervision", None)  # as if not installed
    result = Prediction(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.int64), [])
    with pytest.raises(ImportError, match="optional package supervision: pip install supervision"):
        result.to_supervision()


def test_clear_errors(run: tuple[Path, dict[str, float]], config_file: Path, tmp_path: Path) -> None:
    det = Detector.from_pretrained(run[0], device="cpu")
    with pytest.raises(FileNotFoundError, match="missing.jpg not found"):
        det.predict(tmp_path / "missing.jpg")
    with pytest.raises(FileNotFoundError, match="no images"):
        det.predict(tmp_path)
    with pytest.raises(ValueError, match=r"\(H, W, 3\) uint8 RGB, got \(64, 64\) uint8"):
        det.predict(np.zeros((64, 64), np.uint8))
    with pytest.raises(ValueError, match=r"\(3, H, W\) RGB, got \(64, 64, 3\)"):
        det.predict(torch.zeros(64, 64, 3, dtype=torch.uint8))
    with pytest.raises(TypeError, match="cannot read an image from int"):
        det.predict(3)
    with pytest.raises(FileNotFoundError, match="weights file .*nope.safetensors not found"):
        Detector(config_file, tmp_path / "nope.safetensors")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file")
    with pytest.raises(UserError, match="garbage.safetensors is not a safetensors weights file"):
        Detector(config_file, garbage)
    with pytest.raises(UserError, match="garbage.pt is not a codetr training checkpoint"):
        Detector(config_file, garbage.rename(tmp_path / "garbage.pt"))
    other = tmp_path / "other.yaml"  # another architecture: a 2-layer decoder
    other.write_text(yaml.safe_dump({"base": str(config_file), "model": {"transformer": {"dec_layers": 2}}}))
    with pytest.raises(UserError, match="model.safetensors does not fit the model built from the config"):
        Detector(other, run[0] / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="no config.yaml"):
        Detector.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="config 'no_such_config' not found"):
        Detector("no_such_config")


def test_prediction_is_exported_at_the_top_level() -> None:
    import codetr

    assert codetr.Prediction is Prediction and "Detector" in codetr.__all__
    with pytest.raises(AttributeError):
        codetr.Nope  # noqa: B018
