"""Detections drawn on an image: one colour per class, the class name and score above each box, and
each mask (when the records have a ``segmentation``) filled semi-transparent with its outline."""

from __future__ import annotations

from typing import Any

import numpy as np
from faster_coco_eval.core import mask as coco_mask
from PIL import Image, ImageDraw, ImageFilter, ImageFont

MASK_OPACITY = 0.45  # of a mask's fill colour over the image
PALETTE = [
    (230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
    (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255), (170, 110, 40),
    (255, 250, 200), (128, 0, 0), (170, 255, 195), (128, 128, 0), (255, 215, 180), (0, 0, 128),
]


def draw_detections(image: Image.Image, records: list[dict[str, Any]], class_names: list[str],
                    category_ids: list[int]) -> Image.Image:
    """A copy of ``image`` with each xywh box, its class name and score, and its mask (a record's
    ``segmentation``, COCO RLE in the image) filled and outlined; one colour per class."""
    canvas = image.convert("RGB")
    width = max(1, round(min(canvas.size) / 200))
    label_of = {cat_id: label for label, cat_id in enumerate(category_ids)}
    ordered = sorted(records, key=lambda r: r["score"])
    masked = [rec for rec in ordered if "segmentation" in rec]
    if masked:
        canvas = draw_masks(canvas, [coco_mask.decode(rec["segmentation"]).astype(bool) for rec in masked],
                            [PALETTE[label_of[rec["category_id"]] % len(PALETTE)] for rec in masked], width)
    draw = ImageDraw.Draw(canvas)
    font_size = max(10, round(min(canvas.size) / 40))
    try:
        font = ImageFont.load_default(size=font_size)
    except TypeError:  # Pillow < 10.1 has a single fixed-size default font
        font = ImageFont.load_default()
    for rec in ordered:
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


def draw_masks(image: Image.Image, masks: list[np.ndarray], colours: list[tuple[int, int, int]],
               outline: int = 1) -> Image.Image:
    """``image`` (RGB) with each (H, W) bool mask filled with its colour at :data:`MASK_OPACITY`
    and its border (the pixels ``outline`` px or less from outside it) in the full colour; later
    masks over earlier ones."""
    pixels = np.asarray(image, dtype=np.float32).copy()
    for mask, colour in zip(masks, colours):
        if mask.shape != pixels.shape[:2]:
            raise ValueError(f"a {mask.shape[1]}x{mask.shape[0]} mask on a {image.width}x{image.height} image")
        inner = np.asarray(Image.fromarray(mask).filter(ImageFilter.MinFilter(2 * outline + 1)))
        fill = np.asarray(colour, dtype=np.float32)
        pixels[mask] = (1 - MASK_OPACITY) * pixels[mask] + MASK_OPACITY * fill
        pixels[mask & ~inner] = fill
    return Image.fromarray(np.round(pixels).astype(np.uint8))
