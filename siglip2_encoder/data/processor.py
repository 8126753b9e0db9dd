"""Image preprocessing matching each checkpoint's own ``preprocessor_config.json``.

* fixed-resolution: resize to (height, width) with the checkpoint's filter, rescale to [0, 1], normalize; or
  (``letterbox``) resize keeping the aspect ratio and pad to (height, width): centred on the mean colour as
  DeepSeek-VL's processor does (its hybrid's: into a larger square first, then resized), or at the bottom and right
  with normalized zeros as pi0's does.
* Phi-4-multimodal's global view (``letterbox="phi4"``): aspect kept on a white canvas of squares, then resized to
  image_size (:func:`phi4_canvas`).
* Idefics2's and Aria's letterboxes: resize keeping the aspect ratio as their processors do, and give each image's
  patches on its own grid (their towers mask the padding; :func:`idefics2_size`, :func:`aria_size`), batched as
  NaFlex patches are.
* NaFlex: resize to the largest size within ``max_num_patches`` that keeps the aspect ratio (transformers' rule,
  :func:`naflex_size`; or LFM2-VL's, :func:`smart_size`), rescale, normalize, cut into patches, pad to a common length
  with a validity mask.

Resizing uses torchvision's antialiased kernels on uint8 tensors, the operations of transformers' default
(torchvision) image processors, so sizes and pixels agree with them.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import NamedTuple

import numpy as np
import torch
import torchvision
from PIL import Image
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as tvF

from ..checkpoints.folders import read_config, read_processor_config
from ..checkpoints.hub import CheckpointSource
from ..config import ProcessorConfig
from ..presets import get_preset
from .images import ImageInput, image_to_tensor

__all__ = [
    "ImageProcessor",
    "ProcessedImage",
    "ProcessedImages",
    "aria_size",
    "fit_size",
    "idefics2_size",
    "letterbox_size",
    "naflex_size",
    "patchify",
    "phi4_canvas",
    "resize",
    "smart_size",
    "unpatchify",
]

_INTERPOLATION = {
    "bilinear": InterpolationMode.BILINEAR,
    "bicubic": InterpolationMode.BICUBIC,
    "lanczos": InterpolationMode.LANCZOS,
}
# torchvision resizes tensors with LANCZOS from 0.27 on (what transformers' processors use there, on the CPU).
_TENSOR_LANCZOS = tuple(int(v) for v in torchvision.__version__.split("+")[0].split(".")[:2]) >= (0, 27)


def resize(image: torch.Tensor, size: tuple[int, int], resample: str) -> torch.Tensor:
    """Antialiased resize of (C, H, W) pixels to ``size``, as transformers' torchvision processors do, in memory
    bounded by the input and the output.

    PyTorch's separable resize works on the width first and holds an (H, new W) image in between: for a tall sliver
    (16,000,000 x 1 to 224 x 224) that is 10 GB. When that would exceed four times the input and the output, the
    height is reduced on its own first. The extra step rounds once more in between (uint8: at most 1/255 from the
    single call); every other image takes the single call, identical to transformers.
    """
    if resample == "lanczos" and not _TENSOR_LANCZOS:
        raise ValueError(
            f"lanczos resizing needs torchvision >= 0.27 (installed {torchvision.__version__}); upgrade it, or use a "
            f"processor with resample='bicubic' (what older transformers fell back to)"
        )
    (height, width), (new_height, new_width) = image.shape[-2:], size
    if new_height < height and height * new_width > 4 * max(height * width, new_height * new_width):
        image = tvF.resize(image, [new_height, width], interpolation=_INTERPOLATION[resample], antialias=True)
    return tvF.resize(image, [new_height, new_width], interpolation=_INTERPOLATION[resample], antialias=True)


def letterbox_size(height: int, width: int, side: int, min_side: int) -> tuple[int, int]:
    """DeepSeek-VL's resize target: the longest side becomes ``side``, the other keeps the aspect ratio (Python's
    round, half to even) and is at least ``min_side``."""
    scale = side / max(height, width)
    return max(round(height * scale), min_side), max(round(width * scale), min_side)


def fit_size(height: int, width: int, max_height: int, max_width: int) -> tuple[int, int]:
    """pi0's resize target (transformers' ``get_image_size_for_max_height_width``): the largest size within
    ``(max_height, max_width)`` that keeps the aspect ratio, both sides floored. A side can floor to 0 (an image over
    ``max_height`` times wider than tall, say); callers refuse that."""
    scale = min(max_height / height, max_width / width)
    return int(height * scale), int(width * scale)


def idefics2_size(height: int, width: int, longest: int, shortest: int) -> tuple[int, int]:
    """Idefics2's resize target (its ``get_resize_output_image_size``): an image whose longest side exceeds
    ``longest`` is shrunk to it keeping the aspect ratio, the other side truncated; each side is then raised to at
    least ``shortest`` (the aspect ratio then not kept). transformers' arithmetic, so that sizes agree exactly."""
    aspect = width / height
    if width >= height and width > longest:
        width, height = longest, int(longest / aspect)
    elif height > width and height > longest:
        height, width = longest, int(longest * aspect)
    return max(height, shortest), max(width, shortest)


def aria_size(height: int, width: int, side: int, min_side: int) -> tuple[int, int]:
    """Aria's resize target: the longest side (the width when equal) becomes ``side``, the other is scaled with it,
    truncated, and at least ``min_side``. transformers' arithmetic, so that sizes agree exactly."""
    scale = side / max(height, width)
    if width >= height:
        return max(int(height * scale), min_side), side
    return side, max(int(width * scale), min_side)


def phi4_canvas(height: int, width: int, side: int, max_tiles: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """Phi-4-multimodal's layout (its processor's ``_get_crop_layout``): the image covers ceil(H / side) x
    ceil(W / side) squares of ``side``, or, over ``max_tiles`` of them, the columns x rows whose aspect ratio is
    closest to the image's (ties to the larger where the image fills over half of it); it is resized keeping its
    aspect ratio to fill that canvas's width or height (the other side truncated). Returns ((h, w) of the resized
    image, (H, W) of the canvas); raises ``ValueError`` for a side under 10 pixels, as it does. transformers'
    arithmetic and candidate order, so that sizes agree exactly."""
    columns, rows = math.ceil(width / side), math.ceil(height / side)
    if columns * rows > max_tiles:
        candidates = {
            (i, j)
            for n in range(1, max_tiles + 1)
            for i in range(1, n + 1)
            for j in range(1, n + 1)
            if i * j <= max_tiles
        }
        aspect, best, best_gap = width / height, (1, 1), float("inf")
        for i, j in sorted(candidates, key=lambda ratio: ratio[0] * ratio[1]):
            gap = abs(aspect - i / j)
            if gap < best_gap:
                best, best_gap = (i, j), gap
            elif gap == best_gap and width * height > 0.5 * side * side * i * j:
                best = (i, j)
        columns, rows = best
    canvas_w, canvas_h = side * columns, side * rows
    if canvas_w / width < canvas_h / height:
        resized = (int(height * (canvas_w / width)), canvas_w)
    else:
        resized = (canvas_h, int(width * (canvas_h / height)))
    if min(resized) < 10:
        raise ValueError(f"resized to {resized[0]}x{resized[1]} on its {canvas_h}x{canvas_w} canvas, a side under 10")
    return resized, (canvas_h, canvas_w)


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/p * W/p, p * p * C), patches in row-major order, pixels as (row, col, channel).

    This is the layout of transformers' ``Siglip2ImageProcessor`` and of the NaFlex patch embedding weights.
    """
    b, c, h, w = images.shape
    x = images.reshape(b, c, h // patch_size, patch_size, w // patch_size, patch_size)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // patch_size) * (w // patch_size), -1)


def unpatchify(patches: torch.Tensor, grid: tuple[int, int], patch_size: int, channels: int = 3) -> torch.Tensor:
    """(h * w, p * p * C) patches of :func:`patchify`'s layout -> the (C, h * p, w * p) image."""
    (h, w), p = grid, patch_size
    return patches.reshape(h, w, p, p, channels).permute(4, 0, 2, 1, 3).reshape(channels, h * p, w * p)


class ProcessedImage(NamedTuple):
    """One preprocessed image, before batching.

    Attributes:
        pixels: (3, H, W) for images of one size; (h * w, p * p * 3) patches where each image has its own grid
            (NaFlex, Idefics2's and Aria's letterboxes: ``ProcessorConfig.own_grids``).
        grid: that patch grid (h, w); None for images of one size.
        original_size: the input's (height, width).
    """

    pixels: torch.Tensor
    grid: tuple[int, int] | None
    original_size: tuple[int, int]


def naflex_size(height: int, width: int, patch_size: int, max_num_patches: int) -> tuple[int, int]:
    """The NaFlex resize target: aspect ratio kept, both sides multiples of the patch size (at least one patch),
    as many patches as fit in ``max_num_patches``.

    This is transformers' rule, a bisection on the scale factor to 1e-5, kept so that sizes agree with it exactly.
    """

    def side(scale: float, size: int) -> int:
        return max(patch_size, math.ceil(size * scale / patch_size) * patch_size)

    low, high = 1e-6, 100.0
    while high - low >= 1e-5:
        mid = (low + high) / 2
        if (side(mid, height) / patch_size) * (side(mid, width) / patch_size) <= max_num_patches:
            low = mid
        else:
            high = mid
    return side(low, height), side(low, width)


def smart_size(
    height: int, width: int, patch_size: int, multiple: int, min_num_patches: int, max_num_patches: int
) -> tuple[int, int]:
    """LFM2-VL's resize target (its ``smart_resize``, after Qwen2-VL's): each side rounded to a multiple of
    ``multiple`` patches (at least one), then, when the grid falls outside [``min_num_patches``,
    ``max_num_patches``], the aspect-keeping scale that brings it inside, sides rounded down (over the budget) or up
    (under the floor).

    transformers' arithmetic, Python's round (half to even) included, so that sizes agree with it exactly.
    """
    factor = patch_size * multiple
    min_pixels, max_pixels = min_num_patches * patch_size**2, max_num_patches * patch_size**2
    h, w = max(factor, round(height / factor) * factor), max(factor, round(width / factor) * factor)
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h, w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h, w


@dataclass
class ProcessedImages:
    """A batch ready for the encoder: ``model(**batch)`` works.

    Attributes:
        pixel_values: (B, 3, H, W) for fixed-resolution; (B, L, p * p * 3) patches, zero-padded, where each image
            has its own grid (NaFlex, Idefics2's and Aria's letterboxes: ``ProcessorConfig.own_grids``).
        spatial_shapes: (B, 2) long, each image's token grid (h, w) (own grids) or None (one size).
        pixel_attention_mask: (B, L) int32 (as transformers'), 1 for real patches (own grids) or None; index with
            ``mask.bool()``, since ``~mask`` of an int is not the padding.
        original_sizes: each input image's (height, width) before resizing.
    """

    pixel_values: torch.Tensor
    spatial_shapes: torch.Tensor | None = None
    pixel_attention_mask: torch.Tensor | None = None
    original_sizes: list[tuple[int, int]] | None = None

    def keys(self) -> list[str]:
        """The encoder's input names that are set (so ``**batch`` passes exactly those)."""
        return [k for k in ("pixel_values", "spatial_shapes", "pixel_attention_mask") if getattr(self, k) is not None]

    def __getitem__(self, key: str) -> torch.Tensor:
        return getattr(self, key)

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> ProcessedImages:
        """Move the tensors; ``dtype`` applies to ``pixel_values`` only."""
        move = {k: getattr(self, k).to(device) for k in self.keys()}
        move["pixel_values"] = move["pixel_values"].to(dtype=dtype)
        return replace(self, **move)


class ImageProcessor:
    """Turns images into the encoder's inputs, following a :class:`ProcessorConfig`.

    Images may be PIL images, numpy arrays (H, W, C) or (H, W), or torch tensors (C, H, W) or (H, W); uint8 pixels
    (0-255) or floats already in [0, 1]; 1 (grey), 3 (RGB) or 4 (RGBA, composited onto white) channels.
    """

    def __init__(self, config: ProcessorConfig) -> None:
        self.config = config

    def __repr__(self) -> str:
        return f"ImageProcessor({self.config})"

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike,
        *,
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        token: str | bool | None = None,
        local_files_only: bool = False,
    ) -> ImageProcessor:
        """The processor of a checkpoint (Hub id or local folder), from the processor settings transformers saved
        with it (``preprocessor_config.json``, or transformers 5's ``processor_config.json``)."""
        source = CheckpointSource(
            name_or_path, revision=revision, cache_dir=cache_dir, token=token, local_files_only=local_files_only
        )
        return cls(read_processor_config(source, read_config(source)))

    @classmethod
    def from_preset(cls, name: str) -> ImageProcessor:
        """The default preprocessing of a preset architecture (see :func:`~siglip2_encoder.list_presets`)."""
        return cls(get_preset(name).processor_config)

    def __call__(
        self,
        images: ImageInput | Sequence[ImageInput],
        *,
        max_num_patches: int | None = None,
        pad_to_max: bool = False,
    ) -> ProcessedImages:
        """Preprocess one image or a list of images.

        Args:
            images: one image or a sequence of them.
            max_num_patches: NaFlex only: this call's patch budget per image, instead of the configured one.
            pad_to_max: NaFlex only: pad every image to the budget (transformers' layout) instead of to the
                longest image of the batch.
        """
        if isinstance(images, (Image.Image, np.ndarray, torch.Tensor)):
            images = [images]
        if len(images) == 0:
            raise ValueError("no images given")
        items = [self.process_one(image, max_num_patches=max_num_patches, index=i) for i, image in enumerate(images)]
        return self.collate(items, max_num_patches=max_num_patches if pad_to_max else None, pad_to_max=pad_to_max)

    def process_one(self, image: ImageInput, *, max_num_patches: int | None = None, index: int = 0) -> ProcessedImage:
        """Preprocess one image (errors name it as image ``index``); :meth:`collate` batches the results."""
        config = self.config
        if max_num_patches is not None and not config.naflex:
            raise ValueError("max_num_patches applies to NaFlex checkpoints only; this processor has a fixed size")
        tensor = image_to_tensor(image, index)
        size = (int(tensor.shape[1]), int(tensor.shape[2]))
        if not config.naflex:
            if config.own_grids:
                return self._own_grid(tensor, size)
            if config.letterbox == "pi0":
                return ProcessedImage(self._fit_and_pad(tensor, index), None, size)
            if config.letterbox == "phi4":
                return ProcessedImage(self._phi4_global_view(tensor, index), None, size)
            if config.letterbox == "deepseek_vl":
                tensor = self._letterbox(tensor, config.image_size[0])
            elif config.letterbox == "deepseek_vl_hybrid":  # then resized to image_size below
                tensor = self._letterbox(tensor, config.letterbox_canvas)
            return ProcessedImage(self._resize_normalize(tensor, config.image_size), None, size)
        budget = self._budget(max_num_patches)
        h, w, p = *size, config.patch_size
        if config.do_resize and config.naflex_resize == "smart":
            h, w = smart_size(h, w, p, config.grid_multiple, config.min_num_patches, budget)
            if (h // p) * (w // p) > budget:  # only at extreme aspect ratios: a side is one multiple already
                raise ValueError(
                    f"image {index} ({size[0]}x{size[1]}) is resized to {h}x{w}, {(h // p) * (w // p)} patches, over "
                    f"the budget of {budget}: its aspect ratio is too extreme for this processor; crop it"
                )
        elif config.do_resize:
            h, w = naflex_size(h, w, p, budget)
        elif h % p or w % p or (h // p) * (w // p) > budget:
            raise ValueError(
                f"with do_resize=False, images must be multiples of {p} within {budget} patches, got {h}x{w}"
            )
        patches = patchify(self._resize_normalize(tensor, (h, w))[None], p)[0]
        return ProcessedImage(patches, (h // p, w // p), size)

    def collate(
        self, items: Sequence[ProcessedImage], *, max_num_patches: int | None = None, pad_to_max: bool = False
    ) -> ProcessedImages:
        """Batch :meth:`process_one` results (NaFlex: padded to the longest image, or to the budget)."""
        sizes = [item.original_size for item in items]
        if not self.config.own_grids:
            return ProcessedImages(torch.stack([item.pixels for item in items]), original_sizes=sizes)
        padded = pad_to_max and self.config.naflex  # the letterboxes read on own grids have no budget
        length = self._budget(max_num_patches) if padded else max(len(item.pixels) for item in items)
        pixel_values = torch.zeros(len(items), length, items[0].pixels.shape[1])
        # int32 as transformers' processor gives it: an exported graph (ONNX) has one input type for both.
        mask = torch.zeros(len(items), length, dtype=torch.int32)
        for i, item in enumerate(items):
            pixel_values[i, : len(item.pixels)] = item.pixels
            mask[i, : len(item.pixels)] = 1
        shapes = torch.tensor([item.grid for item in items], dtype=torch.long)
        return ProcessedImages(pixel_values, shapes, mask, sizes)

    def _budget(self, max_num_patches: int | None) -> int:
        budget = max_num_patches or self.config.max_num_patches
        if not isinstance(budget, int) or isinstance(budget, bool) or budget < 1:
            raise ValueError(f"max_num_patches must be a positive int, got {budget!r}")
        return budget

    def _own_grid(self, image: torch.Tensor, size: tuple[int, int]) -> ProcessedImage:
        """Idefics2's and Aria's letterboxes: (3, H, W) -> the patches of the resized image's own grid. Idefics2's
        tower masks every patch that reaches into the padding: its whole patches are kept. Aria's masks only patches
        of padding alone: the image is padded with black (before normalizing, as Aria pads) to whole patches."""
        config, p = self.config, self.config.patch_size
        if config.letterbox == "idefics2":
            height, width = idefics2_size(*size, config.image_size[0], config.letterbox_min_side)
            pixels = self._resize_normalize(image, (height, width))
            grid = (height // p, width // p)
            pixels = pixels[:, : grid[0] * p, : grid[1] * p]
        else:
            height, width = aria_size(*size, config.image_size[0], config.letterbox_min_side)
            if (height, width) != size:
                image = resize(image, (height, width), config.resample)
            grid = (-(-height // p), -(-width // p))
            padded = torch.nn.functional.pad(image, (0, grid[1] * p - width, 0, grid[0] * p - height))
            pixels = self._resize_normalize(padded, tuple(padded.shape[1:]))
        return ProcessedImage(patchify(pixels[None], p)[0], grid, size)

    def _phi4_global_view(self, image: torch.Tensor, index: int) -> torch.Tensor:
        """(3, H, W) -> (3, *image_size), Phi-4-multimodal's global view: the image resized (bilinear, whatever the
        configured filter: its processor's first resize takes torchvision's default) onto its :func:`phi4_canvas`,
        padded at the bottom and right with white, normalized, and the canvas resized to image_size with the
        configured filter, without antialiasing, in float, as its processor does."""
        config = self.config
        side = config.image_size[0]
        try:
            resized, canvas = phi4_canvas(image.shape[1], image.shape[2], side, config.letterbox_max_tiles)
        except ValueError as err:
            raise ValueError(
                f"image {index} ({image.shape[1]}x{image.shape[2]}) would be {err} pixels: its aspect ratio is too "
                f"extreme for Phi-4-multimodal's processor; crop it"
            ) from None
        if resized != tuple(image.shape[1:]):
            image = resize(image, resized, "bilinear")
        white = 255 if image.dtype == torch.uint8 else 1.0
        padding = (0, canvas[1] - resized[1], 0, canvas[0] - resized[0])
        pixels = self._resize_normalize(torch.nn.functional.pad(image, padding, value=white), canvas)
        if canvas == (side, side):
            return pixels
        return tvF.resize(pixels, [side, side], interpolation=_INTERPOLATION[config.resample], antialias=False)

    def _fit_and_pad(self, image: torch.Tensor, index: int) -> torch.Tensor:
        """(3, H, W) -> (3, *image_size) float32, as pi0's processor: resized within image_size by :func:`fit_size`,
        rescaled and normalized, then padded at the bottom and right with zeros."""
        height, width = self.config.image_size
        fitted = fit_size(image.shape[1], image.shape[2], height, width)
        if 0 in fitted:
            raise ValueError(
                f"image {index} ({image.shape[1]}x{image.shape[2]}) fits {height}x{width} as {fitted[0]}x{fitted[1]}, "
                f"an empty image: its aspect ratio is too extreme for this processor; crop it"
            )
        pixels = self._resize_normalize(image, fitted)
        return torch.nn.functional.pad(pixels, (0, width - fitted[1], 0, height - fitted[0]))

    def _letterbox(self, image: torch.Tensor, side: int) -> torch.Tensor:
        """(3, H, W) -> (3, side, side) in the input's units: resized by :func:`letterbox_size` and centred on the
        letterbox colour (in 0-1 for float input), as DeepSeek-VL's processor pads before rescaling."""
        config = self.config
        height, width = letterbox_size(image.shape[1], image.shape[2], side, config.letterbox_min_side)
        if (height, width) != tuple(image.shape[1:]):
            image = resize(image, (height, width), config.resample)
        if height == width == side:
            return image
        color = torch.tensor(config.letterbox_color, dtype=torch.float)
        if image.dtype != torch.uint8:  # float pixels are in [0, 1] already
            color = color * config.rescale_factor
        canvas = color.to(image.dtype)[:, None, None].repeat(1, side, side)
        top, left = ((side - height) // 2, 0) if width > height else (0, (side - width) // 2)
        canvas[:, top : top + height, left : left + width] = image
        return canvas

    def _resize_normalize(self, image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """(3, H, W) uint8 or [0, 1] float -> (3, *size) float32, normalized."""
        config = self.config
        if config.do_resize and tuple(image.shape[1:]) != tuple(size):
            image = resize(image, size, config.resample)
        elif not config.do_resize and tuple(image.shape[1:]) != tuple(size):
            raise ValueError(
                f"with do_resize=False, images must already be {size[0]}x{size[1]}, got "
                f"{image.shape[1]}x{image.shape[2]}"
            )
        scale = config.rescale_factor if image.dtype == torch.uint8 and config.do_rescale else 1.0
        image = image.float()
        if not config.do_normalize:
            return image * scale if scale != 1.0 else image
        # (x * scale - mean) / std computed as (x - mean / scale) / (std / scale), as transformers fuses it.
        mean = torch.tensor(config.image_mean)[:, None, None] * (1.0 / scale)
        std = torch.tensor(config.image_std)[:, None, None] * (1.0 / scale)
        return (image - mean) / std
