"""Detections drawn on an image: one colour per class, the class name and score above each box."""

from __future__ import annotations

from typing import Any

from PIL import Image, ImageDraw, ImageFont

PALETTE = [
    (230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
    (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255), (170, 110, 40),
    (255, 250, 200), (128, 0, 0), (170, 255, 195), (128, 128, 0), (255, 215, 180), (0, 0, 128),
]


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
