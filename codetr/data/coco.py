"""COCO-format detection dataset (images folder + instances JSON)."""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from faster_coco_eval import COCO
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as F

from codetr.structures import Target

# A transform takes and returns (image, {"boxes": BoundingBoxes xyxy, "labels": (N,) int64}).
Transform = Callable[[tv_tensors.Image, dict[str, Tensor]], tuple[Tensor, dict[str, Tensor]]]


class CocoDetection(Dataset):
    """Detection samples of a COCO-format dataset.

    Category ids of any numbering map to contiguous labels ``0..C-1`` in increasing id order:
    ``category_ids[label]`` is the dataset id, ``class_names[label]`` its name.
    Crowd boxes (``iscrowd=1``) are left out of the targets. Boxes are clipped to the image;
    boxes with width or height <= 1 px after clipping are dropped (one warning per dataset).
    Images without annotations are kept with empty targets.

    ``__getitem__(i)`` returns ``(image, Target)``: with ``transforms``, whatever they return
    (for :func:`codetr.data.build_transforms`: (3, H, W) float normalised); without, the image as
    stored, (3, H, W) uint8 RGB. ``Target.boxes`` are xyxy absolute in the returned image.
    """

    def __init__(
        self, images_dir: str | Path, annotations_file: str | Path, transforms: Transform | None = None
    ) -> None:
        self.images_dir = Path(images_dir)
        self.annotations_file = Path(annotations_file)
        self.transforms = transforms
        dataset = _load_json(self.annotations_file)
        _file_names_from_coco_urls(dataset)
        _validate(dataset, self.annotations_file)
        self.coco = COCO(dataset)
        self.category_ids: list[int] = sorted(self.coco.cats)
        self.class_names: list[str] = [self.coco.cats[c]["name"] for c in self.category_ids]
        self.image_ids: list[int] = [img["id"] for img in dataset["images"]]
        label_of = {cat_id: label for label, cat_id in enumerate(self.category_ids)}

        # (N, 4) xyxy absolute clipped boxes and (N,) labels per image, in image_ids order.
        self._boxes: list[np.ndarray] = []
        self._labels: list[np.ndarray] = []
        dropped, example = 0, None
        for image_id in self.image_ids:
            info = self.coco.imgs[image_id]
            boxes, labels = [], []
            for ann in self.coco.imgToAnns.get(image_id, []):
                if ann.get("iscrowd", 0):
                    continue
                x, y, w, h = (float(v) for v in ann["bbox"])
                x1, x2 = min(max(x, 0.0), info["width"]), min(max(x + w, 0.0), info["width"])
                y1, y2 = min(max(y, 0.0), info["height"]), min(max(y + h, 0.0), info["height"])
                if x2 - x1 <= 1 or y2 - y1 <= 1:
                    dropped += 1
                    if example is None:
                        example = ann["id"]
                    continue
                boxes.append((x1, y1, x2, y2))
                labels.append(label_of[ann["category_id"]])
            self._boxes.append(np.asarray(boxes, dtype=np.float32).reshape(-1, 4))
            self._labels.append(np.asarray(labels, dtype=np.int64))
        if dropped:
            warnings.warn(
                f"{self.annotations_file}: dropped {dropped} degenerate box(es) (width or height <= 1 px "
                f"after clipping to the image), e.g. annotation id {example}",
                stacklevel=2,
            )

    @property
    def num_classes(self) -> int:
        return len(self.category_ids)

    def __len__(self) -> int:
        return len(self.image_ids)

    def aspect_ratio_groups(self) -> list[int]:
        """Per image, from the sizes in the annotation file: 1 if landscape (width / height > 1),
        else 0 (mmdet's group flag, for batching images of one orientation together)."""
        return [int(self.coco.imgs[i]["width"] / self.coco.imgs[i]["height"] > 1) for i in self.image_ids]

    def load_image(self, index: int) -> Image.Image:
        """The RGB image of sample ``index``, as stored on disk."""
        image_id = self.image_ids[index]
        info = self.coco.imgs[image_id]
        path = self.images_dir / info["file_name"]
        if not path.is_file():
            raise FileNotFoundError(f"image file {path} of image id {image_id} not found "
                                    f"(annotations: {self.annotations_file})")
        with Image.open(path) as img:
            image = img.convert("RGB")
        if image.size != (info["width"], info["height"]):
            raise ValueError(f"image file {path} of image id {image_id} is {image.width}x{image.height} "
                             f"but {self.annotations_file} says {info['width']}x{info['height']} (w x h)")
        return image

    def __getitem__(self, index: int) -> tuple[Tensor, Target]:
        image = tv_tensors.Image(F.pil_to_tensor(self.load_image(index)))
        return transformed_sample(image, torch.from_numpy(self._boxes[index]), torch.from_numpy(self._labels[index]),
                                  self.transforms, self.image_ids[index])


def transformed_sample(image: tv_tensors.Image, boxes: Tensor, labels: Tensor, transforms: Transform | None,
                       image_id: int = -1) -> tuple[Tensor, Target]:
    """``transforms`` applied to an image (3, H, W) uint8 RGB with its boxes (N, 4) xyxy absolute
    and labels (N,): the returned image and its Target (boxes in the returned image, ``orig_size``
    (H, W), ``content_size`` when the transforms report one)."""
    height, width = image.shape[-2:]
    target = {"boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(height, width)), "labels": labels}
    if transforms is not None:
        image, target = transforms(image, target)
    content = target.get("content_size")
    return image.as_subclass(Tensor), Target(
        boxes=target["boxes"].as_subclass(Tensor),
        labels=target["labels"],
        image_id=image_id,
        orig_size=(height, width),
        content_size=None if content is None else (int(content[0]), int(content[1])),
    )


def _load_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"annotation file {path} not found")
    try:
        data = COCO.load_json(str(path))
    except json.JSONDecodeError as err:
        raise ValueError(f"annotation file {path} is not valid JSON: {err}") from err
    if not isinstance(data, dict):
        raise ValueError(f"annotation file {path}: expected a JSON object, got {type(data).__name__}")
    return data


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _file_names_from_coco_urls(data: dict[str, Any]) -> None:
    """LVIS v1 files name their images by ``coco_url`` only: such an image gets the file name
    "<split>/<file>" from its URL (e.g. "val2017/000000397133.jpg"), relative to a COCO root
    images folder, as the released LVIS configs use."""
    for img in data.get("images") or []:
        if isinstance(img, dict) and "file_name" not in img and isinstance(img.get("coco_url"), str):
            img["file_name"] = "/".join(img["coco_url"].split("/")[-2:])


def _validate(data: dict[str, Any], path: Path) -> None:
    """Check the fields CocoDetection relies on; errors name the file, the record and the field."""
    for key in ("images", "categories"):
        if not isinstance(data.get(key), list):
            raise ValueError(f"annotation file {path}: missing or malformed top-level list {key!r}")
    data.setdefault("annotations", [])
    if not isinstance(data["annotations"], list):
        raise ValueError(f"annotation file {path}: 'annotations' must be a list")

    cat_ids: set[int] = set()
    for i, cat in enumerate(data["categories"]):
        where = f"annotation file {path}: category #{i}"
        if not isinstance(cat, dict) or not _is_int(cat.get("id")):
            raise ValueError(f"{where}: field 'id' missing or not an integer")
        if not isinstance(cat.get("name"), str):
            raise ValueError(f"{where} (id {cat['id']}): field 'name' missing or not a string")
        if cat["id"] in cat_ids:
            raise ValueError(f"{where}: duplicate category id {cat['id']}")
        cat_ids.add(cat["id"])

    image_ids: set[int] = set()
    for i, img in enumerate(data["images"]):
        if not isinstance(img, dict) or not _is_int(img.get("id")):
            raise ValueError(f"annotation file {path}: image #{i}: field 'id' missing or not an integer")
        where = f"annotation file {path}: image id {img['id']}"
        if img["id"] in image_ids:
            raise ValueError(f"{where}: duplicate image id")
        if not isinstance(img.get("file_name"), str):
            raise ValueError(f"{where}: field 'file_name' missing or not a string")
        for field in ("width", "height"):
            if not _is_int(img.get(field)) or img[field] <= 0:
                raise ValueError(f"{where}: field {field!r} missing or not a positive integer")
        image_ids.add(img["id"])

    ann_ids: set[int] = set()
    for i, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict) or not _is_int(ann.get("id")):
            raise ValueError(f"annotation file {path}: annotation #{i}: field 'id' missing or not an integer")
        where = f"annotation file {path}: annotation id {ann['id']}"
        if ann["id"] in ann_ids:
            raise ValueError(f"{where}: duplicate annotation id")
        ann_ids.add(ann["id"])
        if not _is_int(ann.get("image_id")) or ann["image_id"] not in image_ids:
            raise ValueError(f"{where}: field 'image_id' ({ann.get('image_id')!r}) is not an image id of the file")
        if not _is_int(ann.get("category_id")) or ann["category_id"] not in cat_ids:
            raise ValueError(f"{where}: field 'category_id' ({ann.get('category_id')!r}) is not a category id "
                             f"of the file")
        bbox = ann.get("bbox")
        if not isinstance(bbox, list) or len(bbox) != 4 or not all(_is_number(v) for v in bbox):
            raise ValueError(f"{where}: field 'bbox' must be [x, y, width, height] of finite numbers, got {bbox!r}")
        if ann.get("iscrowd", 0) not in (0, 1):
            raise ValueError(f"{where}: field 'iscrowd' must be 0 or 1, got {ann['iscrowd']!r}")
