"""Checks of a COCO-format detection dataset: the annotation JSON, the image files, and both together.

``codetr data check ANNOTATIONS --images DIR`` runs them all (:func:`check_dataset`), decoding every
image unless ``--no-decode``, and prints a :class:`DatasetReport`. :class:`codetr.data.CocoDetection`
runs the same checks without the decode (a stat and a header read per image) when a dataset is
loaded: errors stop the loading, warnings are printed once per kind.

Problems come in three severities: an error makes the dataset unusable as it is (or the results
silently wrong); a warning is something the loader repairs or leaves out (clipped or dropped boxes,
a missing ``area``) that the user may want to fix; a note is worth knowing only.
"""

from __future__ import annotations

import json
import math
import operator
import posixpath
import warnings
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from faster_coco_eval import COCO

from codetr.data.image import DEFAULT_MAX_IMAGE_PIXELS, ORIENTATIONS, SWAPS_AXES, ImageHeader, open_image, read_header
from codetr.data.masks import MIN_POLYGON_NUMBERS, polygon_parts, rle_runs
from codetr.errors import DatasetError, FileMissingError, ImageFileError

ERROR, WARNING, NOTE = "error", "warning", "note"
# kind -> (severity, what one occurrence is)
KINDS: dict[str, tuple[str, str]] = {
    "json": (ERROR, "annotation file unreadable"),
    "structure": (ERROR, "top-level list missing or malformed"),
    "no_images": (ERROR, "no images"),
    "category_field": (ERROR, "category with a missing or malformed field"),
    "category_duplicate": (ERROR, "duplicate category id"),
    "image_field": (ERROR, "image record with a missing or malformed field"),
    "image_duplicate": (ERROR, "duplicate image id"),
    "file_outside": (ERROR, "file name outside the images folder (absolute, or '..' leading out)"),
    "annotation_field": (ERROR, "annotation with a missing or malformed field"),
    "annotation_duplicate": (ERROR, "duplicate annotation id"),
    "image_id_unknown": (ERROR, "annotation of an image id that 'images' does not define"),
    "category_undefined": (ERROR, "annotation of a category id that 'categories' does not define"),
    "file_missing": (ERROR, "image file missing"),
    "file_unreadable": (ERROR, "image file unreadable (not an image, truncated, corrupt, or over data.max_image_pixels)"),
    "size_mismatch": (ERROR, "image size differs from the JSON width x height"),
    "no_annotations": (WARNING, "no annotations to learn from or evaluate on"),
    "area_missing": (WARNING, "annotation without 'area' (evaluation uses the box area w*h)"),
    "box_empty": (WARNING, "box with zero or negative width or height (left out)"),
    "box_outside": (WARNING, "box outside its image (left out)"),
    "box_tiny": (WARNING, "box at most 1 px wide or high inside its image (left out)"),
    "box_clipped": (WARNING, "box reaching more than 1 px beyond its image (clipped)"),
    "annotation_repeated": (WARNING, "annotation repeated (same image, category and box)"),
    "file_name_duplicate": (WARNING, "image file listed by several image records"),
    "category_name_duplicate": (WARNING, "category name given to several ids"),
    "segmentation_missing": (WARNING, "annotation without a segmentation (data.with_masks needs one)"),
    "segmentation_field": (WARNING, "segmentation that is neither polygons nor RLE (unreadable)"),
    "segmentation_rle_size": (WARNING, "RLE segmentation whose size is not its image's"),
    "segmentation_points": (WARNING, "polygon with fewer than three points (left out of its mask)"),
    "segmentation_outside": (WARNING, "segmentation outside its image (an empty mask)"),
    "segmentation_empty": (WARNING, "segmentation without area (an empty mask)"),
    "orientation_unverified": (WARNING, "EXIF orientation that keeps the image's width x height: the sizes cannot "
                                        "confirm that the boxes were drawn on the upright image"),
    "category_unused": (NOTE, "category without annotations"),
}
# Warnings that are errors when the masks are needed (DatasetReport.masks): no mask can be made.
MASK_ERRORS = ("segmentation_missing", "segmentation_field", "segmentation_rle_size")
MAX_EXAMPLES = 20  # occurrences kept per kind
BOX_TOLERANCE = 1.0  # px a box may reach beyond its image before it is reported as clipped
SMALL_SIDE, LARGE_SIDE = 32, 96  # COCO's object size split (areas SIDE**2), here of the box area w*h in image pixels


@dataclass
class DatasetReport:
    """Problems found in a dataset: a count and the first occurrences (messages naming the ids)
    per kind of :data:`KINDS`, and what the dataset holds (``stats``). ``masks``: the instance masks
    are needed (``data.with_masks``): every non-crowd annotation needs a segmentation, and the
    :data:`MASK_ERRORS` are errors. ``segmentations``: check the segmentations at all (box-only
    loading skips them: seconds on COCO)."""

    annotations_file: Path
    images_dir: Path
    masks: bool = False
    segmentations: bool = True
    counts: Counter[str] = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)
    stats: Counter[str] = field(default_factory=Counter)

    def add(self, kind: str, message: str) -> None:
        self.counts[kind] += 1
        kept = self.examples.setdefault(kind, [])
        if len(kept) < MAX_EXAMPLES:
            kept.append(message)

    def severity(self, kind: str) -> str:
        return ERROR if self.masks and kind in MASK_ERRORS else KINDS[kind][0]

    def kinds(self, severity: str) -> list[str]:
        """The kinds of ``severity`` found, in the order of :data:`KINDS`."""
        return [kind for kind in KINDS if self.severity(kind) == severity and self.counts[kind]]

    @property
    def num_errors(self) -> int:
        return sum(self.counts[kind] for kind in self.kinds(ERROR))

    def lines(self, kinds: list[str], examples: int = 3) -> list[str]:
        """Per kind: its description and count, then its first ``examples`` occurrences."""
        out = []
        for kind in kinds:
            count = self.counts[kind]
            of = f" of {self.stats['images']} images" if kind in ("file_missing", "file_unreadable") else ""
            out.append(f"  {KINDS[kind][1]}: {count}{of}")
            out += [f"    {message}" for message in self.examples[kind][:examples]]
            if count > examples:
                out.append(f"    ... and {count - examples} more")
        return out

    def summary(self) -> str:
        """What the dataset holds, in one line."""
        s = self.stats
        return (f"{s['images']} images ({s['images_without_annotations']} without annotations, {s['oriented']} with "
                f"an EXIF orientation, read upright), {s['annotations']} annotations ({s['crowd']} crowd, "
                f"{s['segmented']} with a segmentation), {s['categories']} categories")

    def format(self, examples: int = 3) -> str:
        """The report ``codetr data check`` prints."""
        out = [f"annotations  {self.annotations_file}", f"images       {self.images_dir}", f"contents     {self.summary()}"]
        s = self.stats
        if s["small"] + s["medium"] + s["large"]:
            out.append(f"box sizes    {s['small']} small (area < {SMALL_SIDE} x {SMALL_SIDE} px), {s['medium']} medium, "
                       f"{s['large']} large (>= {LARGE_SIDE} x {LARGE_SIDE} px): COCO's split, of the usable non-crowd "
                       "boxes in the images' own pixels")
        for severity, title in ((ERROR, "errors"), (WARNING, "warnings"), (NOTE, "notes")):
            kinds = self.kinds(severity)
            if kinds:
                out += ["", f"{title}:", *self.lines(kinds, examples)]
        errors, warned = self.num_errors, sum(self.counts[k] for k in self.kinds(WARNING))
        verdict = "fix the errors before training or evaluating" if errors else "usable"
        out += ["", f"result: {_plural(errors, 'error')}, {_plural(warned, 'warning')}: {verdict}"]
        return "\n".join(out)

    def raise_errors(self) -> None:
        """Raise a :class:`DatasetError` listing the errors found, if any."""
        kinds = self.kinds(ERROR)
        if kinds:
            raise DatasetError("\n".join([
                f"annotation file {self.annotations_file} (images {self.images_dir}): {_plural(self.num_errors, 'error')}",
                *self.lines(kinds),
                f"(`codetr data check {self.annotations_file} --images {self.images_dir}` reports every problem)"]))

    def warn(self) -> None:
        """One Python warning per kind of warning found; not "no_annotations", which the caller
        turns into an error or not (training may allow background-only images)."""
        for kind in self.kinds(WARNING):
            if kind == "no_annotations":
                continue
            shown = "; ".join(self.examples[kind][:2])
            more = f"; and {self.counts[kind] - 2} more" if self.counts[kind] > 2 else ""
            warnings.warn(f"{self.annotations_file}: {KINDS[kind][1]}: {self.counts[kind]}, e.g. {shown}{more}",
                          stacklevel=3)


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" + ("" if count == 1 else "s")


# ------------------------------------------------------------------------------------ the JSON


def load_annotations(path: str | Path) -> dict[str, Any]:
    """The JSON object of a COCO-format annotation file. LVIS v1 files name their images by
    ``coco_url`` only: such an image gets the file name "<split>/<file>" from its URL (e.g.
    "val2017/000000397133.jpg"), relative to a COCO root images folder, as the released LVIS
    configs use."""
    path = Path(path)
    if not path.is_file():
        raise FileMissingError(f"annotation file {path} not found")
    try:
        data = COCO.load_json(str(path))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DatasetError(f"annotation file {path} is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise DatasetError(f"annotation file {path}: expected a JSON object, got {type(data).__name__}")
    for img in data.get("images") if isinstance(data.get("images"), list) else []:
        if isinstance(img, dict) and "file_name" not in img and isinstance(img.get("coco_url"), str):
            img["file_name"] = "/".join(img["coco_url"].split("/")[-2:])
    return data


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def leaves_folder(file_name: str) -> bool:
    """Whether ``file_name`` (a path relative to the images folder) could name a file outside it:
    absolute (also Windows-style), or '..' leading out of the folder."""
    name = file_name.replace("\\", "/")
    if name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        return True
    return posixpath.normpath(name).split("/")[0] == ".."


def clip_box(bbox: list[float], width: int, height: int) -> tuple[float, float, float, float] | None:
    """A COCO box [x, y, w, h] as xyxy absolute clipped to the image; None when it is at most
    1 px wide or high after clipping (left out of the training targets)."""
    x, y, w, h = (float(v) for v in bbox)
    x1, x2 = min(max(x, 0.0), width), min(max(x + w, 0.0), width)
    y1, y2 = min(max(y, 0.0), height), min(max(y + h, 0.0), height)
    if x2 - x1 <= 1 or y2 - y1 <= 1:
        return None
    return x1, y1, x2, y2


def box_problem(bbox: list[float], width: int, height: int) -> str | None:
    """The kind of problem of a box [x, y, w, h] in an image of ``width`` x ``height``, or None."""
    x, y, w, h = (float(v) for v in bbox)
    if w <= 0 or h <= 0:
        return "box_empty"
    if x >= width or y >= height or x + w <= 0 or y + h <= 0:
        return "box_outside"
    if clip_box(bbox, width, height) is None:
        return "box_tiny"
    if x < -BOX_TOLERANCE or y < -BOX_TOLERANCE or x + w > width + BOX_TOLERANCE or y + h > height + BOX_TOLERANCE:
        return "box_clipped"
    return None


def check_annotations(data: dict[str, Any], report: DatasetReport) -> dict[int, dict[str, Any]]:
    """Check the structure, fields, ids, references and boxes of a COCO-format JSON object into
    ``report``. Returns the image records fit for the file checks (valid fields), by image id."""
    lists = {key: data.get(key) for key in ("images", "categories")}
    lists["annotations"] = data.get("annotations", [])
    for key, value in lists.items():
        if not isinstance(value, list):
            report.add("structure", f"top-level {key!r} must be a list, got {type(value).__name__}")
    if report.counts["structure"]:
        return {}
    categories = _check_categories(lists["categories"], report)
    image_ids, images = _check_images(lists["images"], report)
    _check_annotation_records(data, lists["annotations"], image_ids, images, categories, report)
    report.stats.update(images=len(lists["images"]), categories=len(lists["categories"]))
    if not lists["images"]:
        report.add("no_images", "the 'images' list is empty")
    return images


def _identified(records: list[Any], kind: str, report: DatasetReport,
                keep_duplicates: bool = False) -> Iterator[tuple[int, dict[str, Any]]]:
    """(id, record) of each record of ``kind`` ("category", "image", "annotation") that is a dict
    with an integer 'id'. The others are reported (``{kind}_field``), and so are repeated ids
    (``{kind}_duplicate``), which are left out unless ``keep_duplicates``."""
    seen: set[int] = set()
    for i, record in enumerate(records):
        if not isinstance(record, dict) or not _is_int(record.get("id")):
            report.add(f"{kind}_field", f"{kind} #{i}: field 'id' missing or not an integer")
            continue
        record_id = record["id"]
        if record_id in seen:
            report.add(f"{kind}_duplicate", f"{kind} id {record_id} ({kind} #{i})")
            if not keep_duplicates:
                continue
        seen.add(record_id)
        yield record_id, record


def _check_categories(categories: list[Any], report: DatasetReport) -> dict[int, str]:
    names: dict[str, int] = {}
    valid: dict[int, str] = {}
    for cat_id, cat in _identified(categories, "category", report):
        name = cat.get("name")
        valid[cat_id] = name if isinstance(name, str) else ""
        if not isinstance(name, str):
            report.add("category_field", f"category id {cat_id}: field 'name' missing or not a string")
        elif name in names:
            report.add("category_name_duplicate", f"category ids {names[name]} and {cat_id} are both {name!r}")
        else:
            names[name] = cat_id
    return valid


def _check_images(images: list[Any], report: DatasetReport) -> tuple[set[int], dict[int, dict[str, Any]]]:
    """Every image id defined, and the records whose fields are all valid."""
    ids: set[int] = set()
    valid: dict[int, dict[str, Any]] = {}
    files: dict[str, int] = {}
    for image_id, img in _identified(images, "image", report):
        ids.add(image_id)
        ok = True
        name = img.get("file_name")
        if not isinstance(name, str) or not name:
            report.add("image_field", f"image id {image_id}: field 'file_name' missing or not a string")
            ok = False
        elif leaves_folder(name):
            report.add("file_outside", f"image id {image_id}: file_name {name!r} reads outside the images folder")
            ok = False
        for key in ("width", "height"):
            if not _is_int(img.get(key)) or img[key] <= 0:
                report.add("image_field", f"image id {image_id}: field {key!r} missing or not a positive integer "
                                          f"({img.get(key)!r})")
                ok = False
        if not ok:
            continue
        valid[image_id] = img
        if name in files:
            report.add("file_name_duplicate", f"{name} is listed by image ids {files[name]} and {image_id}")
        else:
            files[name] = image_id
    return ids, valid


def _check_annotation_records(data: dict[str, Any], annotations: list[Any], image_ids: set[int],
                              images: dict[int, dict[str, Any]], categories: dict[int, str],
                              report: DatasetReport) -> None:
    boxes_seen: dict[tuple[Any, ...], int] = {}
    annotated: set[int] = set()
    used: set[int] = set()
    crowd = usable = 0
    for ann_id, ann in _identified(annotations, "annotation", report, keep_duplicates=True):
        where = f"annotation id {ann_id}"
        image_id, cat_id, bbox = ann.get("image_id"), ann.get("category_id"), ann.get("bbox")
        if not _is_int(image_id) or image_id not in image_ids:
            report.add("image_id_unknown", f"{where}: field 'image_id' ({image_id!r}) is not an image id of the file")
            continue
        if not _is_int(cat_id) or cat_id not in categories:
            report.add("category_undefined", f"{where}: field 'category_id' ({cat_id!r}) is not a category id of "
                                             f"the file")
            continue
        if not isinstance(bbox, list) or len(bbox) != 4 or not all(_is_number(v) for v in bbox):
            report.add("annotation_field", f"{where}: field 'bbox' must be [x, y, width, height] of finite numbers, "
                                           f"got {bbox!r}")
            continue
        if ann.get("iscrowd", 0) not in (0, 1):
            report.add("annotation_field", f"{where}: field 'iscrowd' must be 0 or 1, got {ann['iscrowd']!r}")
            continue
        if ann.get("area") is None:
            report.add("area_missing", f"{where} (image id {image_id})")
        elif not _is_number(ann["area"]) or ann["area"] < 0:
            report.add("annotation_field", f"{where}: field 'area' must be a non-negative number, got {ann['area']!r}")
            continue
        annotated.add(image_id)
        used.add(cat_id)
        img = images.get(image_id)
        if ann.get("segmentation") is not None:
            report.stats["segmented"] += 1
            if img is not None and (report.segmentations or report.masks):
                _check_segmentation(ann["segmentation"], img, f"{where} (image id {image_id})", report)
        elif report.masks and not ann.get("iscrowd", 0):
            report.add("segmentation_missing", f"{where} (image id {image_id})")
        if ann.get("iscrowd", 0):
            crowd += 1
            continue
        key = (image_id, cat_id, *bbox)
        if key in boxes_seen:
            report.add("annotation_repeated", f"annotation ids {boxes_seen[key]} and {ann_id} (image id "
                                              f"{image_id}, category id {cat_id}, bbox {bbox})")
        boxes_seen.setdefault(key, ann_id)
        if img is None:
            continue  # its image record is malformed: reported there
        problem = box_problem(bbox, img["width"], img["height"])
        if problem is not None:
            report.add(problem, f"{where} (image id {image_id}, {img['width']}x{img['height']}): bbox {bbox}")
        if problem in (None, "box_clipped"):
            usable += 1
            report.stats[box_size(bbox)] += 1
    report.stats.update(annotations=len(annotations), crowd=crowd,
                        images_without_annotations=len(image_ids - annotated))
    if not usable and image_ids:
        if "annotations" not in data:
            reason = "the file has no 'annotations' list"
        elif not annotations:
            reason = "its 'annotations' list is empty"
        elif crowd == len(annotations):
            reason = f"all {crowd} annotations are crowd regions (iscrowd=1), which are not training targets"
        else:
            reason = f"none of its {len(annotations)} annotations is a usable box ({crowd} crowd, the others invalid " \
                     f"or left out)"
        report.add("no_annotations", reason)
    if usable:
        for cat_id, name in categories.items():
            if cat_id not in used:
                report.add("category_unused", f"category id {cat_id} ({name!r})")


def box_size(bbox: list[float]) -> str:
    """COCO's size class of an [x, y, w, h] box by its area w*h: "small", "medium" or "large"."""
    area = bbox[2] * bbox[3]
    return "small" if area < SMALL_SIDE**2 else "medium" if area < LARGE_SIDE**2 else "large"


def _check_segmentation(segmentation: Any, img: dict[str, Any], where: str, report: DatasetReport) -> None:
    """Report what is wrong with one annotation's ``segmentation`` (polygons or RLE) in ``img``.
    (Plain Python on purpose: COCO's 860k polygons are checked in seconds.)"""
    width, height = img["width"], img["height"]
    if isinstance(segmentation, dict):
        _check_rle(segmentation, width, height, where, report)
        return
    if not isinstance(segmentation, list) or not all(_is_polygon(part) for part in segmentation):
        report.add("segmentation_field", f"{where}: 'segmentation' must be polygons [[x1, y1, x2, y2, ...], ...] of "
                                         f"finite numbers (an even count) or RLE {{'size', 'counts'}}")
        return
    for part in segmentation:
        if len(part) < MIN_POLYGON_NUMBERS:
            report.add("segmentation_points", f"{where}: polygon {part} has {len(part) // 2} point(s)")
    parts = polygon_parts(segmentation)
    if segmentation and not parts:
        return  # every part too short: reported above
    xs = [min(min(part[0::2]) for part in parts), max(max(part[0::2]) for part in parts)] if parts else []
    ys = [min(min(part[1::2]) for part in parts), max(max(part[1::2]) for part in parts)] if parts else []
    if parts and (xs[1] <= 0 or xs[0] >= width or ys[1] <= 0 or ys[0] >= height):
        report.add("segmentation_outside", f"{where}, {width}x{height}: polygon x in {xs}, y in {ys}")
    elif not any(_shoelace(part) for part in parts):
        report.add("segmentation_empty", f"{where}: polygons {segmentation}")


def _is_polygon(part: Any) -> bool:
    """Whether ``part`` is a list of an even count of finite numbers (their sum is finite, and a
    string, list or None makes it fail)."""
    if not isinstance(part, list) or len(part) % 2 or bool in map(type, part):
        return False
    try:
        return math.isfinite(sum(part))
    except TypeError:
        return False


def _shoelace(part: list[float]) -> float:
    """Area of a polygon [x1, y1, x2, y2, ...] (the shoelace formula)."""
    xs, ys = part[0::2], part[1::2]
    return 0.5 * abs(sum(map(operator.mul, xs, ys[1:] + ys[:1])) - sum(map(operator.mul, ys, xs[1:] + xs[:1])))


def _check_rle(rle: dict[str, Any], width: int, height: int, where: str, report: DatasetReport) -> None:
    size, counts = rle.get("size"), rle.get("counts")
    if (not isinstance(size, list) or len(size) != 2 or not all(_is_int(v) for v in size)
            or not (isinstance(counts, str) or (isinstance(counts, list) and all(_is_int(v) and v >= 0 for v in counts)))):
        report.add("segmentation_field", f"{where}: RLE 'segmentation' needs 'size' [height, width] and 'counts' (a "
                                         f"string, or a list of non-negative integers)")
        return
    if size != [height, width]:
        report.add("segmentation_rle_size", f"{where}: RLE size {size} but the image is [{height}, {width}] "
                                            f"(height, width)")
        return
    if isinstance(counts, str):
        try:
            counts = rle_runs(counts)
        except ValueError as err:
            report.add("segmentation_field", f"{where}: RLE counts unreadable ({err})")
            return
    if sum(counts) != height * width:
        report.add("segmentation_rle_size", f"{where}: RLE counts cover {sum(counts)} pixels, the {height}x{width} "
                                            f"image {height * width}")
        return
    if sum(counts[1::2]) == 0:
        report.add("segmentation_empty", f"{where}: RLE without a pixel")


# ------------------------------------------------------------------------------- the image files


def size_mismatch_message(path: Path, image_id: int, header: ImageHeader, json_size: tuple[int, int],
                          annotations_file: Path) -> str:
    """Why an image's size (``header``, upright) differs from its JSON ``width`` x ``height``,
    naming the EXIF orientation when it explains the difference."""
    (width, height), (json_w, json_h), orientation = header.size, json_size, header.orientation
    text = f"image file {path} of image id {image_id} is {width}x{height}"
    if orientation != 1:
        text += f" after its EXIF orientation {orientation} ({ORIENTATIONS[orientation]})"
    text += f" but {annotations_file} says {json_w}x{json_h} (w x h)"
    if orientation in SWAPS_AXES and json_size == (header.stored_width, header.stored_height):
        text += (": the JSON size is that of the pixels before the EXIF rotation, so the annotations were most "
                 "likely made on the unrotated image (codetr reads it upright, as photo viewers and mmcv do): remove "
                 "the file's EXIF orientation tag, or rotate the boxes and swap width and height in the JSON")
    elif json_size == (height, width):
        text += ": width and height are swapped (was the image rotated after it was annotated?)"
    return text


def check_files(images: dict[int, dict[str, Any]], report: DatasetReport, decode: bool = False,
                max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> None:
    """Check that every image file exists and is readable, and that its upright size (EXIF
    orientation applied) is the JSON's ``width`` x ``height``. Without ``decode``, from its header
    only (a stat and a few kB read per file); with ``decode``, the whole image is decoded too."""
    for image_id, img in images.items():
        path = report.images_dir / img["file_name"]
        if not path.is_file():
            report.add("file_missing", f"{img['file_name']} (image id {image_id})")
            continue
        try:
            header = read_header(path, max_pixels)
            if decode:
                open_image(path, max_pixels)
        except ImageFileError as err:
            report.add("file_unreadable", f"{err} (image id {image_id})")
            continue
        json_size = (img["width"], img["height"])
        if header.orientation != 1:
            report.stats["oriented"] += 1
            if header.size == (header.stored_width, header.stored_height):
                report.add("orientation_unverified", f"{img['file_name']} (image id {image_id}): orientation "
                                                     f"{header.orientation} ({ORIENTATIONS[header.orientation]})")
        if header.size != json_size:
            report.add("size_mismatch", size_mismatch_message(path, image_id, header, json_size,
                                                              report.annotations_file))


def inspect_dataset(data: dict[str, Any], report: DatasetReport, decode: bool = False,
                    max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> None:
    """:func:`check_annotations` then :func:`check_files` of a loaded annotation file."""
    check_files(check_annotations(data, report), report, decode, max_pixels)


def check_dataset(annotations_file: str | Path, images_dir: str | Path, decode: bool = True,
                  max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS, masks: bool = False) -> DatasetReport:
    """Every check of a COCO-format dataset (``codetr data check``), into a report; ``masks``: as
    needed for ``data.with_masks`` (:class:`DatasetReport`)."""
    report = DatasetReport(Path(annotations_file), Path(images_dir), masks=masks)
    try:
        data = load_annotations(annotations_file)
    except (DatasetError, FileMissingError) as err:
        report.add("json", str(err))
        return report
    inspect_dataset(data, report, decode, max_pixels)
    return report


def fill_missing_areas(data: dict[str, Any]) -> None:
    """Give every annotation without ``area`` (or with null) its box area w*h: the COCO metrics sort objects
    into small / medium / large by ``area`` (faster-coco-eval counts an object without one as
    small). COCO's own files hold the mask area, which the box area only approximates."""
    for ann in data.get("annotations", []):
        if ann.get("area") is None:
            ann["area"] = float(ann["bbox"][2]) * float(ann["bbox"][3])
