"""COCO-format detection dataset (images folder + instances JSON)."""

from __future__ import annotations

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

from codetr.data.check import (DatasetReport, clip_box, fill_missing_areas, inspect_dataset, load_annotations,
                               size_mismatch_message)
from codetr.data.image import DEFAULT_MAX_IMAGE_PIXELS, open_image, read_header
from codetr.data.masks import decode_segmentation
from codetr.errors import DatasetError, ImageFileError
from codetr.structures import Target

# A transform takes and returns (image, {"boxes": BoundingBoxes xyxy, "labels": (N,) int64}), with
# "masks": tv_tensors.Mask (N, H, W) bool when the dataset has masks.
Transform = Callable[[tv_tensors.Image, dict[str, Tensor]], tuple[Tensor, dict[str, Tensor]]]
# Mixes a sample (image, Target) with a second one of the dataset (copy-paste), e.g. CopyPaste.
Mix = Callable[[tuple[Tensor, Target], tuple[Tensor, Target]], tuple[Tensor, Target]]


class CocoDetection(Dataset):
    """Detection samples of a COCO-format dataset.

    Loading runs the checks of :mod:`codetr.data.check` without decoding the images (every file
    present and readable, its upright size equal to the JSON's; fields, ids, references): errors
    raise a :class:`codetr.errors.DatasetError` listing them, warnings are issued once per kind.
    Images are read by :func:`codetr.data.image.open_image` (EXIF orientation applied, any mode to
    8-bit RGB; at most ``max_image_pixels`` pixels, None: no limit).

    Category ids of any numbering map to contiguous labels ``0..C-1`` in increasing id order:
    ``category_ids[label]`` is the dataset id, ``class_names[label]`` its name.
    Crowd boxes (``iscrowd=1``) are left out of the targets. Boxes are clipped to the image;
    boxes with width or height <= 1 px after clipping are left out. Images without annotations
    are kept with empty targets. Annotations without ``area`` get the box area (for the metrics).

    ``__getitem__(i)`` returns ``(image, Target)``: with ``transforms``, whatever they return
    (for :func:`codetr.data.build_transforms`: (3, H, W) float normalised); without, the image as
    read, (3, H, W) uint8 RGB. ``Target.boxes`` are xyxy absolute in the returned image.

    ``with_masks``: ``Target.masks`` (N, h, w) bool, each training box's ``segmentation`` (polygons or
    RLE, :mod:`codetr.data.masks`) decoded and moved by the transforms with the image; the checks
    then require a usable segmentation of every non-crowd annotation. Without, ``Target.masks`` is
    None and segmentations are never decoded. ``mix``: each sample is mixed with a second one drawn
    uniformly from the dataset (copy-paste, :class:`codetr.data.copy_paste.CopyPaste`).
    """

    def __init__(self, images_dir: str | Path, annotations_file: str | Path, transforms: Transform | None = None,
                 max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS, with_masks: bool = False,
                 mix: Mix | None = None) -> None:
        self.images_dir = Path(images_dir)
        self.annotations_file = Path(annotations_file)
        self.transforms = transforms
        self.max_image_pixels = max_image_pixels
        self.with_masks = with_masks
        self.mix = mix
        dataset = load_annotations(self.annotations_file)
        self.report = DatasetReport(self.annotations_file, self.images_dir, masks=with_masks, segmentations=with_masks)
        inspect_dataset(dataset, self.report, decode=False, max_pixels=max_image_pixels)
        self.report.raise_errors()
        self.report.warn()
        dataset.setdefault("annotations", [])
        fill_missing_areas(dataset)
        self.coco = COCO(dataset)
        self.category_ids: list[int] = sorted(self.coco.cats)
        self.class_names: list[str] = [self.coco.cats[c]["name"] for c in self.category_ids]
        self.image_ids: list[int] = [img["id"] for img in dataset["images"]]
        label_of = {cat_id: label for label, cat_id in enumerate(self.category_ids)}

        # (N, 4) xyxy absolute clipped boxes, (N,) labels and N segmentations (with_masks) per image,
        # in image_ids order.
        self._boxes: list[np.ndarray] = []
        self._labels: list[np.ndarray] = []
        self._segmentations: list[list[Any]] = []
        for image_id in self.image_ids:
            info = self.coco.imgs[image_id]
            boxes, labels, segmentations = [], [], []
            for ann in self.coco.imgToAnns.get(image_id, []):
                box = None if ann.get("iscrowd", 0) else clip_box(ann["bbox"], info["width"], info["height"])
                if box is not None:
                    boxes.append(box)
                    labels.append(label_of[ann["category_id"]])
                    segmentations.append(ann.get("segmentation") if with_masks else None)
            self._boxes.append(np.asarray(boxes, dtype=np.float32).reshape(-1, 4))
            self._labels.append(np.asarray(labels, dtype=np.int64))
            self._segmentations.append(segmentations)

    @property
    def num_classes(self) -> int:
        return len(self.category_ids)

    @property
    def num_boxes(self) -> int:
        """Training boxes (crowds and degenerate boxes left out) over all images."""
        return sum(len(boxes) for boxes in self._boxes)

    def __len__(self) -> int:
        return len(self.image_ids)

    def aspect_ratio_groups(self) -> list[int]:
        """Per image, from the sizes in the annotation file: 1 if landscape (width / height > 1),
        else 0 (mmdet's group flag, for batching images of one orientation together)."""
        return [int(self.coco.imgs[i]["width"] / self.coco.imgs[i]["height"] > 1) for i in self.image_ids]

    def load_image(self, index: int) -> Image.Image:
        """The RGB image of sample ``index``, upright (EXIF orientation applied)."""
        image_id = self.image_ids[index]
        info = self.coco.imgs[image_id]
        path = self.images_dir / info["file_name"]
        try:
            image = open_image(path, self.max_image_pixels)
        except ImageFileError as err:
            raise ImageFileError(f"{err} (image id {image_id} of {self.annotations_file})") from None
        if image.size != (info["width"], info["height"]):
            raise DatasetError(size_mismatch_message(path, image_id, read_header(path, self.max_image_pixels),
                                                     (info["width"], info["height"]), self.annotations_file))
        return image

    def load_masks(self, index: int) -> Tensor | None:
        """(N, H, W) bool masks of the training boxes of sample ``index`` in the image as stored, or
        None without ``with_masks``."""
        if not self.with_masks:
            return None
        info = self.coco.imgs[self.image_ids[index]]
        height, width = info["height"], info["width"]
        masks = [decode_segmentation(segmentation, height, width) for segmentation in self._segmentations[index]]
        return torch.from_numpy(np.stack(masks)) if masks else torch.zeros((0, height, width), dtype=torch.bool)

    def sample(self, index: int) -> tuple[Tensor, Target]:
        """Sample ``index`` through the transforms, without ``mix``."""
        image = tv_tensors.Image(F.pil_to_tensor(self.load_image(index)))
        return transformed_sample(image, torch.from_numpy(self._boxes[index]), torch.from_numpy(self._labels[index]),
                                  self.transforms, self.image_ids[index], self.load_masks(index))

    def __getitem__(self, index: int) -> tuple[Tensor, Target]:
        sample = self.sample(index)
        if self.mix is None:
            return sample
        return self.mix(sample, self.sample(int(torch.randint(len(self), ()))))


def transformed_sample(image: tv_tensors.Image, boxes: Tensor, labels: Tensor, transforms: Transform | None,
                       image_id: int = -1, masks: Tensor | None = None) -> tuple[Tensor, Target]:
    """``transforms`` applied to an image (3, H, W) uint8 RGB with its boxes (N, 4) xyxy absolute,
    labels (N,) and masks (N, H, W) bool or None: the returned image and its Target (boxes and masks
    in the returned image, ``orig_size`` (H, W), ``content_size`` when the transforms report one)."""
    height, width = image.shape[-2:]
    target = {"boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(height, width)), "labels": labels}
    if masks is not None:
        target["masks"] = tv_tensors.Mask(masks)
    if transforms is not None:
        image, target = transforms(image, target)
    content = target.get("content_size")
    return image.as_subclass(Tensor), Target(
        boxes=target["boxes"].as_subclass(Tensor),
        labels=target["labels"],
        image_id=image_id,
        orig_size=(height, width),
        content_size=None if content is None else (int(content[0]), int(content[1])),
        masks=None if masks is None else target["masks"].as_subclass(Tensor).bool(),
    )
