"""Image splitting, as Idefics3 and SmolVLM feed a SigLIP tower: the image's longest edge is resized to
``longest_edge`` (smaller images are upscaled), the result stretched to multiples of the ``tile``, cut into tiles row
by row, and the stretched image resized to one tile as a global view, which comes last. An image whose stretched size
is one tile is not split: it is its only view. Each view goes through the tower and the connector as an image of its
own; what ties the views together is the prompt: each tile's tokens follow ``<fake_token_around_image><row_r_col_c>``,
a newline ends each row, and the global view's follow ``<fake_token_around_image><global-img>``.

The geometry and the prompt follow transformers 5.25 (``Idefics3ImageProcessor`` with ``do_image_splitting`` and
``Idefics3Processor``), which the tests compare against: views pixel for pixel, rows and columns, input ids, and a
whole model's logits. Its quirks are kept: the first resize rounds the short side down, then up to an even number;
both resizes are LANCZOS on uint8 pixels (torchvision >= 0.27, as transformers on the CPU).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..config import check_positive_ints
from ..data.images import ImageInput, image_to_tensor
from ..data.processor import ImageProcessor, resize

__all__ = ["FAKE_IMAGE_TOKEN", "GLOBAL_IMAGE_TOKEN", "ImageSplitting"]

FAKE_IMAGE_TOKEN = "<fake_token_around_image>"
GLOBAL_IMAGE_TOKEN = "<global-img>"
MAX_SIDE = 4096  # transformers' MAX_IMAGE_SIZE: no side beyond it after the first resize


@dataclass(frozen=True)
class ImageSplitting:
    """Idefics3 / SmolVLM image splitting (``do_image_splitting=True``).

    Attributes:
        tile: the side of a view in pixels, the processor's ``max_image_size["longest_edge"]`` (the tower's input).
        longest_edge: the first resize's target for the longest edge, the processor's ``size["longest_edge"]``
            (Idefics3: 4 tiles).
    """

    tile: int
    longest_edge: int

    def __post_init__(self) -> None:
        check_positive_ints(self, "tile", "longest_edge")

    @property
    def max_grid(self) -> int:
        """The most tiles along a side: the longest edge's."""
        return math.ceil(self.longest_edge / self.tile)

    def row_col_tokens(self) -> list[str]:
        """The ``<row_r_col_c>`` tags the prompt can hold, for the tokenizer."""
        return [f"<row_{r + 1}_col_{c + 1}>" for r in range(self.max_grid) for c in range(self.max_grid)]

    def sizes(self, height: int, width: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """The image's size after the longest-edge resize, and after the stretch to tile multiples."""
        aspect = width / height
        if width >= height:
            h, w = int(self.longest_edge / aspect), self.longest_edge
            h += h % 2
        else:
            h, w = self.longest_edge, int(self.longest_edge * aspect)
            w += w % 2
        h, w = max(h, 1), max(w, 1)
        aspect = w / h
        if w >= h and w > MAX_SIDE:
            h, w = max(int(MAX_SIDE / aspect), 1), MAX_SIDE
        elif h > w and h > MAX_SIDE:
            h, w = MAX_SIDE, max(int(MAX_SIDE * aspect), 1)
        first, aspect = (h, w), w / h
        if w >= h:
            w = math.ceil(w / self.tile) * self.tile
            h = math.ceil(int(w / aspect) / self.tile) * self.tile
        else:
            h = math.ceil(h / self.tile) * self.tile
            w = math.ceil(int(h * aspect) / self.tile) * self.tile
        return first, (h, w)

    def grid(self, height: int, width: int) -> tuple[int, int]:
        """(rows, cols) of tiles; (0, 0) for an image that is not split (its one view is the whole image)."""
        _, (h, w) = self.sizes(height, width)
        return (h // self.tile, w // self.tile) if h > self.tile or w > self.tile else (0, 0)

    def num_views(self, height: int, width: int) -> int:
        """Views the tower sees for the image: its tiles and the global view, or the one view."""
        rows, cols = self.grid(height, width)
        return rows * cols + 1

    def views(self, image: ImageInput, processor: ImageProcessor) -> torch.Tensor:
        """The image's views, preprocessed by ``processor`` (a fixed-resolution processor of ``tile`` x ``tile``):
        (num_views, 3, tile, tile), the tiles row by row, then the global view."""
        if processor.config.image_size != (self.tile, self.tile):
            raise ValueError(f"the processor makes {processor.config.image_size} images; the views are {self.tile} px")
        pixels = image_to_tensor(image)
        first, stretched = self.sizes(*pixels.shape[-2:])
        resample = processor.config.resample
        pixels = resize(resize(pixels, first, resample), stretched, resample)
        h, w = stretched
        if h <= self.tile and w <= self.tile:
            return processor.process_one(pixels).pixels[None]
        tiles = [
            pixels[:, r : r + self.tile, c : c + self.tile]
            for r in range(0, h, self.tile)
            for c in range(0, w, self.tile)
        ]
        whole = resize(pixels, (self.tile, self.tile), resample)
        return torch.stack([processor.process_one(view).pixels for view in [*tiles, whole]])

    def prompt(self, rows: int, cols: int) -> tuple[list[str], str]:
        """The text before each view's image tokens (tiles row by row, then the global view) and after the last, as
        Idefics3's processor writes it."""
        before = [
            ("\n" if c == 0 and r > 0 else "") + f"{FAKE_IMAGE_TOKEN}<row_{r + 1}_col_{c + 1}>"
            for r in range(rows)
            for c in range(cols)
        ]
        before.append(("\n\n" if rows else "") + FAKE_IMAGE_TOKEN + GLOBAL_IMAGE_TOKEN)
        return before, FAKE_IMAGE_TOKEN
