"""AnyRes tiling, as LLaVA-OneVision and LLaVA-NeXT feed a SigLIP tower: an image becomes a base view (the whole
image, resized to the tower's input, aspect not kept) and tiles of the best-fitting "pinpoint" resolution (an
aspect-preserving resize, black centred padding, row-major cuts); after the projector the tiles' tokens are
reassembled at the LLM's width into one grid, the padding's tokens dropped, (OneVision) the grid shrunk when it holds
more than ``max_tiles`` tiles' worth, and an ``image_newline`` embedding appended to each row. The exact number of
LLM tokens an image costs is known from its size alone, before any forward pass (:meth:`AnyResTiling.num_tokens`),
so a processor can insert that many placeholders.

The two families differ in two points: LLaVA-NeXT tiles every image and never shrinks its grid; OneVision shrinks
it, and does not tile an image that shares its sample with other images (it is padded square with the mean colour
and gets the base view and one newline only). The geometry follows transformers 5.25 (the families' image
processors, ``pack_image_features`` and their processors' token counts), which the tests compare against: views
pixel for pixel, token counts, reassembled features and whole models' logits. Its quirks are kept on purpose:
unpadding rounds with ``int(round(x, 7))``, and OneVision's shrink is a bilinear resize without antialiasing to
``int(h // ratio) x int(w // ratio)`` once ``ratio = sqrt(h * w / (max_tiles * side^2)) > 1.1``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..data.images import ImageInput, image_to_tensor
from ..data.processor import ImageProcessor, resize

__all__ = ["FAMILIES", "NEXT_GRIDS", "ONEVISION_GRIDS", "AnyResTiling"]

FAMILIES = ("llava_onevision", "llava_next")  # transformers' model_type of each tiling
# LLaVA-OneVision's default pinpoints: every grid of 1 to 6 tiles a side, (rows, cols).
ONEVISION_GRIDS = tuple((rows, cols) for rows in range(1, 7) for cols in range(1, 7))
# LLaVA-NeXT's default pinpoints (its processors' 336 px tiles), in tiles.
NEXT_GRIDS = ((1, 2), (2, 1), (2, 2), (3, 1), (1, 3))


def _square(pixels: torch.Tensor, mean: Sequence[float]) -> torch.Tensor:
    """(3, H, W) -> (3, S, S), S = max(H, W): the image centred on the processor's mean colour (transformers'
    ``int(m * 255)`` for uint8 pixels)."""
    height, width = pixels.shape[-2:]
    side = max(height, width)
    colour = torch.tensor([m if pixels.is_floating_point() else int(m * 255) for m in mean], dtype=pixels.dtype)
    canvas = colour[:, None, None].expand(3, side, side).clone()
    top, left = (side - height) // 2, (side - width) // 2
    canvas[:, top : top + height, left : left + width] = pixels
    return canvas


@dataclass(frozen=True)
class AnyResTiling:
    """LLaVA-OneVision's or LLaVA-NeXT's AnyRes tiling for a tower whose input is ``tile`` x ``tile`` pixels.

    Attributes:
        tile: the side of every view, in pixels (the tower's input size, e.g. 384).
        patch_size: the tower's patch side: a view gives (tile // patch_size)^2 tokens (So400m/14 at 384: 27 x 27,
            the last 6 pixels of each side unread, as in the checkpoint's training).
        grid_pinpoints: the resolutions an image may be tiled at, (height, width) in pixels, multiples of ``tile``
            (transformers' ``image_grid_pinpoints``).
        family: ``"llava_onevision"`` or ``"llava_next"`` (:data:`FAMILIES`, transformers' model types).
        max_tiles: OneVision's ``anyres_max_N``: the reassembled grid is shrunk once it holds more than 1.1 x N
            tiles' worth of tokens. None for LLaVA-NeXT, which never shrinks it.
    """

    tile: int
    patch_size: int
    grid_pinpoints: tuple[tuple[int, int], ...]
    family: str = "llava_onevision"
    max_tiles: int | None = 9

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"family must be one of {FAMILIES}, got family={self.family!r}")
        if (self.max_tiles is None) != (self.family == "llava_next"):
            raise ValueError(
                f"max_tiles (OneVision's anyres_max_N) applies to llava_onevision, and LLaVA-NeXT never shrinks its "
                f"grid: give max_tiles=None with llava_next; got family={self.family!r}, max_tiles={self.max_tiles!r}"
            )
        for name in ("tile", "patch_size") + (("max_tiles",) if self.max_tiles is not None else ()):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {name}={value!r}")
        if self.tile < self.patch_size:
            raise ValueError(f"tile {self.tile} is smaller than patch_size {self.patch_size}")
        pinpoints = tuple(tuple(int(v) for v in p) for p in self.grid_pinpoints)
        bad = [p for p in pinpoints if len(p) != 2 or min(p) < self.tile or p[0] % self.tile or p[1] % self.tile]
        if not pinpoints or bad:
            raise ValueError(
                f"grid_pinpoints must be (height, width) multiples of the tile {self.tile}, got {bad or 'none'}"
            )
        object.__setattr__(self, "grid_pinpoints", pinpoints)

    @classmethod
    def onevision(
        cls,
        tile: int = 384,
        patch_size: int = 14,
        max_tiles: int = 9,
        grids: Sequence[tuple[int, int]] = ONEVISION_GRIDS,
    ) -> AnyResTiling:
        """OneVision's settings: ``grids`` of (rows, cols) tiles (default 1x1 to 6x6), ``anyres_max_{max_tiles}``."""
        return cls(tile, patch_size, tuple((rows * tile, cols * tile) for rows, cols in grids), "llava_onevision",
                   max_tiles)  # fmt: skip

    @classmethod
    def next(cls, tile: int = 384, patch_size: int = 14, grids: Sequence[tuple[int, int]] = NEXT_GRIDS) -> AnyResTiling:
        """LLaVA-NeXT's settings: ``grids`` of (rows, cols) tiles (default its 1x2, 2x1, 2x2, 3x1, 1x3)."""
        return cls(tile, patch_size, tuple((rows * tile, cols * tile) for rows, cols in grids), "llava_next", None)

    def tiles(self, alone: bool) -> bool:
        """Whether an image is tiled: always for LLaVA-NeXT; for OneVision only when alone in its sample."""
        return alone or self.family == "llava_next"

    @property
    def side(self) -> int:
        """Tokens along a view's side."""
        return self.tile // self.patch_size

    def best_resolution(self, height: int, width: int) -> tuple[int, int]:
        """The pinpoint that keeps the most of the image's pixels once it is fitted in, then wastes the fewest."""
        best, best_key = self.grid_pinpoints[0], None
        for h, w in self.grid_pinpoints:
            scale = min(w / width, h / height)
            effective = min(int(width * scale) * int(height * scale), width * height)
            key = (effective, -(h * w - effective))
            if best_key is None or key > best_key:
                best, best_key = (h, w), key
        return best

    def grid(self, height: int, width: int) -> tuple[int, int]:
        """(rows, cols) of tiles for an image of ``height`` x ``width`` pixels."""
        h, w = self.best_resolution(height, width)
        return h // self.tile, w // self.tile

    def num_views(self, height: int, width: int, *, tiled: bool = True) -> int:
        """Views the tower sees for the image: the base view, and with ``tiled`` its tiles."""
        rows, cols = self.grid(height, width)
        return 1 + rows * cols if tiled else 1

    def _kept(self, height: int, width: int) -> tuple[int, int, int, int]:
        """(rows, cols) of tokens of the reassembled grid after unpadding, and after the shrink."""
        rows, cols = self.grid(height, width)
        h, w = rows * self.side, cols * self.side
        if width / height > w / h:  # wider than the grid: padding above and below
            padding = (h - int(round(height * (w / width), 7))) // 2
            h -= 2 * padding
        else:
            padding = (w - int(round(width * (h / height), 7))) // 2
            w -= 2 * padding
        if self.max_tiles is None:
            return h, w, h, w
        ratio = math.sqrt(h * w / (self.max_tiles * self.side**2))
        return (h, w, int(h // ratio), int(w // ratio)) if ratio > 1.1 else (h, w, h, w)

    def num_tokens(self, height: int, width: int, *, tiled: bool = True) -> int:
        """LLM tokens the image costs, newlines included: the base view's side^2, then (tiled) one token per cell of
        the reassembled grid and a newline per row; (not tiled: OneVision's shared images) one newline."""
        if not tiled:
            return self.side**2 + 1
        *_, h, w = self._kept(height, width)
        return self.side**2 + h * w + h

    def views(self, image: ImageInput, processor: ImageProcessor, *, tiled: bool = True) -> torch.Tensor:
        """The image's views, preprocessed by ``processor`` (a fixed-resolution processor of ``tile`` x ``tile``):
        (num_views, 3, tile, tile), the base view first, then the tiles row by row."""
        if processor.config.image_size != (self.tile, self.tile):
            raise ValueError(f"the processor makes {processor.config.image_size} images; the views are {self.tile} px")
        pixels = image_to_tensor(image)  # (3, H, W) uint8 or float
        if not tiled:
            return processor.process_one(_square(pixels, processor.config.image_mean)).pixels[None]
        height, width = pixels.shape[-2:]
        target_h, target_w = self.best_resolution(height, width)
        scale_h, scale_w = target_h / height, target_w / width
        if scale_w < scale_h:
            size = (min(math.ceil(height * scale_w), target_h), target_w)
        else:
            size = (target_h, min(math.ceil(width * scale_h), target_w))
        fitted = resize(pixels, size, processor.config.resample)
        top, left = (target_h - size[0]) // 2, (target_w - size[1]) // 2
        canvas = fitted.new_zeros(3, target_h, target_w)  # black padding
        canvas[:, top : top + size[0], left : left + size[1]] = fitted
        tiles = [
            canvas[:, r : r + self.tile, c : c + self.tile]
            for r in range(0, target_h, self.tile)
            for c in range(0, target_w, self.tile)
        ]
        return torch.stack([processor.process_one(view).pixels for view in [pixels, *tiles]])

    def reassemble_all(
        self,
        features: torch.Tensor,
        sizes: Sequence[tuple[int, int]],
        tiled: Sequence[bool],
        newline: torch.Tensor,
    ) -> torch.Tensor:
        """Every image's LLM tokens, concatenated: ``features`` (views, side^2, D) holds the views of the images of
        ``sizes`` ((height, width) each), image after image, each tiled or not as ``tiled`` says."""
        counts = [self.num_views(h, w, tiled=t) for (h, w), t in zip(sizes, tiled, strict=True)]
        if sum(counts) != len(features):
            raise ValueError(f"the {len(sizes)} images have {sum(counts)} views, got features of {len(features)}")
        parts = features.split(counts)
        return torch.cat([self.reassemble(f, h, w, newline, tiled=t) for f, (h, w), t in zip(parts, sizes, tiled)])

    def reassemble(
        self, features: torch.Tensor, height: int, width: int, newline: torch.Tensor, *, tiled: bool = True
    ) -> torch.Tensor:
        """One image's projected view features (num_views, side^2, D) -> its LLM tokens (num_tokens, D): the base
        view's tokens, then the tiles' tokens as one grid - unpadded, shrunk past ``max_tiles``, ``newline`` (D,)
        after each row. Not tiled: the base view's tokens and one newline."""
        expected = self.num_views(height, width, tiled=tiled)
        if features.shape[:2] != (expected, self.side**2):
            raise ValueError(
                f"a {height}x{width} image has {expected} views of {self.side**2} tokens, got features of shape "
                f"{tuple(features.shape)}"
            )
        newline = newline.to(features)
        if not tiled:
            return torch.cat([features[0], newline[None]])
        rows, cols = self.grid(height, width)
        grid = features[1:].view(rows, cols, self.side, self.side, -1)
        grid = grid.permute(4, 0, 2, 1, 3).reshape(features.shape[-1], rows * self.side, cols * self.side)  # (D,H,W)
        kept_h, kept_w, out_h, out_w = self._kept(height, width)
        top, left = (grid.shape[1] - kept_h) // 2, (grid.shape[2] - kept_w) // 2
        grid = grid[:, top : top + kept_h, left : left + kept_w]
        if (out_h, out_w) != (kept_h, kept_w):
            grid = F.interpolate(grid[None], [out_h, out_w], mode="bilinear")[0]
        rows_with_newline = torch.cat([grid, newline[:, None, None].expand(-1, out_h, 1)], dim=2)
        return torch.cat([features[0], rows_with_newline.flatten(1).T])
