"""Load trained weights and run a detector on image files: drawings and COCO-style results."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import torch
import yaml
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor, nn
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as F

from codetr.config import Config, DataConfig, config_from_dict, load_config, yaml_problem
from codetr.data import build_transforms, collate, transformed_sample
from codetr.data.image import read_image
from codetr.engine.checkpoint import check_writable_folder
from codetr.engine.evaluator import detection_records
from codetr.engine.weights import build_detector, load_weights, read_weights
from codetr.errors import UserError
from codetr.ops.boxes import rescale_boxes
from codetr.structures import Detections, Target

PREDICTIONS_NAME = "predictions.json"
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}
PALETTE = [
    (230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
    (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255), (170, 110, 40),
    (255, 250, 200), (128, 0, 0), (170, 255, 195), (128, 128, 0), (255, 215, 180), (0, 0, 128),
]


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
        pixels of ``image``, clipped to it."""
        pixels, target = preprocess(self.cfg.data, image)
        device = next(self.model.parameters()).device
        batch = collate([(pixels, target)], self.cfg.data.pad_size_divisor).to(device)
        det = self.model.predict(batch)[0]
        boxes = rescale_boxes(det.boxes.float().cpu(), tuple(pixels.shape[-2:]), target.orig_size, target.content_size)
        return Detections(boxes, det.scores.float().cpu(), det.labels.cpu())


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


DEVICE_CHOICES = "auto, cpu, cuda, cuda:N or mps"


def resolve_device(name: str | torch.device, source: str = "--device") -> torch.device:
    """The device of ``--device``, ``train.device`` or ``Detector(device=)`` (named ``source`` in
    errors): "auto" (CUDA when available, else the CPU; MPS only when asked for), "cpu", "cuda",
    "cuda:N" or "mps". A device this machine lacks is a UserError saying why."""
    if isinstance(name, str) and name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise UserError(f"{source} {name!r} is not a device: use {DEVICE_CHOICES}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"{source} {name}: cuda requested but torch.cuda.is_available() is False (no usable "
                            "GPU, or a CPU-only PyTorch build); use cpu or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"{source} {name}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                            f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise UserError(f"{source} {name}: mps requested but torch.backends.mps.is_available() is False "
                            "(Apple-silicon GPUs only); use cpu or auto")
    elif device.type != "cpu":
        raise UserError(f"{source} {name!r}: unsupported device type {device.type!r}; use {DEVICE_CHOICES}")
    return device


def config_from_text(text: str, overrides: list[str] | None = None, source: str = "config") -> Config:
    """A Config from YAML text (as stored with weights), with dotted overrides; errors name ``source``."""
    try:
        values = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise UserError(f"{source}: not valid YAML ({yaml_problem(err)})") from None
    if not isinstance(values, dict):
        raise UserError(f"{source}: a config must be a mapping, got {type(values).__name__}")
    return config_from_dict(values, overrides, source)


def load_model(
    weights: str | Path,
    config: str | Path | None = None,
    overrides: list[str] | None = None,
    device: str | torch.device = "cpu",
) -> LoadedModel:
    """Build a detector and load ``weights``.

    ``weights`` is either inference weights (``.safetensors``, as written by training or the
    converters) or a training checkpoint (``last.pt``). The config is ``config`` when given,
    else ``config.yaml`` next to the weights, else the one stored in the weights. Class names
    and dataset category ids come from the weights; None when they hold none.
    """
    weights = Path(weights)
    stored = read_weights(weights)
    beside = weights.parent / "config.yaml"
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

    # The weights file replaces the backbone's ImageNet initialisation: not downloaded or read.
    model = build_detector(replace(cfg.model, backbone=replace(cfg.model.backbone, weights=None)))
    load_weights(model, stored.state, str(weights), cfg.model)
    return LoadedModel(model.to(device).eval(), cfg, names, ids)


def list_images(source: str | Path) -> list[Path]:
    """``source`` if it is an image file, else the image files directly inside the folder."""
    source = Path(source)
    if source.is_file():
        return [source]
    if source.is_dir():
        images = sorted(p for p in source.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if images:
            return images
        raise FileNotFoundError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in folder {source}")
    raise FileNotFoundError(f"image or folder {source} not found")


def draw_detections(image: Image.Image, records: list[dict[str, Any]], class_names: list[str],
                    category_ids: list[int]) -> Image.Image:
    """A copy of ``image`` with each xywh box, its class name and score; one colour per class."""
    canvas = image.convert("RGB")
    draw = ImageDraw.Draw(canvas)
    font_size = max(10, round(min(canvas.size) / 40))
    try:
        font = ImageFont.load_default(size=font_size)
    except TypeError:  # Pillow < 10.1 has a single fixed-size default font
        font = ImageFont.load_default()
    width = max(1, round(min(canvas.size) / 200))
    label_of = {cat_id: label for label, cat_id in enumerate(category_ids)}
    for rec in sorted(records, key=lambda r: r["score"]):
        label = label_of[rec["category_id"]]
        colour = PALETTE[label % len(PALETTE)]
        x, y, w, h = rec["bbox"]
        draw.rectangle((x, y, x + w, y + h), outline=colour, width=width)
        text = f"{class_names[label]} {rec['score']:.2f}"
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        text_w, text_h = right - left + 2, bottom - top + 2
        # Above the box's top-left corner; inside the image at its top and right borders.
        tx = max(0.0, min(x, canvas.width - text_w))
        ty = y - text_h if y >= text_h else y
        draw.rectangle((tx, ty, tx + text_w, ty + text_h), fill=colour)
        draw.text((tx + 1 - left, ty + 1 - top), text, fill=(0, 0, 0) if sum(colour) > 380 else (255, 255, 255),
                  font=font)
    return canvas


def check_prediction_outputs(images: list[Path], out_dir: str | Path) -> None:
    """A UserError when writing the drawings or ``predictions.json`` into ``out_dir`` would write
    over one of ``images`` (e.g. ``--out`` is the input folder), or ``out_dir`` is not writable."""
    out_dir = Path(out_dir)
    outputs = {out_dir / path.name: path for path in images}
    outputs.update({out_dir / PREDICTIONS_NAME: path for path in images if path.name == PREDICTIONS_NAME})
    clashes = [path for out, path in outputs.items() if out.exists() and path.exists() and os.path.samefile(out, path)]
    if clashes:
        names = ", ".join(p.name for p in clashes[:3]) + (" ..." if len(clashes) > 3 else "")
        raise UserError(f"--out {out_dir}: writing the drawings there would overwrite {len(clashes)} input image(s) "
                        f"({names}); choose another output folder")
    check_writable_folder(out_dir, "--out")


def predict_images(detector: ImageDetector, images: list[Path], out_dir: str | Path,
                   score_thr: float = 0.3) -> list[dict[str, Any]]:
    """Detect objects in ``images``; write drawings and ``predictions.json`` into ``out_dir``.

    Returns the records written: ``file_name``, ``category_id`` (dataset id), ``category_name``,
    ``bbox`` (xywh in pixels of the original image) and ``score``, for scores >= ``score_thr``.
    Never writes over an input image (:func:`check_prediction_outputs`). An image that cannot be
    read is reported on stderr and skipped; when any was, a UserError at the end counts them (the
    predictions of the others are written).
    """
    check_prediction_outputs(images, out_dir)
    out_dir = Path(out_dir)
    class_names, category_ids = detector.labels()
    label_of = {cat_id: label for label, cat_id in enumerate(category_ids)}
    records: list[dict[str, Any]] = []
    failed: list[Path] = []
    for path in images:
        try:
            pixels = read_image(path, detector.cfg.data.max_image_pixels)
        except (UserError, OSError, Image.DecompressionBombError) as err:
            failed.append(path)
            reason = str(err) if str(path.name) in str(err) else f"{path}: {err}"
            print(f"skipped {reason}", file=sys.stderr)
            continue
        det = detector.detect(pixels)
        keep = det.scores >= score_thr
        found = detection_records(Detections(det.boxes[keep], det.scores[keep], det.labels[keep]), 0, category_ids)
        draw_detections(F.to_pil_image(pixels), found, class_names, category_ids).save(out_dir / path.name)
        for rec in found:
            records.append({"file_name": path.name, "category_id": rec["category_id"],
                            "category_name": class_names[label_of[rec["category_id"]]],
                            "bbox": rec["bbox"], "score": rec["score"]})
    (out_dir / PREDICTIONS_NAME).write_text(json.dumps(records, indent=1))
    if failed:
        names = ", ".join(p.name for p in failed[:5]) + (" ..." if len(failed) > 5 else "")
        raise UserError(f"{len(failed)} of {len(images)} images could not be read ({names}; reasons above); the "
                        f"predictions of the other {len(images) - len(failed)} are in {out_dir}")
    return records
