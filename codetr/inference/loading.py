"""The one path from weights to a model: build the detector of a config and load weights into it,
with what is needed to name its outputs (:class:`LoadedModel`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

import torch
from torch import Tensor, nn
from torchvision import tv_tensors

from codetr.config import Config, DataConfig, ModelConfig
from codetr.config_parsing import config_from_text, load_config
from codetr.data import build_transforms, collate, transformed_sample
from codetr.errors import UserError
from codetr.files import CONFIG_NAME
from codetr.inference.weights import load_state, read_weights_file
from codetr.ops.boxes import rescale_boxes
from codetr.structures import Detections, Target


@dataclass
class LoadedModel:
    """A detector in eval mode with what is needed to name its outputs."""

    model: nn.Module
    cfg: Config
    class_names: list[str] | None  # None: not stored with the weights
    category_ids: list[int] | None

    def labels(self) -> tuple[list[str], list[int]]:
        """Class names and category ids; ``class_<i>`` and ids ``0..C-1`` when not stored."""
        if self.class_names is not None and self.category_ids is not None:
            return self.class_names, self.category_ids
        return default_labels(self.cfg.model.num_classes)

    @torch.inference_mode()
    def detect(self, image: Tensor) -> Detections:
        """Detections in ``image`` (3, H, W) RGB, uint8 or float in [0, 1]: the evaluation
        pre-processing, one image per forward (no batch partner's padding), boxes xyxy in
        pixels of ``image``, clipped to it; masks (a model that yields them) (K, H, W) bool in
        ``image`` (the model pastes them there, as the release does) with their ``mask_scores``."""
        pixels, target = preprocess(self.cfg.data, image)
        device = next(self.model.parameters()).device
        batch = collate([(pixels, target)], self.cfg.data.pad_size_divisor).to(device)
        det = self.model.predict(batch)[0]
        (h, w) = pixels.shape[-2:]
        boxes = rescale_boxes(det.boxes.float().cpu(), (h, w), target.orig_size, target.content_size)
        masks = None if det.masks is None else det.masks.cpu()
        mask_scores = None if det.mask_scores is None else det.mask_scores.float().cpu()
        return Detections(boxes, det.scores.float().cpu(), det.labels.cpu(), masks, mask_scores)


class ImageDetector(Protocol):
    """What :func:`predict_images` runs: a PyTorch :class:`LoadedModel` or an ONNX model
    (:class:`codetr.export.OnnxDetector`)."""

    cfg: Config

    def detect(self, image: Tensor) -> Detections: ...

    def labels(self) -> tuple[list[str], list[int]]: ...


def default_labels(num_classes: int) -> tuple[list[str], list[int]]:
    """Names ``class_<i>`` and category ids ``0..C-1``, for weights that store none."""
    return [f"class_{i}" for i in range(num_classes)], list(range(num_classes))


def preprocess(cfg: DataConfig, image: Tensor) -> tuple[Tensor, Target]:
    """The evaluation pre-processing of one image (3, H, W) RGB, uint8 or float in [0, 1], which
    :meth:`LoadedModel.detect` and the ONNX runtime's ``detect`` both run: the model input (3, h, w)
    float32 normalised (shorter side ``cfg.test_scale``, longer side at most ``cfg.max_size``; LSJ:
    the longer side ``cfg.lsj_size``, padded to that square canvas) and its Target without boxes
    (``orig_size`` (H, W); ``content_size``: the resized image inside an LSJ canvas). Boxes xyxy in
    pixels of the input go back to the image with ``rescale_boxes(boxes, (h, w), orig_size, content_size)``."""
    return transformed_sample(tv_tensors.Image(image), torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64),
                              build_transforms(cfg, train=False))


def load_model(
    weights: str | Path,
    config: str | Path | None = None,
    overrides: list[str] | None = None,
    device: str | torch.device = "cpu",
) -> LoadedModel:
    """Build a detector and load ``weights``.

    ``weights`` is either inference weights (``.safetensors``, as written by training or the
    converters) or a training checkpoint (``last.pt``). The config is ``config`` when given,
    else ``config.yaml`` next to the weights (:data:`codetr.files.CONFIG_NAME`), else the one stored in the weights. Class names
    and dataset category ids come from the weights; None when they hold none.
    """
    weights = Path(weights)
    stored = read_weights_file(weights)
    beside = weights.parent / CONFIG_NAME
    if config is not None:
        cfg = load_config(config, overrides)
    elif beside.is_file():
        cfg = load_config(beside, overrides)
    elif stored.config_text is not None:
        cfg = config_from_text(stored.config_text, overrides, f"the config stored in {weights}")
    else:
        raise UserError(f"{weights} stores no config and there is no {beside}; pass --config")

    names, ids = stored.class_names, stored.category_ids
    num_classes = cfg.model.num_classes
    if names is not None and ids is not None:
        if len(names) != num_classes or len(ids) != num_classes:
            raise UserError(f"{weights} names {len(names)} classes but model.num_classes is {num_classes}")
        names, ids = list(names), [int(i) for i in ids]

    model = build_loaded(cfg.model, stored.state, str(weights))
    return LoadedModel(model.to(device).eval(), cfg, names, ids)


def build_detector(model_cfg: ModelConfig, build: Callable[[ModelConfig], nn.Module] | None = None) -> nn.Module:
    """``build(model_cfg)`` (default :func:`codetr.models.build.build_model`); a ValueError, which
    building raises for a config value it cannot use (an unknown ``model.neck``, a backbone weights
    file of another network, ...), becomes a UserError."""
    if build is None:
        from codetr.models.build import build_model as build  # heavy import, only when a model is needed
    try:
        return build(model_cfg)
    except ValueError as err:
        raise UserError(f"cannot build the model from the config: {err}") from err


def without_backbone_weights(model_cfg: ModelConfig) -> ModelConfig:
    """``model_cfg`` without the backbone's ImageNet weights file, for a model whose weights are
    loaded after building (or random, to benchmark): the file is then neither downloaded nor read."""
    return replace(model_cfg, backbone=replace(model_cfg.backbone, weights=None))


def build_loaded(model_cfg: ModelConfig, state: dict[str, Tensor], source: str,
                 build: Callable[[ModelConfig], nn.Module] | None = None) -> nn.Module:
    """The detector of ``model_cfg`` with ``state`` loaded (:func:`~codetr.inference.weights.load_state`;
    ``source`` names the weights in errors): the one path behind every loaded model (``codetr eval``
    / ``predict`` / ``export`` / ``bench --weights``, the Python API)."""
    model = build_detector(without_backbone_weights(model_cfg), build)
    load_state(model, state, source, model_cfg)
    return model
