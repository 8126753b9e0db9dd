"""Robust image loading shared by the command line and the library.

:func:`load_image` returns pixels the :class:`~siglip2_encoder.ImageProcessor` takes as they are, or raises
:class:`ImageLoadError` saying why the file is unusable. It never substitutes an image for one it cannot read.
"""

from __future__ import annotations

import logging
import os
import threading
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = ["IMAGE_EXTENSIONS", "DEFAULT_MAX_PIXELS", "ImageLoadError", "load_image"]

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
DEFAULT_MAX_PIXELS = 178_956_970  # Pillow's own decompression-bomb error threshold (2 x MAX_IMAGE_PIXELS)
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")
_pil_limit_lock = threading.Lock()


class ImageLoadError(ValueError):
    """A file that is not a usable image; the message names the file and the reason."""


def _open(path: Path, max_pixels: int) -> Image.Image:
    """Open and decode, with our pixel limit in place of Pillow's global one."""
    with _pil_limit_lock:
        saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            image = Image.open(path)
        finally:
            Image.MAX_IMAGE_PIXELS = saved
    if image.width * image.height > max_pixels:
        image.close()
        raise ImageLoadError(
            f"{path}: {image.width}x{image.height} = {image.width * image.height} pixels exceeds the limit of "
            f"{max_pixels} (a decompression bomb?); raise max_pixels if the image is genuine"
        )
    if image.width == 0 or image.height == 0:
        raise ImageLoadError(f"{path}: the image is empty ({image.width}x{image.height})")
    image.load()  # decode now, so truncated data fails here
    return image


def _to_array(image: Image.Image, path: Path) -> np.ndarray:
    """(H, W, 3): uint8 for 8-bit images, float32 in [0, 1] for 16-bit and float ones."""
    if image.mode in _SIXTEEN_BIT_MODES or image.mode in ("I", "F"):
        values = np.asarray(image, dtype=np.float32)
        if not np.isfinite(values).all():
            raise ImageLoadError(f"{path}: the image contains NaN or Inf values")
        if image.mode in _SIXTEEN_BIT_MODES or (image.mode == "I" and values.min() >= 0 and values.max() <= 65535):
            values = values / 65535.0  # 16-bit range (16-bit PNGs decode as mode I)
        elif values.min() < 0 or values.max() > 1:
            low, high = float(values.min()), float(values.max())
            values = (values - low) / (high - low) if high > low else np.zeros_like(values)
        return np.repeat(values[..., None], 3, axis=-1)
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return np.asarray(image.convert("RGB"))


def load_image(
    path: str | os.PathLike, *, exif_transpose: bool = True, max_pixels: int = DEFAULT_MAX_PIXELS
) -> np.ndarray:
    """Read an image file as (H, W, 3) pixels for :class:`~siglip2_encoder.ImageProcessor`.

    * EXIF orientation is applied (``exif_transpose=False`` keeps the stored orientation).
    * Transparency (RGBA, LA, P with a transparent colour) is composited onto white; CMYK, grey and 1-bit images
      become RGB.
    * 16-bit images are scaled by their 16-bit range and float images by their own range (if outside [0, 1]) into
      float32 [0, 1], never clipped; 8-bit images stay uint8.

    Raises:
        ImageLoadError: missing or unreadable path, a directory, an empty file, bytes that are no image, truncated
            or corrupt data, a 0x0 image, or more than ``max_pixels`` pixels.
    """
    path = Path(path)
    if path.is_dir():
        raise ImageLoadError(f"{path}: is a directory, not an image file")
    try:
        if path.stat().st_size == 0:
            raise ImageLoadError(f"{path}: the file is empty (0 bytes)")
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = _open(path, max_pixels)
    except ImageLoadError:
        raise
    except UnidentifiedImageError:
        raise ImageLoadError(
            f"{path}: not an image (Pillow cannot identify it: unknown format, or an invalid header such as a 0x0 size)"
        ) from None
    except OSError as err:  # missing, permission denied, truncated, corrupt
        reason = err.strerror or str(err)
        raise ImageLoadError(f"{path}: cannot read the image: {reason}") from None
    except (ValueError, SyntaxError, Image.DecompressionBombWarning) as err:  # Pillow's plugins raise these too
        raise ImageLoadError(f"{path}: corrupt image data: {err}") from None
    with image:
        if exif_transpose:
            try:
                image = ImageOps.exif_transpose(image)
            except Exception as err:  # a broken EXIF block: keep the pixels, say so
                logger.warning("%s: cannot apply its EXIF orientation (%s); using the stored orientation", path, err)
        return _to_array(image, path)
