"""ONNX export: the inference graph of a tiny Deformable-DETR and a tiny Co-Deformable-DETR, run
with onnxruntime, with GridSample and with the gather sampler, against PyTorch on image sizes
and a batch other than the export's; the CLI and the Python API on the exported file."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from codetr import Detector
from codetr.cli import main
from codetr.config_parsing import load_config
from codetr.errors import FileWriteError
from codetr.inference.loading import LoadedModel
from codetr.models.build import build_model
from codetr.structures import Batch
from full_disk import FullDisk

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

pytestmark = pytest.mark.usefixtures("one_thread")

# A shallower tiny model (export time grows with the graph); exported at 96 x 96.
SMALL = {"model": {"transformer": {"enc_layers": 1, "dec_layers": 2}}, "data": {"test_scale": 96, "max_size": 160}}
SIZES = [(80, 112), (120, 96)]  # (h, w), both other than the export size
TOLERANCE = 1e-4
MEASURED: dict[str, float] = {}


def small_config(base: str, folder: Path) -> Path:
    path = folder / f"{base}_small.yaml"
    path.write_text(yaml.safe_dump({"base": base, **SMALL}))
    return path


def pytorch_and_onnxruntime(model: torch.nn.Module, session: ort.InferenceSession) -> Iterator[tuple]:
    """PyTorch's detections and onnxruntime's (boxes, scores, labels) of a batch of 1 and of 2 random
    images (the two SIZES): (PyTorch's list of Detections, boxes, scores, labels)."""
    g = torch.Generator().manual_seed(1)
    for batch, (h, w) in [(1, SIZES[0]), (2, SIZES[1])]:
        images = torch.randn(batch, 3, h, w, generator=g)
        orig = torch.tensor([[h, w]] * batch)
        ref = model.predict(Batch(images, torch.zeros(batch, h, w, dtype=torch.bool), orig))
        yield ref, *session.run(None, {"images": images.numpy(), "orig_sizes": orig.numpy()})


@pytest.fixture(scope="module", params=["deformable_detr_tiny", "co_deformable_detr_tiny"])
def detector(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Detector:
    """A tiny detector with random weights (the config's initialisation)."""
    torch.manual_seed(0)
    return Detector(small_config(request.param, tmp_path_factory.mktemp("export")), device="cpu")


@pytest.mark.slow
@pytest.mark.parametrize("grid_sample", [True, False], ids=["grid_sample", "gather"])
def test_onnxruntime_matches_pytorch(detector: Detector, grid_sample: bool, tmp_path: Path) -> None:
    path = detector.export(tmp_path / "model.onnx", grid_sample=grid_sample)
    proto = onnx.load(str(path))
    ops = {node.op_type for node in proto.graph.node}
    assert ("GridSample" in ops) == grid_sample
    assert [(o.domain, o.version) for o in proto.opset_import if o.domain in ("", "ai.onnx")] == [("", 16)]
    # only the inference graph: no weight of an auxiliary head, adapter or positive-query branch
    names = [init.name for init in proto.graph.initializer]
    assert not [n for n in names if any(part in n for part in ("aux_heads", "adapter", "positive_queries"))]
    assert sum(int(np.prod(init.dims)) for init in proto.graph.initializer) <= \
        sum(v.numel() for v in detector.model.inference_state_dict().values())

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for ref, boxes, scores, labels in pytorch_and_onnxruntime(detector.model, session):
        batch = len(ref)
        assert boxes.shape == (batch, 100, 4) and scores.shape == (batch, 100) and labels.dtype == np.int64
        for b, det in enumerate(ref):
            box_diff = float(np.abs(boxes[b] - det.boxes.numpy()).max())
            score_diff = float(np.abs(scores[b] - det.scores.numpy()).max())
            key = f"{'co_' if detector.cfg.model.co.aux_heads else ''}{'grid_sample' if grid_sample else 'gather'}"
            MEASURED[f"{key} boxes"] = max(MEASURED.get(f"{key} boxes", 0.0), box_diff)
            MEASURED[f"{key} scores"] = max(MEASURED.get(f"{key} scores", 0.0), score_diff)
            assert box_diff < TOLERANCE and score_diff < TOLERANCE, (batch, b, box_diff, score_diff)
            np.testing.assert_array_equal(labels[b], det.labels.numpy())
    # boxes scaled to the original sizes given: twice the size, twice the (unclipped) boxes
    images = torch.randn(1, 3, *SIZES[0], generator=torch.Generator().manual_seed(2))
    small, = session.run(["boxes"], {"images": images.numpy(), "orig_sizes": np.array([SIZES[0]])})
    large, = session.run(["boxes"], {"images": images.numpy(), "orig_sizes": 2 * np.array([SIZES[0]])})
    np.testing.assert_allclose(large, 2 * small, rtol=1e-5, atol=1e-4)
    print(f"max |onnxruntime - pytorch| {MEASURED}")


def test_export_refuses_what_it_cannot_export(tmp_path: Path) -> None:
    from codetr.export import export_onnx

    cfg = load_config("deformable_detr_tiny")
    loaded = LoadedModel(build_model(cfg.model).eval(), cfg, None, None)
    with pytest.raises(ValueError, match="GridSample needs opset 16 or later .or pass --no-grid-sample."):
        export_onnx(loaded, tmp_path / "m.onnx", opset=13)
    loaded.cfg.model.co.eval_head = "atss"
    with pytest.raises(ValueError, match="only the DETR head"):
        export_onnx(loaded, tmp_path / "m.onnx")


@pytest.mark.slow
def test_cli_export_then_predict_onnx_and_python_api(tmp_path: Path) -> None:
    """`codetr export --no-grid-sample --opset 14`, then `codetr predict --onnx` and
    Detector.from_onnx give PyTorch's detections on image files of two other sizes."""
    from PIL import Image

    small = Detector(small_config("co_deformable_detr_tiny", tmp_path), device="cpu")  # random weights
    saved = small.save_pretrained(tmp_path / "pretrained")
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate([(60, 90), (150, 100)]):  # resized to 96 x 144 and 144 x 96
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(images / f"{i}.png")

    onnx_path = tmp_path / "model.onnx"
    assert main(["export", str(saved / "config.yaml"), "--weights", str(saved / "model.safetensors"),
                 "--out", str(onnx_path), "--opset", "14", "--no-grid-sample"]) == 0
    assert onnx.load(str(onnx_path)).opset_import[0].version == 14

    for flag, value, out in (("--weights", saved / "model.safetensors", "torch"), ("--onnx", onnx_path, "onnx")):
        assert main(["predict", str(images), flag, str(value), "--out", str(tmp_path / out), "--score-thr", "0"]) == 0
    torch_records = json.loads((tmp_path / "torch" / "predictions.json").read_text())
    onnx_records = json.loads((tmp_path / "onnx" / "predictions.json").read_text())
    assert len(torch_records) == len(onnx_records) == 200
    for a, b in zip(torch_records, onnx_records):
        assert (a["file_name"], a["category_id"], a["category_name"]) == (b["file_name"], b["category_id"],
                                                                          b["category_name"])
        np.testing.assert_allclose(a["bbox"], b["bbox"], atol=2e-3)  # records round to 3 decimals
        assert abs(a["score"] - b["score"]) <= 1e-5

    from_onnx = Detector.from_onnx(onnx_path)
    assert from_onnx.class_names == small.class_names and from_onnx.cfg == Detector.from_pretrained(saved).cfg
    for ours, theirs in zip(from_onnx.predict(images, 0.0), Detector.from_pretrained(saved, "cpu").predict(images, 0.0)):
        assert ours.path == theirs.path and ours.names == theirs.names
        torch.testing.assert_close(ours.boxes, theirs.boxes, atol=TOLERANCE, rtol=0)
        torch.testing.assert_close(ours.scores, theirs.scores, atol=TOLERANCE, rtol=0)
    with pytest.raises(RuntimeError, match="only predicts"):
        from_onnx.train(out=tmp_path / "x")
    renamed = shutil.copy(onnx_path, tmp_path / "model.bin")  # from_onnx does not go by the file name
    assert Detector.from_onnx(renamed).cfg == from_onnx.cfg


def test_from_onnx_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="ONNX model .*missing.onnx not found"):
        Detector.from_onnx(tmp_path / "missing.onnx")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not onnx")
    with pytest.raises(ValueError, match="bad.onnx is not a readable ONNX model"):
        Detector.from_onnx(bad)
    # a valid ONNX file that `codetr export` did not write
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 16)]), str(tmp_path / "other.onnx"))
    with pytest.raises(ValueError, match="other.onnx was not written by `codetr export`"):
        Detector.from_onnx(tmp_path / "other.onnx")


@pytest.mark.slow
def test_co_dino_exports_its_top_k_and_soft_nms_runs_after_the_graph(tmp_path: Path) -> None:
    """Co-DINO: the graph holds DINO's inference up to the top num_queries pairs; Soft-NMS runs on
    onnxruntime's outputs in Detector.from_onnx, giving PyTorch's detections."""
    torch.manual_seed(0)
    det = Detector(small_config("co_dino_tiny", tmp_path), device="cpu")
    path = det.export(tmp_path / "co_dino.onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    h, w = SIZES[0]
    images = torch.randn(1, 3, h, w, generator=torch.Generator().manual_seed(1))
    orig = torch.tensor([[h, w]])
    boxes, scores, _ = session.run(None, {"images": images.numpy(), "orig_sizes": orig.numpy()})
    with torch.no_grad():
        ref_boxes, ref_scores, _ = det.model.predict_tensors(images, torch.zeros(1, h, w, dtype=torch.bool), orig)
    assert scores.shape == (1, det.cfg.model.transformer.num_queries)
    assert float(np.abs(boxes - ref_boxes.numpy()).max()) < TOLERANCE
    assert float(np.abs(scores - ref_scores.numpy()).max()) < TOLERANCE
    image = (torch.rand(3, 90, 120, generator=torch.Generator().manual_seed(2)) * 255).to(torch.uint8)
    ours, theirs = Detector.from_onnx(path).predict(image, score_thr=0.0)[0], det.predict(image, score_thr=0.0)[0]
    assert len(theirs.scores) <= det.cfg.model.max_detections and len(ours.scores) == len(theirs.scores)
    np.testing.assert_allclose(np.asarray(ours.scores), np.asarray(theirs.scores), atol=TOLERANCE)
    np.testing.assert_allclose(np.asarray(ours.boxes), np.asarray(theirs.boxes), atol=TOLERANCE)


@pytest.mark.slow
def test_lsj_model_on_onnx_gives_pytorch_detections_in_original_pixels(tmp_path: Path) -> None:
    """Co-DINO with large-scale jitter: the input is a 96 px canvas holding the resized image, so
    boxes are scaled by original / resized size (not / canvas size), on onnxruntime as in PyTorch,
    for two images of other shapes than the canvas."""
    config = tmp_path / "co_dino_lsj.yaml"
    config.write_text(yaml.safe_dump({"base": "co_dino_tiny", "model": SMALL["model"],
                                      "data": {"augment": "lsj", "lsj_size": 96}}))
    torch.manual_seed(0)
    det = Detector(config, device="cpu")
    on_onnx = Detector.from_onnx(det.export(tmp_path / "lsj.onnx"), device="cpu")
    g = torch.Generator().manual_seed(3)
    for h, w in [(60, 90), (150, 100)]:  # content 64 x 96 and 96 x 64 in the canvas
        image = (torch.rand(3, h, w, generator=g) * 255).to(torch.uint8)
        ours, theirs = on_onnx.predict(image, score_thr=0.0)[0], det.predict(image, score_thr=0.0)[0]
        assert len(theirs.scores) == len(ours.scores) > 0
        torch.testing.assert_close(ours.scores, theirs.scores, atol=TOLERANCE, rtol=0)
        torch.testing.assert_close(ours.boxes, theirs.boxes, atol=TOLERANCE, rtol=0)
        assert torch.equal(ours.labels, theirs.labels)
        # in original pixels: the boxes span the image, not 96 / 64 of it in its shorter direction
        assert theirs.boxes[:, 2].max() > 0.9 * w and theirs.boxes[:, 3].max() > 0.9 * h


@pytest.mark.slow
def test_export_writes_the_file_once_complete(tmp_path: Path, full_disk: FullDisk,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """An interrupt before the file is complete (here in the model check, after the graph is traced)
    leaves the previous file as it was, as does a full disk (one error naming the file); no
    temporary file stays."""
    from codetr.export import export_onnx

    cfg = load_config(small_config("deformable_detr_tiny", tmp_path))
    torch.manual_seed(0)
    loaded = LoadedModel(build_model(cfg.model).eval(), cfg, None, None)
    path = full_disk.folder / "model.onnx"
    export_onnx(loaded, path)
    good = path.read_bytes()
    assert {p.key for p in onnx.load(str(path)).metadata_props} >= {"codetr_config", "codetr_class_names"}

    def interrupted(model: object) -> None:
        raise KeyboardInterrupt

    with monkeypatch.context() as patch, pytest.raises(KeyboardInterrupt):
        patch.setattr(onnx.checker, "check_model", interrupted)
        export_onnx(loaded, path)
    assert path.read_bytes() == good

    full_disk.fill(leave=len(good) // 2)
    with pytest.raises(FileWriteError, match=rf"^cannot write {path}: no space left on device \(the previous "
                                             r"model.onnx is unchanged\)$"):
        export_onnx(loaded, path)
    assert path.read_bytes() == good
    assert [p.name for p in full_disk.folder.iterdir() if p.suffix == ".tmp"] == []


@pytest.mark.parametrize("name", ["conditional_detr_tiny", "co_dab_detr_tiny"])
def test_single_scale_detectors_on_onnxruntime(name: str, tmp_path: Path) -> None:
    """Conditional DETR and (Co-)DAB-DETR, without deformable attention: onnxruntime gives PyTorch's
    detections on two other sizes, and the graph holds no training-only weight. Every (query, class) pair
    is kept (max_detections = queries x classes): random weights leave scores 1e-7 apart, whose order is
    arbitrary, so each detection is matched to one of the same class within the tolerance."""
    path = tmp_path / f"{name}_small.yaml"
    path.write_text(yaml.safe_dump({"base": name, **SMALL, "model": {**SMALL["model"], "max_detections": 300}}))
    torch.manual_seed(0)
    det = Detector(path, device="cpu")
    onnx_path = det.export(tmp_path / "model.onnx")
    names = [init.name for init in onnx.load(str(onnx_path)).graph.initializer]
    assert not [n for n in names if any(part in n for part in ("aux_heads", "adapter", "positive_queries"))]
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    for ref, boxes, scores, labels in pytorch_and_onnxruntime(det.model, session):
        assert scores.shape == (len(ref), 300)
        for b, theirs in enumerate(ref):
            same_class = torch.from_numpy(labels[b])[:, None] == theirs.labels[None]
            score_diff = (torch.from_numpy(scores[b])[:, None] - theirs.scores[None]).abs()
            box_diff = (torch.from_numpy(boxes[b])[:, None] - theirs.boxes[None]).abs().amax(-1)
            close = same_class & (score_diff < TOLERANCE) & (box_diff < TOLERANCE)
            assert close.any(1).all() and close.any(0).all(), (name, len(ref), b)
