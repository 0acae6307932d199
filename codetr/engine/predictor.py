"""Load trained weights and run a detector on image files: drawings and COCO-style results."""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import torch
import yaml
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor, nn
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as F

from codetr.config import Config, DataConfig, load_config
from codetr.data import build_transforms, collate, transformed_sample
from codetr.engine.checkpoint import load_checkpoint, read_safetensors
from codetr.engine.evaluator import detection_records
from codetr.ops.boxes import rescale_boxes
from codetr.structures import Detections

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
        height, width = image.shape[-2:]
        sample = transformed_sample(tv_tensors.Image(image), torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64),
                                    build_transforms(self.cfg.data, train=False))
        device = next(self.model.parameters()).device
        batch = collate([sample], self.cfg.data.pad_size_divisor).to(device)
        det = self.model.predict(batch)[0]
        boxes = rescale_boxes(det.boxes.float(), tuple(batch.image_sizes[0].tolist()), (height, width),
                              batch.targets[0].content_size)
        return Detections(boxes.cpu(), det.scores.float().cpu(), det.labels.cpu())


class ImageDetector(Protocol):
    """What :func:`predict_images` runs: a PyTorch :class:`LoadedModel` or an ONNX model
    (:class:`codetr.export.OnnxDetector`)."""

    cfg: Config

    def detect(self, image: Tensor) -> Detections: ...

    def labels(self) -> tuple[list[str], list[int]]: ...


def default_labels(num_classes: int) -> tuple[list[str], list[int]]:
    """Names ``class_<i>`` and category ids ``0..C-1``, for weights that store none."""
    return [f"class_{i}" for i in range(num_classes)], list(range(num_classes))


def preprocess(cfg: DataConfig, image: Tensor) -> Tensor:
    """(3, H, W) RGB uint8 or float in [0, 1] -> (3, h, w) float32 normalised, resized as in
    evaluation (shorter side ``cfg.test_scale``, longer side at most ``cfg.max_size``)."""
    return build_transforms(cfg, train=False)(tv_tensors.Image(image)).as_subclass(Tensor)


def read_image(path: str | Path) -> Tensor:
    """An image file as a (3, H, W) uint8 RGB tensor."""
    with Image.open(path) as img:
        return F.pil_to_tensor(img.convert("RGB"))


def resolve_device(name: str) -> torch.device:
    """``"auto"``: CUDA when available, else CPU; otherwise ``torch.device(name)``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def config_from_text(text: str, overrides: list[str] | None = None) -> Config:
    """A Config from YAML text (as stored with weights), with dotted overrides."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "config.yaml"
        path.write_text(text)
        return load_config(path, overrides)


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
    from codetr.models.build import build_model  # heavy import, only when a model is needed

    weights = Path(weights)
    if weights.suffix == ".safetensors":
        state, metadata = read_safetensors(weights)
        stored_config = metadata.get("config")
        names = json.loads(metadata["class_names"]) if "class_names" in metadata else None
        ids = json.loads(metadata["category_ids"]) if "category_ids" in metadata else None
    else:
        ckpt = load_checkpoint(weights)
        state, names, ids = ckpt["model"], ckpt["class_names"], ckpt["category_ids"]
        # trained with train.ema: the average is what training evaluated and saved as inference weights
        state = {**state, **ckpt.get("hooks", {}).get("EMAHook", {}).get("averages", {})}
        stored_config = yaml.safe_dump(ckpt["config"], sort_keys=False)

    beside = weights.parent / "config.yaml"
    if config is not None:
        cfg = load_config(config, overrides)
    elif beside.is_file():
        cfg = load_config(beside, overrides)
    elif stored_config is not None:
        cfg = config_from_text(stored_config, overrides)
    else:
        raise FileNotFoundError(f"{weights} stores no config and there is no {beside}; pass --config")

    num_classes = cfg.model.num_classes
    if names is not None and ids is not None:
        if len(names) != num_classes or len(ids) != num_classes:
            raise ValueError(f"{weights} names {len(names)} classes but model.num_classes is {num_classes}")
        names, ids = list(names), [int(i) for i in ids]

    # The weights file replaces the backbone's ImageNet initialisation: not downloaded or read.
    model = build_model(replace(cfg.model, backbone=replace(cfg.model.backbone, weights=None)))
    load_weights(model, state, str(weights))
    return LoadedModel(model.to(device).eval(), cfg, names, ids)


def load_weights(model: nn.Module, state: dict[str, Tensor], source: str) -> None:
    """Load a full or inference-only state dict; every weight needed at inference must be present."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    needed = set(model.inference_state_dict())
    missing_needed = sorted(k for k in missing if k in needed)
    if unexpected or missing_needed:
        raise ValueError(f"{source} does not fit the model built from the config: "
                         f"missing {missing_needed[:10]}{'...' if len(missing_needed) > 10 else ''}, "
                         f"unexpected {sorted(unexpected)[:10]}{'...' if len(unexpected) > 10 else ''}")


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


def predict_images(detector: ImageDetector, images: list[Path], out_dir: str | Path,
                   score_thr: float = 0.3) -> list[dict[str, Any]]:
    """Detect objects in ``images``; write drawings and ``predictions.json`` into ``out_dir``.

    Returns the records written: ``file_name``, ``category_id`` (dataset id), ``category_name``,
    ``bbox`` (xywh in pixels of the original image) and ``score``, for scores >= ``score_thr``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    class_names, category_ids = detector.labels()
    label_of = {cat_id: label for label, cat_id in enumerate(category_ids)}
    records: list[dict[str, Any]] = []
    for path in images:
        pixels = read_image(path)
        det = detector.detect(pixels)
        keep = det.scores >= score_thr
        found = detection_records(Detections(det.boxes[keep], det.scores[keep], det.labels[keep]), 0, category_ids)
        draw_detections(F.to_pil_image(pixels), found, class_names, category_ids).save(out_dir / path.name)
        for rec in found:
            records.append({"file_name": path.name, "category_id": rec["category_id"],
                            "category_name": class_names[label_of[rec["category_id"]]],
                            "bbox": rec["bbox"], "score": rec["score"]})
    (out_dir / "predictions.json").write_text(json.dumps(records, indent=1))
    return records
