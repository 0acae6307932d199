"""Reading image files: the one place codetr turns a file into RGB pixels.

Every reader (training, evaluation, prediction, the Python API, ``codetr data check``) goes
through :func:`open_image`, which

- applies the EXIF orientation (``PIL.ImageOps.exif_transpose``), as photo viewers, mmcv's
  ``imread(flag="color")`` of the released pipeline and the common detection libraries do: a
  phone photo stored sideways with orientation 6 is read upright, and its boxes and its
  ``width`` / ``height`` in the annotations refer to the upright image;
- converts every Pillow mode to 8-bit RGB. 16-bit integer images (modes ``I;16*``; ``I``, which
  is how older Pillow releases open 16-bit PNGs, read as 16-bit values clipped to 0..65535) keep
  their high byte (value // 256), as libpng's 16-to-8 reduction used by OpenCV's ``imread``: the
  full 16-bit range maps to the full 8-bit range, the same for every image of a dataset (Pillow's
  own ``convert("RGB")`` clips at 255 and makes them nearly white). 32-bit float images (``F``)
  are read as 0..255 values, rounded and clipped. Alpha is dropped (``LA``, ``PA``, ``RGBA``, a
  palette's transparency), as ``cv2.imread`` does; ``1``, ``L``, ``P``, ``CMYK``, ``YCbCr``, ...
  go through Pillow's ``convert("RGB")``;
- raises :class:`codetr.errors.ImageFileError` naming the file for a missing, unreadable,
  truncated or corrupt file, and for an image with more pixels than ``max_pixels``
  (``data.max_image_pixels``, default Pillow's decompression-bomb limit, the size above which
  ``PIL.Image.open`` refuses a file).

:func:`read_header` reads the size and orientation only (no decode), for the cheap checks when
a dataset is loaded.
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError
from torchvision.transforms.v2 import functional as F

from codetr.errors import ImageFileError

# Pillow warns above Image.MAX_IMAGE_PIXELS and refuses files above twice that (its
# DecompressionBombError); codetr's default limit is the latter.
DEFAULT_MAX_IMAGE_PIXELS: int = 2 * Image.MAX_IMAGE_PIXELS
ORIENTATION_TAG = ExifTags.Base.Orientation
# EXIF orientation -> what the viewer does to the stored pixels to show the image upright.
ORIENTATIONS = {
    1: "none",
    2: "mirrored left-right",
    3: "rotated 180 degrees",
    4: "mirrored top-bottom",
    5: "transposed (mirrored along the main diagonal)",
    6: "rotated 90 degrees clockwise",
    7: "transversed (mirrored along the anti-diagonal)",
    8: "rotated 90 degrees counter-clockwise",
}
SWAPS_AXES = (5, 6, 7, 8)  # these orientations swap width and height
# What Pillow raises while decoding a file it could identify (truncated or corrupt data).
DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error)

# Pillow's own decompression-bomb check reads the global Image.MAX_IMAGE_PIXELS; codetr's limit
# replaces it while a file is read (under this lock, so threads do not interleave the swap).
_PIXEL_LIMIT_LOCK = threading.RLock()


@dataclass(frozen=True)
class ImageHeader:
    """Size and EXIF orientation of an image file, read without decoding its pixels."""

    stored_width: int  # as stored in the file, before the orientation is applied
    stored_height: int
    orientation: int  # EXIF orientation 1..8; 1: none (also when the file has no EXIF)

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of the image as read (after the orientation)."""
        if self.orientation in SWAPS_AXES:
            return self.stored_height, self.stored_width
        return self.stored_width, self.stored_height


@contextmanager
def _opened(path: Path, max_pixels: int | None) -> Iterator[Image.Image]:
    """``Image.open(path)`` with codetr's pixel limit in place of Pillow's; errors name the file."""
    with _PIXEL_LIMIT_LOCK:
        saved = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None  # the check below replaces Pillow's (it only warns below 2x its limit)
        try:
            try:
                image = Image.open(path)
            except FileNotFoundError:
                raise ImageFileError(f"image file {path} not found") from None
            except UnidentifiedImageError:
                raise ImageFileError(f"image file {path} is not an image Pillow can read (unknown format or "
                                     f"corrupt header)") from None
            except OSError as err:
                raise ImageFileError(f"image file {path} cannot be read: {err}") from None
            with image:
                pixels = image.width * image.height
                if max_pixels is not None and pixels > max_pixels:
                    raise ImageFileError(
                        f"image file {path} is {image.width}x{image.height} = {pixels:,} pixels, more than the limit "
                        f"of {max_pixels:,} (data.max_image_pixels, Pillow's decompression-bomb guard): if you trust "
                        f"the file, raise it with data.max_image_pixels={pixels} (null: no limit)")
                yield image
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def _orientation(image: Image.Image) -> int:
    """The EXIF orientation (1..8) of an opened, not yet decoded image."""
    if image.format == "PNG" and "exif" not in image.info:
        # No eXIf chunk before the pixels: PngImageFile.getexif would decode them all to look after.
        return 1
    value = image.getexif().get(ORIENTATION_TAG, 1)
    return value if value in ORIENTATIONS else 1  # exif_transpose ignores other values too


def read_header(path: str | Path, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> ImageHeader:
    """Size and EXIF orientation of the image file ``path`` without decoding it."""
    with _opened(Path(path), max_pixels) as image:
        orientation = _orientation(image)
        if image.format == "TIFF":  # Pillow orients TIFFs itself: image.size is already upright
            return ImageHeader(image.tag_v2[256], image.tag_v2[257], orientation)  # ImageWidth, ImageLength
        return ImageHeader(image.width, image.height, orientation)


def to_rgb(image: Image.Image) -> Image.Image:
    """``image`` upright (its EXIF orientation applied) as 8-bit RGB (see the module docstring)."""
    image = ImageOps.exif_transpose(image)
    mode = image.mode
    if mode.startswith("I;16") or mode == "I":
        high_byte = np.clip(np.asarray(image).astype(np.int64), 0, 65535) >> 8
        image = Image.fromarray(high_byte.astype(np.uint8))
    elif mode == "F":
        image = Image.fromarray(np.clip(np.rint(np.asarray(image, dtype=np.float64)), 0, 255).astype(np.uint8))
    elif mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")  # Pillow asks palette transparency to go through RGBA
    return image.convert("RGB")


def open_image(path: str | Path, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """The image file ``path`` decoded, upright and 8-bit RGB (:func:`to_rgb`).

    Raises :class:`ImageFileError` naming the file when it is missing, not an image, truncated or
    corrupt, or has more than ``max_pixels`` pixels (None: no limit).
    """
    path = Path(path)
    with _opened(path, max_pixels) as image:
        try:
            return to_rgb(image)
        except DECODE_ERRORS as err:
            raise ImageFileError(f"image file {path} is truncated or corrupt: Pillow cannot decode it ({err})") from None


def read_image(path: str | Path, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> torch.Tensor:
    """The image file ``path`` as a (3, H, W) uint8 RGB tensor, upright (:func:`open_image`)."""
    return F.pil_to_tensor(open_image(path, max_pixels))
