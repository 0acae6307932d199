"""ONNX export of a detector's inference graph (RT-DETR's ``deploy()`` idea).

:class:`ExportWrapper` takes and returns tensors only; its forward is the detector's
``predict_tensors`` hook (the same code as ``predict``): the backbone, encoder and decoder of
the base detector and its tensor-only post-processing. Co-DETR's auxiliary heads and positive
queries are training-only: they are not in the graph.

The graph (inputs and outputs, by name):

- ``images`` (B, 3, H, W) float32: RGB resized as in evaluation (shorter side
  ``data.test_scale``, longer side at most ``data.max_size``), scaled to [0, 1] and normalised
  with the ImageNet mean and std. The batch shares one size: no padding and no mask.
- ``orig_sizes`` (B, 2) int64: (height, width) of the original images; boxes come out in their
  pixels (give H, W to get them in the pixels of ``images``). With large-scale jitter
  (``data.augment: lsj``) the input is a square canvas holding the resized image at its top left:
  give H, W and scale the boxes by original / resized image size, as
  :meth:`codetr.export.runtime.OnnxDetector.detect` does (with the pre-processing of
  :func:`codetr.inference.loading.preprocess`, PyTorch's).
- ``boxes`` (B, K, 4) float32 xyxy in pixels of ``orig_sizes``, clipped to the image;
  ``scores`` (B, K) float32 descending; ``labels`` (B, K) int64 contiguous labels 0..C-1;
  K = ``model.max_detections`` (top-k over the sigmoid scores of every (query, class) pair).
- With a mask branch (``model.mask``): ``mask_probs`` (B, K, S, S) float32, the mask probabilities of each
  box inside it (the merged last stage, S = 112 as released), and ``mask_ious`` (B, K) float32, the predicted
  mask IoU of each box's class; the runtime pastes the kept detections' masks into the image.

Batch, height and width are dynamic. The two-stage query selection keeps the top
``num_queries`` encoder tokens: an image must give at least that many tokens (about 120 px
square for 300 queries).

A detector whose ``predict`` does more than ``predict_tensors`` after the top-k (DINO's
Soft-NMS, a data-dependent loop) exports the top-k graph; the runtime
(:class:`codetr.export.runtime.OnnxDetector`) applies the remaining step.

The TorchScript-based exporter (``dynamo=False``) is used: it writes the requested opset
(GridSample needs 16), exports the tiny models in seconds, and needs no onnxscript. The
torch.export-based exporter of torch >= 2.9 gives the same numbers but writes opset 18 at
least (its conversion down to 16 fails on this graph) and takes minutes.
"""

from __future__ import annotations

import io
import json
import warnings
from pathlib import Path

import torch
import yaml
from torch import Tensor, nn

from codetr.config_parsing import config_to_dict
from codetr.files import atomic_write
from codetr.inference.loading import LoadedModel
from codetr.ops.deform_attn import use_sampler

DEFAULT_OPSET = 16  # the first opset with GridSample (bilinear, zeros padding, align_corners=False)
MIN_OPSET_GATHER = 14  # --no-grid-sample: the decoder self-attention (scaled_dot_product_attention) needs 14
INPUT_NAMES = ["images", "orig_sizes"]
OUTPUT_NAMES = ["boxes", "scores", "labels"]
MASK_OUTPUT_NAMES = ["mask_probs", "mask_ious"]  # the outputs a model with a mask branch adds
METADATA_KEYS = ("codetr_config", "codetr_class_names", "codetr_category_ids", "codetr_sampler")


class ExportWrapper(nn.Module):
    """Tensors in, tensors out: ``forward(images, orig_sizes) -> (boxes, scores, labels)``
    as described in the module docstring, for any detector with ``predict_tensors``."""

    def __init__(self, detector: nn.Module) -> None:
        super().__init__()
        self.detector = detector

    def forward(self, images: Tensor, orig_sizes: Tensor) -> tuple[Tensor, ...]:
        batch, _, height, width = images.shape
        masks = torch.zeros((batch, height, width), dtype=torch.bool, device=images.device)
        return self.detector.predict_tensors(images, masks, orig_sizes)


def export_onnx(loaded: LoadedModel, path: str | Path, opset: int = DEFAULT_OPSET, grid_sample: bool = True) -> Path:
    """Write the inference graph of ``loaded`` to ``path`` (ONNX), with the config, class names
    and category ids in its metadata. ``grid_sample=False`` samples the deformable attention
    with gathers instead of GridSample (for runtimes without it). Returns ``path``."""
    import onnx

    cfg = loaded.cfg
    if cfg.model.co.eval_head != "detr":
        raise ValueError(f"model.co.eval_head={cfg.model.co.eval_head!r}: only the DETR head (eval_head=detr) "
                         "is exported; the auxiliary heads are training-time parts")
    lowest = DEFAULT_OPSET if grid_sample else MIN_OPSET_GATHER
    if opset < lowest:
        raise ValueError(f"opset {opset} is too low: {'GridSample' if grid_sample else 'the gather sampler'} needs "
                         f"opset {lowest} or later" + (" (or pass --no-grid-sample)" if grid_sample else ""))
    model = loaded.model.eval()
    device = next(model.parameters()).device
    size = cfg.data.test_scale
    example = (torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device),
               torch.tensor([[size, size]], dtype=torch.int64, device=device))
    sampler = "grid_sample" if grid_sample else "gather"
    graph = io.BytesIO()  # the file is written once, complete with its metadata (atomic_write)
    outputs = OUTPUT_NAMES + (MASK_OUTPUT_NAMES if getattr(model, "mask_branch", None) is not None else [])
    with use_sampler(sampler), warnings.catch_warnings(), torch.no_grad():
        # shape checks such as ``reference.shape[-1] == 4`` are constants of the graph, as they should be
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(
            # eval(): the exporter gives the wrapper back in its own mode, and a fresh module is training
            ExportWrapper(model).eval(), example, graph, input_names=INPUT_NAMES, output_names=outputs,
            opset_version=opset, dynamo=False,
            dynamic_axes={"images": {0: "batch", 2: "height", 3: "width"}, "orig_sizes": {0: "batch"},
                          **{name: {0: "batch"} for name in outputs}})
    names, ids = loaded.labels()
    proto = onnx.load_model_from_string(graph.getvalue())
    metadata = dict(zip(METADATA_KEYS, (yaml.safe_dump(config_to_dict(cfg), sort_keys=False), json.dumps(names), json.dumps(ids), sampler)))
    for key, value in metadata.items():
        proto.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(proto)
    path = Path(path)
    atomic_write(path, lambda f: f.write(proto.SerializeToString()))
    return path
