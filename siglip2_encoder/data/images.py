"""Robust image loading shared by the command line and the library.

:func:`load_image` returns pixels the :class:`~siglip2_encoder.ImageProcessor` takes as they are, or raises
:class:`ImageLoadError` saying why the file is unusable. It never substitutes an image for one it cannot read.
"""

from __future__ import annotations

import io
import logging
import os
import stat
import threading
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "image_extensions",
    "ImageInput",
    "ImageLoadError",
    "ImageTooLargeError",
    "composite_on_white",
    "image_to_tensor",
    "load_image",
    "load_image_bytes",
    "pil_to_array",
]

ImageInput = Image.Image | np.ndarray | torch.Tensor

logger = logging.getLogger(__name__)

DEFAULT_MAX_PIXELS = 178_956_970  # Pillow's own decompression-bomb error threshold (2 x MAX_IMAGE_PIXELS)
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")
_pil_limit_lock = threading.Lock()


_NOT_REGULAR = {
    stat.S_IFDIR: "a directory",
    stat.S_IFIFO: "a FIFO (named pipe)",
    stat.S_IFSOCK: "a socket",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
}


def image_extensions() -> frozenset[str]:
    """Lower-case extensions of the formats the installed Pillow can open (``.jpg``, ``.tga``, ``.avif``, ...)."""
    Image.init()
    return frozenset(ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN)


class ImageLoadError(ValueError):
    """A file that is not a usable image; the message names the file and the reason."""


class ImageTooLargeError(ImageLoadError):
    """An image with more pixels than the limit it was read under (``max_pixels``)."""


def _open(source: Path | io.BytesIO, max_pixels: int, path: str | Path) -> Image.Image:
    """Open and decode ``source``, with our pixel limit in place of Pillow's global one; ``path`` names it in errors."""
    with _pil_limit_lock:
        saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            image = Image.open(source)
        finally:
            Image.MAX_IMAGE_PIXELS = saved
    if image.width * image.height > max_pixels:
        image.close()
        raise ImageTooLargeError(
            f"{path}: {image.width}x{image.height} = {image.width * image.height} pixels exceeds the limit of "
            f"{max_pixels} (a decompression bomb?); raise max_pixels if the image is genuine"
        )
    if image.width == 0 or image.height == 0:
        raise ImageLoadError(f"{path}: the image is empty ({image.width}x{image.height})")
    image.load()  # decode now, so truncated data fails here
    return image


def composite_on_white(rgba: torch.Tensor) -> torch.Tensor:
    """(4, H, W) RGBA -> (3, H, W) RGB composited onto an opaque white background, in the input's dtype.

    uint8 pixels follow Pillow's ``Image.alpha_composite`` integer arithmetic exactly (transformers' ``convert_rgb``
    composites with it), so RGBA arrays, tensors and PIL images all give the same pixels; float pixels in [0, 1] use
    ``rgb * alpha + (1 - alpha)``.
    """
    rgb, alpha = rgba[:3], rgba[3:]
    if rgba.dtype != torch.uint8:
        return rgb * alpha + (1 - alpha)
    rgb, alpha = rgb.int(), alpha.int()
    # Pillow (AlphaComposite.c, 7 precision bits): coefficients a and 255 - a, rounded division by 255.
    x = ((rgb * alpha + 255 * (255 - alpha)) << 7) + (128 << 7)
    out = ((((x >> 8) + x) >> 8) >> 7).clamp(0, 255)
    return torch.where(alpha == 0, 255, out).to(torch.uint8)


def pil_to_array(image: Image.Image) -> np.ndarray:
    """(H, W, 3): uint8 for 8-bit images, float32 in [0, 1] for 16-bit and float ones; transparency composited onto
    white; CMYK, grey, palette and 1-bit images become RGB.

    Raises:
        ValueError: the image holds NaN or Inf values.
    """
    if image.mode in _SIXTEEN_BIT_MODES or image.mode in ("I", "F"):
        values = np.asarray(image, dtype=np.float32)
        if not np.isfinite(values).all():
            raise ValueError("the image contains NaN or Inf values")
        if image.mode in _SIXTEEN_BIT_MODES or (image.mode == "I" and values.min() >= 0 and values.max() <= 65535):
            values = values / 65535.0  # 16-bit range (16-bit PNGs decode as mode I)
        elif values.min() < 0 or values.max() > 1:
            low, high = float(values.min()), float(values.max())
            values = (values - low) / (high - low) if high > low else np.zeros_like(values)
        return np.repeat(values[..., None], 3, axis=-1)
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = torch.from_numpy(np.asarray(image.convert("RGBA")).copy()).permute(2, 0, 1)
        return composite_on_white(rgba).permute(1, 2, 0).numpy()
    return np.asarray(image.convert("RGB"))


def image_to_tensor(image: ImageInput, index: int = 0) -> torch.Tensor:
    """One image as a (3, H, W) uint8 tensor, or a float32 tensor in [0, 1]; errors name it as image ``index``.

    PIL images as :func:`pil_to_array` reads them; numpy arrays are (H, W, C) or (H, W), torch tensors (C, H, W) or
    (H, W); 1 (grey), 3 (RGB) or 4 (RGBA, composited onto white) channels; uint8 (0-255) or float (0-1) pixels.
    """
    where = f"image {index}"
    if isinstance(image, Image.Image):
        if image.width == 0 or image.height == 0:
            raise ValueError(f"{where} is empty ({image.width}x{image.height})")
        try:
            image = pil_to_array(image)
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from None
    if isinstance(image, np.ndarray):
        if image.ndim == 3:  # numpy images are (H, W, C), PIL's layout
            image = np.moveaxis(image, -1, 0)
        tensor = torch.from_numpy(np.ascontiguousarray(image))
    elif isinstance(image, torch.Tensor):  # tensors are (C, H, W), torch's layout
        tensor = image.detach().cpu()
    else:
        raise TypeError(f"{where} is a {type(image).__name__}; pass a PIL image, a numpy array or a torch tensor")
    shape = tuple(tensor.shape)
    if tensor.ndim == 2:
        tensor = tensor[None]
    if tensor.ndim != 3 or tensor.shape[0] not in (1, 3, 4):
        layout = "(H, W, C)" if isinstance(image, np.ndarray) else "(C, H, W)"
        raise ValueError(f"{where} has shape {shape}; expected {layout} with 1, 3 or 4 channels, or (H, W)")
    if tensor.shape[1] == 0 or tensor.shape[2] == 0:
        raise ValueError(f"{where} is empty (shape {shape})")
    if tensor.dtype != torch.uint8:
        if not tensor.is_floating_point():
            raise TypeError(f"{where} has dtype {tensor.dtype}; pass uint8 (0-255) or float (0-1) pixels")
        tensor = tensor.float()
        if not torch.isfinite(tensor).all():
            raise ValueError(f"{where} contains NaN or Inf values")
        if tensor.min() < 0 or tensor.max() > 1:
            raise ValueError(
                f"{where} is float with values in [{tensor.min():.3g}, {tensor.max():.3g}]; float pixels must lie in "
                f"[0, 1] (divide 0-255 values by 255, or pass uint8)"
            )
    if tensor.shape[0] == 1:
        tensor = tensor.expand(3, -1, -1)
    elif tensor.shape[0] == 4:
        tensor = composite_on_white(tensor)
    return tensor.contiguous()


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
        ImageLoadError: missing or unreadable path, a directory or anything else that is not a regular file (a FIFO
            is never opened: reading it would block), an empty file, bytes that are no image, truncated or corrupt
            data, a 0x0 image, or more than ``max_pixels`` pixels.
    """
    path = Path(path)
    try:
        info = path.stat()
    except OSError as err:  # missing, permission denied
        raise ImageLoadError(f"{path}: cannot read the image: {err.strerror or err}") from None
    kind = stat.S_IFMT(info.st_mode)
    if kind != stat.S_IFREG:
        raise ImageLoadError(f"{path}: is {_NOT_REGULAR.get(kind, 'not a regular file')}, not an image file")
    if info.st_size == 0:
        raise ImageLoadError(f"{path}: the file is empty (0 bytes)")
    return _decode(path, path, exif_transpose, max_pixels)


def load_image_bytes(
    data: bytes, name: str, *, exif_transpose: bool = True, max_pixels: int = DEFAULT_MAX_PIXELS
) -> np.ndarray:
    """:func:`load_image` for an encoded image in memory (a tar member, say); ``name`` names it in errors."""
    if not data:
        raise ImageLoadError(f"{name}: the image is empty (0 bytes)")
    return _decode(io.BytesIO(data), name, exif_transpose, max_pixels)


def _decode(source: Path | io.BytesIO, path: str | Path, exif_transpose: bool, max_pixels: int) -> np.ndarray:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = _open(source, max_pixels, path)
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
        try:
            return pil_to_array(image)
        except ValueError as err:
            raise ImageLoadError(f"{path}: {err}") from None
