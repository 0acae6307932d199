"""Run a detector on image files: drawings and COCO-style results (``codetr predict``)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from PIL import Image
from torch import Tensor
from torchvision.transforms.v2 import functional as F

from codetr.config_parsing import check_unit_interval
from codetr.data.image import read_image
from codetr.errors import UserError
from codetr.files import atomic_write, atomic_write_text, check_writable_folder, remove_interrupted_writes
from codetr.inference.evaluate import detection_records
from codetr.inference.loading import ImageDetector
from codetr.inference.visualize import draw_detections
from codetr.structures import Detections

PREDICTIONS_NAME = "predictions.json"
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}


def list_images(source: str | Path) -> list[Path]:
    """``source`` if it is an image file, else the image files directly inside the folder (not in its
    sub-folders: a note on stderr says how many were left out)."""
    source = Path(source)
    if source.is_file():
        return [source]
    if source.is_dir():
        entries = sorted(source.iterdir())
        images = [p for p in entries if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()]
        folders = [p.name for p in entries if p.is_dir()]
        if folders:
            shown = ", ".join(folders[:3]) + (" ..." if len(folders) > 3 else "")
            print(f"note: {source} holds {len(folders)} sub-folder(s) ({shown}); only the images directly in it are "
                  "read (give a sub-folder as IMAGE_OR_DIR to run on its images)", file=sys.stderr)
        if images:
            return images
        raise FileNotFoundError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in folder {source}")
    raise FileNotFoundError(f"image or folder {source} not found")


def _image_format(path: Path) -> str:
    """Pillow's name of the format of an image file name (``.jpg``: JPEG)."""
    return Image.registered_extensions()[path.suffix.lower()]


def check_prediction_outputs(images: list[Path], out_dir: str | Path, score_thr: float) -> None:
    """The checks of :func:`predict_images`, before a model loads: a UserError when ``score_thr`` is
    not in [0, 1], when writing the drawings or ``predictions.json`` into ``out_dir`` would write
    over one of ``images`` (e.g. ``--out`` is the input folder), or ``out_dir`` is not writable. Removes
    the temporary files an interrupted earlier run left there."""
    check_unit_interval(score_thr, "--score-thr")
    out_dir = Path(out_dir)
    outputs = {out_dir / path.name: path for path in images}
    outputs.update({out_dir / PREDICTIONS_NAME: path for path in images if path.name == PREDICTIONS_NAME})
    clashes = [path for out, path in outputs.items() if out.exists() and path.exists() and os.path.samefile(out, path)]
    if clashes:
        names = ", ".join(p.name for p in clashes[:3]) + (" ..." if len(clashes) > 3 else "")
        raise UserError(f"--out {out_dir}: writing the drawings there would overwrite {len(clashes)} input image(s) "
                        f"({names}); choose another output folder")
    check_writable_folder(out_dir, "--out")
    remove_interrupted_writes(out_dir, [PREDICTIONS_NAME, *(path.name for path in images)])


def select_detections(det: Detections, keep: Tensor) -> Detections:
    """The detections (and their masks and mask scores, if any) that ``keep`` (bool (K,) or indices) selects."""
    return Detections(det.boxes[keep], det.scores[keep], det.labels[keep],
                      None if det.masks is None else det.masks[keep],
                      None if det.mask_scores is None else det.mask_scores[keep])


def predict_images(detector: ImageDetector, images: list[Path], out_dir: str | Path,
                   score_thr: float = 0.3) -> list[dict[str, Any]]:
    """Detect objects in ``images``; write drawings and ``predictions.json`` into ``out_dir``.

    Returns the records written: ``file_name``, ``category_id`` (dataset id), ``category_name``,
    ``bbox`` (xywh in pixels of the original image) and ``score``, for scores >= ``score_thr``; a
    model that yields masks adds ``segmentation`` (COCO compressed RLE in the original image,
    ``counts`` a string: ``pycocotools.mask.decode`` reads it) and, with a mask IoU head,
    ``mask_score`` (the mask's own score, box score x predicted IoU), and draws them.
    Never writes over an input image (:func:`check_prediction_outputs`). An image that cannot be
    read is reported on stderr and skipped; when any was, a UserError at the end counts them (the
    predictions of the others are written). ``score_thr`` outside [0, 1] is a UserError.
    """
    check_prediction_outputs(images, out_dir, score_thr)
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
        found = detection_records(select_detections(det, det.scores >= score_thr), 0, category_ids)
        drawing = draw_detections(F.to_pil_image(pixels), found, class_names, category_ids)
        atomic_write(out_dir / path.name, lambda f: drawing.save(f, format=_image_format(path)))
        for rec in found:
            records.append({"file_name": path.name, "category_id": rec["category_id"],
                            "category_name": class_names[label_of[rec["category_id"]]],
                            "bbox": rec["bbox"], "score": rec["score"],
                            **{key: rec[key] for key in ("segmentation", "mask_score") if key in rec}})
    atomic_write_text(out_dir / PREDICTIONS_NAME, json.dumps(records, indent=1))
    if failed:
        names = ", ".join(p.name for p in failed[:5]) + (" ..." if len(failed) > 5 else "")
        raise UserError(f"{len(failed)} of {len(images)} images could not be read ({names}; reasons above); the "
                        f"predictions of the other {len(images) - len(failed)} are in {out_dir}")
    return records
