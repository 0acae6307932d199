"""Run an exported ONNX detector with onnxruntime, with the PyTorch model's pre-processing."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from codetr.config import Config
from codetr.config_parsing import config_from_text
from codetr.devices import resolve_device
from codetr.errors import UserError
from codetr.export.onnx import INPUT_NAMES, METADATA_KEYS
from codetr.inference.loading import preprocess
from codetr.models.dino import soft_nms_keep
from codetr.models.mask.paste import paste_masks
from codetr.ops.boxes import rescale_boxes
from codetr.structures import Detections


def onnx_providers(device: str = "auto") -> list[Any]:
    """onnxruntime execution providers for ``--device``: "cuda" / "cuda:N" (and "auto" when both
    PyTorch and onnxruntime have CUDA) the CUDA provider on that GPU, else the CPU's. A device
    onnxruntime cannot use here is a UserError."""
    import onnxruntime as ort

    resolved = resolve_device(device)
    has_cuda = "CUDAExecutionProvider" in ort.get_available_providers()
    if resolved.type == "cuda" and (has_cuda or device != "auto"):
        if not has_cuda:
            raise UserError(f"--device {device}: this onnxruntime has no CUDAExecutionProvider "
                            "(pip install onnxruntime-gpu); use cpu")
        return [("CUDAExecutionProvider", {"device_id": resolved.index or 0}), "CPUExecutionProvider"]
    if resolved.type == "mps":
        raise UserError(f"--device {device}: ONNX models run with onnxruntime on the CPU or CUDA, not mps")
    return ["CPUExecutionProvider"]


class OnnxDetector:
    """An ONNX file written by :func:`codetr.export.export_onnx`, on onnxruntime.

    ``detect`` and ``labels`` behave as :class:`codetr.inference.loading.LoadedModel`'s, so
    ``predict_images`` and :class:`codetr.Detector` run either.
    """

    def __init__(self, path: str | Path, providers: list[Any] | None = None, device: str = "auto") -> None:
        """``providers``: onnxruntime execution providers; by default those of ``device``
        (:func:`onnx_providers`)."""
        import onnxruntime as ort

        providers = providers or onnx_providers(device)
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"ONNX model {path} not found")
        try:
            self.session = ort.InferenceSession(str(path), providers=providers)
        except Exception as err:  # onnxruntime raises its own exception types for unreadable files
            raise ValueError(f"{path} is not a readable ONNX model: {err}") from err
        metadata = self.session.get_modelmeta().custom_metadata_map
        missing = [key for key in METADATA_KEYS if key not in metadata]
        inputs = [i.name for i in self.session.get_inputs()]
        if missing or inputs != INPUT_NAMES:
            raise ValueError(f"{path} was not written by `codetr export` (inputs {inputs}, missing metadata {missing})")
        self.path = path
        self.cfg: Config = config_from_text(metadata["codetr_config"])
        self.class_names: list[str] = json.loads(metadata["codetr_class_names"])
        self.category_ids: list[int] = json.loads(metadata["codetr_category_ids"])

    def labels(self) -> tuple[list[str], list[int]]:
        """Class names and dataset category ids stored at export."""
        return self.class_names, self.category_ids

    def detect(self, image: Tensor) -> Detections:
        """Detections in ``image`` (3, H, W) RGB, uint8 or float in [0, 1]; boxes xyxy in pixels of it."""
        pixels, target = preprocess(self.cfg.data, image)
        size = tuple(pixels.shape[-2:])  # boxes in pixels of the input, then mapped to the image as in PyTorch
        outputs = self.session.run(None, {"images": pixels[None].numpy(), "orig_sizes": np.array([size], dtype=np.int64)})
        det = Detections(*(torch.from_numpy(o[0]) for o in outputs[:3]))
        keep, scores = torch.arange(len(det.scores)), det.scores
        if self.cfg.model.arch == "dino" and self.cfg.model.dino.soft_nms:  # not in the graph: here, as in predict
            keep, scores = soft_nms_keep(det, self.cfg.model)
        boxes = rescale_boxes(det.boxes[keep], size, target.orig_size, target.content_size)
        if len(outputs) == 3:
            return Detections(boxes, scores, det.labels[keep])
        # the mask branch: the kept boxes' masks pasted into the image (as the release pastes into the original
        # image), scored box score x predicted IoU
        probs, ious = (torch.from_numpy(o[0])[keep] for o in outputs[3:])
        height, width = target.orig_size
        masks = paste_masks(probs, boxes, height, width, self.cfg.model.mask.threshold)
        return Detections(boxes, scores, det.labels[keep], masks, ious * scores)
