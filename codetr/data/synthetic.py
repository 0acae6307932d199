"""A built-in synthetic COCO-format detection dataset ("shapes"), made with PIL and numpy.

Six categories (ids 1..6) that differ in shape, colour and texture are drawn on cluttered
backgrounds (colour gradients, noise, grey lines and irregular blobs that are not objects).
Objects have varied scales (down to ~8 px at 256 px), overlap and occlude each other;
objects more than 70% hidden (by later objects or by the image border) are not annotated. Every
12th image (index 11, 23, ...) has no objects. Boxes are tight around each object's *visible*
pixels, like COCO boxes derived from visible segmentations, and each annotation's
``segmentation`` is exactly those pixels (compressed RLE, :func:`codetr.data.masks.encode_masks`);
``area`` is their count.

The output is a pure function of ``(seed, split, image index, size)``: the same arguments give
byte-identical JSON and identical pixels (images are lossless PNG).

Layout written by :func:`generate_synthetic_coco`::

    out_dir/train/000001.png ...
    out_dir/val/000001.png ...
    out_dir/annotations/instances_train.json
    out_dir/annotations/instances_val.json
    out_dir/.codetr-synthetic     the stamp: codetr generated this folder and may write it again

The generator writes only into a folder that is new, empty or stamped (:func:`check_generated`):
a folder holding anything else is the user's, and is refused.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from codetr.data.masks import encode_masks
from codetr.errors import UserError

# (name, RGB colour, texture); the index + 1 is the COCO category id.
CATEGORIES: list[tuple[str, tuple[int, int, int], str]] = [
    ("circle", (220, 45, 45), "solid"),
    ("square", (45, 85, 225), "stripes"),
    ("triangle", (40, 175, 65), "dots"),
    ("star", (245, 205, 35), "solid"),
    ("ring", (205, 60, 205), "stripes"),
    ("cross", (30, 195, 205), "dots"),
]
SPLITS = ("train", "val")
EMPTY_EVERY = 12  # image indices i with i % EMPTY_EVERY == EMPTY_EVERY - 1 have no objects
MAX_HIDDEN = 0.7  # objects with a larger hidden fraction stay in the picture but are not annotated
MIN_VISIBLE_SIDE = 4  # px; objects whose visible box is narrower are not annotated either
STAMP = ".codetr-synthetic"  # the file that marks a folder as written by the generator


@dataclass
class SyntheticObject:
    """One annotated object.

    category_id: COCO category id (1..6).
    mask: (H, W) bool, the object's visible pixels.
    box: xyxy absolute pixel-edge coordinates, tight around ``mask``.
    """

    category_id: int
    mask: np.ndarray
    box: tuple[int, int, int, int]


@dataclass
class SyntheticImage:
    """image and background: (H, W, 3) uint8; background is the image before objects were drawn."""

    image: np.ndarray
    background: np.ndarray
    objects: list[SyntheticObject]


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Low-saturation gradient + grey lines and irregular blobs + noise; (size, size, 3) uint8."""
    grey = rng.uniform(60, 200, size=2)
    colours = grey[:, None] + rng.uniform(-25, 25, size=(2, 3))  # two desaturated colours
    angle = rng.uniform(0, 2 * np.pi)
    coords = np.arange(size, dtype=np.float32) / max(size - 1, 1)
    ramp = np.cos(angle) * coords[None, :] + np.sin(angle) * coords[:, None]
    ramp = (ramp - ramp.min()) / max(float(ramp.max() - ramp.min()), 1e-6)
    img = colours[0] + ramp[..., None] * (colours[1] - colours[0])
    canvas = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    for _ in range(int(rng.integers(1, 5))):  # blobs: irregular polygons
        cx, cy = rng.uniform(0, size, size=2)
        n = int(rng.integers(6, 11))
        angles = np.sort(rng.uniform(0, 2 * np.pi, size=n))
        radii = rng.uniform(0.03, 0.15, size=n) * size
        points = [(cx + r * np.cos(a), cy + r * np.sin(a)) for a, r in zip(angles, radii)]
        draw.polygon(points, fill=_dull_colour(rng))
    for _ in range(int(rng.integers(2, 9))):  # lines
        x0, y0, x1, y1 = rng.uniform(0, size, size=4)
        draw.line([(x0, y0), (x1, y1)], fill=_dull_colour(rng), width=int(rng.integers(1, 4)))
    noisy = np.asarray(canvas, dtype=np.float32) + rng.normal(0, rng.uniform(3, 10), size=(size, size, 3))
    return np.clip(noisy, 0, 255).astype(np.uint8)


def _dull_colour(rng: np.random.Generator) -> tuple[int, int, int]:
    """A low-saturation colour for clutter (object colours are saturated)."""
    r, g, b = (int(v) for v in np.clip(rng.uniform(30, 225) + rng.uniform(-20, 20, size=3), 0, 255))
    return r, g, b


def _shape_mask(rng: np.random.Generator, name: str, side: int) -> np.ndarray:
    """(side, side) bool mask of a randomly rotated shape filling a disc of diameter ~side."""
    canvas = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(canvas)
    c = r = (side - 1) / 2  # centre and radius
    theta = rng.uniform(0, 2 * np.pi)

    def polygon(radii: list[float], offsets: list[float]) -> list[tuple[float, float]]:
        return [(c + rr * np.cos(theta + o), c + rr * np.sin(theta + o)) for rr, o in zip(radii, offsets)]

    if name == "circle":
        draw.ellipse([0, 0, side - 1, side - 1], fill=255)
    elif name == "ring":
        draw.ellipse([0, 0, side - 1, side - 1], fill=255)
        h = 0.27 * side
        draw.ellipse([h, h, side - 1 - h, side - 1 - h], fill=0)
    elif name == "square":
        draw.polygon(polygon([r] * 4, [np.pi / 4 + k * np.pi / 2 for k in range(4)]), fill=255)
    elif name == "triangle":
        draw.polygon(polygon([r] * 3, [k * 2 * np.pi / 3 for k in range(3)]), fill=255)
    elif name == "star":
        draw.polygon(polygon([r, 0.45 * r] * 5, [k * np.pi / 5 for k in range(10)]), fill=255)
    elif name == "cross":
        a = 0.3 * r  # half-width of the arms; corners of a plus sign in polar form
        corner = float(np.hypot(r, a))
        inner = float(np.hypot(a, a))
        offsets, radii = [], []
        for k in range(4):
            base = k * np.pi / 2
            da = float(np.arctan2(a, r))
            offsets += [base - da, base + da, base + np.pi / 4]
            radii += [corner, corner, inner]
        draw.polygon(polygon(radii, offsets), fill=255)
    else:
        raise ValueError(f"unknown synthetic shape {name!r}")
    return np.asarray(canvas) > 0


def _texture(rng: np.random.Generator, colour: tuple[int, int, int], kind: str, side: int) -> np.ndarray:
    """(side, side, 3) uint8 fill of one object: solid, stripes or dots of its class colour."""
    base = np.clip(np.array(colour, dtype=np.float32) * rng.uniform(0.85, 1.1), 0, 255)
    out = np.broadcast_to(base, (side, side, 3)).copy()
    period = max(3.0, side / 6)
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32)
    if kind == "stripes":
        phi = rng.uniform(0, np.pi)
        band = np.floor((xx * np.cos(phi) + yy * np.sin(phi)) / (period / 2)).astype(np.int64) % 2 == 1
        out[band] = base * 0.55
    elif kind == "dots":
        dy = (yy % period) - period / 2
        dx = (xx % period) - period / 2
        out[dx * dx + dy * dy < (0.3 * period) ** 2] = base * 0.5 + 127
    elif kind != "solid":
        raise ValueError(f"unknown synthetic texture {kind!r}")
    return out.astype(np.uint8)


def render_image(rng: np.random.Generator, size: int, empty: bool = False) -> SyntheticImage:
    """Draw one image of ``size`` x ``size`` pixels and return it with its visible objects."""
    background = _background(rng, size)
    image = background.copy()
    owner = np.full((size, size), -1, dtype=np.int64)  # index of the object owning each pixel
    drawn: list[tuple[int, int]] = []  # (category index, full shape area incl. off-image part)
    num = 0 if empty else int(rng.integers(1, 9))
    scale = size / 256
    for k in range(num):
        cat = int(rng.integers(len(CATEGORIES)))
        name, colour, kind = CATEGORIES[cat]
        if rng.random() < 0.35:  # small objects
            side = rng.uniform(8, 16) * scale
        else:
            side = np.exp(rng.uniform(np.log(16), np.log(0.45 * 256))) * scale
        side = max(6, int(round(side)))
        shape = _shape_mask(rng, name, side)
        fill = _texture(rng, colour, kind, side)
        x0 = int(rng.integers(-side // 4, size - side + side // 4 + 1))
        y0 = int(rng.integers(-side // 4, size - side + side // 4 + 1))
        # clip the side x side patch at (x0, y0) to the image
        ix0, iy0 = max(x0, 0), max(y0, 0)
        ix1, iy1 = min(x0 + side, size), min(y0 + side, size)
        local = shape[iy0 - y0 : iy1 - y0, ix0 - x0 : ix1 - x0]
        image[iy0:iy1, ix0:ix1][local] = fill[iy0 - y0 : iy1 - y0, ix0 - x0 : ix1 - x0][local]
        owner[iy0:iy1, ix0:ix1][local] = k
        drawn.append((cat, int(shape.sum())))

    objects = []
    for k, (cat, full_area) in enumerate(drawn):
        mask = owner == k
        visible = int(mask.sum())
        if visible < (1 - MAX_HIDDEN) * full_area:
            continue
        ys, xs = np.nonzero(mask)
        box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
        if min(box[2] - box[0], box[3] - box[1]) < MIN_VISIBLE_SIDE:
            continue
        objects.append(SyntheticObject(cat + 1, mask, box))
    return SyntheticImage(image, background, objects)


def render_sample(seed: int, split: str, index: int, size: int) -> SyntheticImage:
    """Image ``index`` (0-based) of ``split``: what :func:`generate_synthetic_coco` writes as
    file ``{index + 1:06d}.png`` with image id ``index + 1``."""
    rng = np.random.default_rng([seed, SPLITS.index(split), index])
    return render_image(rng, size, empty=index % EMPTY_EVERY == EMPTY_EVERY - 1)


def _parameters(split: str, num: int, size: int, seed: int) -> dict[str, int | str]:
    # "segmentation": files written before the masks (same images and boxes) are written again once
    return {"split": split, "num_images": num, "size": size, "seed": seed, "segmentation": "rle"}


def synthetic_is_current(ann_file: str | Path, split: str, num: int, size: int, seed: int) -> bool:
    """Whether ``ann_file`` exists and was written by the generator with these parameters."""
    ann_file = Path(ann_file)
    if not ann_file.is_file():
        return False
    try:
        info = json.loads(ann_file.read_text()).get("info", {})
    except (json.JSONDecodeError, AttributeError):
        return False
    return isinstance(info, dict) and info.get("codetr_synthetic") == _parameters(split, num, size, seed)


def check_generated(out_dir: Path) -> None:
    """Refuse (UserError) a folder that holds files but no stamp: they are someone's data, not codetr's."""
    if out_dir.exists() and not (out_dir / STAMP).is_file() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise UserError(f"{out_dir} holds files codetr did not generate (no {STAMP} stamp): codetr writes "
                        "synthetic data only into a new, empty or codetr-generated folder")


def _write_split(out_dir: Path, split: str, num: int, size: int, seed: int) -> Path:
    """Write the images of one split and its annotation file; returns the annotation path."""
    image_dir = out_dir / split
    image_dir.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for i in range(num):
        sample = render_sample(seed, split, i, size)
        file_name = f"{i + 1:06d}.png"
        Image.fromarray(sample.image).save(image_dir / file_name, compress_level=1)
        images.append({"id": i + 1, "file_name": file_name, "width": size, "height": size})
        for obj in sample.objects:
            x1, y1, x2, y2 = obj.box
            annotations.append({
                "id": len(annotations) + 1,
                "image_id": i + 1,
                "category_id": obj.category_id,
                "bbox": [float(x1), float(y1), float(x2 - x1), float(y2 - y1)],
                "area": float(obj.mask.sum()),
                "iscrowd": 0,
                "segmentation": encode_masks(torch.from_numpy(obj.mask)[None])[0],
            })
    data = {
        "info": {"description": f"codetr synthetic shapes ({split}, seed {seed}, size {size})", "version": "1",
                 "codetr_synthetic": _parameters(split, num, size, seed)},
        "images": images,
        "annotations": annotations,
        "categories": [
            {"id": i + 1, "name": name, "supercategory": "shape"} for i, (name, _, _) in enumerate(CATEGORIES)
        ],
    }
    ann_file = out_dir / "annotations" / f"instances_{split}.json"
    ann_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = ann_file.with_name(f"{ann_file.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data))
    tmp.replace(ann_file)  # atomic: an annotation file exists only once its images are written
    return ann_file


def generate_synthetic_coco(
    out_dir: str | Path, num_train: int = 64, num_val: int = 16, size: int = 256, seed: int = 0
) -> dict[str, Path]:
    """Write the synthetic dataset under ``out_dir``.

    Returns the paths keyed like DataConfig fields: ``train_images``, ``train_annotations``,
    ``val_images``, ``val_annotations``.
    """
    if num_train < 0 or num_val < 0:
        raise ValueError(f"image counts must be >= 0, got train={num_train}, val={num_val}")
    if size < 32:
        raise ValueError(f"synthetic image size must be >= 32 px, got {size}")
    out = Path(out_dir)
    check_generated(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / STAMP).write_text("written by codetr's synthetic data generator; codetr may replace this folder\n")
    for old in (out / "train", out / "val", out / "annotations"):  # no files of an earlier generation stay
        if old.is_dir():
            shutil.rmtree(old)
    paths: dict[str, Path] = {}
    for split, num in (("train", num_train), ("val", num_val)):
        paths[f"{split}_annotations"] = _write_split(out, split, num, size, seed)
        paths[f"{split}_images"] = out / split
    return paths
