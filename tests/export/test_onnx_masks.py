"""ONNX export of Co-DINO-Inst's mask branch: the graph's mask probabilities and IoUs equal PyTorch's, and
onnxruntime's detections carry the same masks and mask scores as PyTorch's ``predict``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from codetr import Detector
from codetr.data import collate
from codetr.export.runtime import OnnxDetector
from codetr.inference.loading import preprocess

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

pytestmark = pytest.mark.usefixtures("one_thread")
SMALL = {"model": {"num_classes": 3, "transformer": {"enc_layers": 1, "dec_layers": 2}, "mask": {"iou_fc_dim": 64}},
         "data": {"test_scale": 96, "max_size": 160}}


@pytest.mark.slow
def test_onnx_mask_branch_gives_pytorch_masks(tmp_path: Path) -> None:
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({"base": "co_dino_inst_tiny", **SMALL}))
    torch.manual_seed(0)
    det = Detector(tmp_path / "c.yaml", device="cpu")
    model = det.model.eval()
    path = det.export(tmp_path / "inst.onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["boxes", "scores", "labels", "mask_probs", "mask_ious"]
    h, w = 104, 120  # another size than the export's
    images = torch.randn(1, 3, h, w, generator=torch.Generator().manual_seed(1))
    orig = torch.tensor([[h, w]])
    outputs = session.run(None, {"images": images.numpy(), "orig_sizes": orig.numpy()})
    with torch.no_grad():
        reference = model.predict_tensors(images, torch.zeros(1, h, w, dtype=torch.bool), orig)
    assert outputs[3].shape == (1, model.cfg.transformer.num_queries, 112, 112)
    for ours, theirs in zip(outputs, reference):
        np.testing.assert_allclose(ours, theirs.numpy(), atol=1e-4)
    # onnxruntime's detections of an image the test resize leaves as it is: PyTorch's masks and mask scores
    image = (torch.rand(3, 96, 128, generator=torch.Generator().manual_seed(2)) * 255).to(torch.uint8)
    pixels, target = preprocess(det.cfg.data, image)
    assert tuple(pixels.shape[-2:]) == (96, 128)
    expected = model.predict(collate([(pixels, target)]))[0]
    got = OnnxDetector(path).detect(image)
    assert got.masks.shape == expected.masks.shape == (len(expected.scores), 96, 128)
    np.testing.assert_allclose(got.scores.numpy(), expected.scores.numpy(), atol=1e-4)
    np.testing.assert_allclose(got.mask_scores.numpy(), expected.mask_scores.numpy(), atol=1e-4)
    assert (got.masks != expected.masks).float().mean() < 1e-3  # a pixel at the threshold may flip
    assert expected.masks.any()
