"""Image splitting, as LFM2-VL feeds its NaFlex SigLIP 2 tower (its processor's ``do_image_splitting``).

An image is one view, sized by the tower's processor (LFM2-VL's smart rule, ``naflex_resize="smart"``), unless it is
too large: rounded to multiples of ``grid_multiple`` patches, it holds more than ``max_pixels_tolerance`` times the
processor's patch budget. A too-large image is resized to a grid of ``tile`` x ``tile`` tiles - the grid of between
``min_tiles`` and ``max_tiles`` tiles whose aspect ratio is closest to the image's (ties: the larger grid when the
image covers more than half of it) - cut row by row, and followed by a thumbnail: the one view it would otherwise be.
Each view is an image to the tower and the projector; the prompt ties them together: ``<|image_start|>``, then each
tile's tokens after ``<|img_row_r_col_c|>``, the thumbnail's after ``<|img_thumbnail|>``, then ``<|image_end|>``
(a view alone: ``<|image_start|>``, its tokens, ``<|image_end|>``).

The geometry and the prompt follow transformers 5.25 (``Lfm2VlImageProcessor`` and ``Lfm2VlProcessor``), which the
tests compare against: views pixel for pixel, grids, masks, input ids, and a whole model's logits.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import ProcessorConfig, check_positive_ints
from ..data.images import ImageInput, image_to_tensor
from ..data.processor import ImageProcessor, ProcessedImage, resize

__all__ = ["IMAGE_END", "IMAGE_START", "THUMBNAIL_TOKEN", "Lfm2VlSplitting"]

# The text LFM2-VL's processor writes around an image's views (transformers' Lfm2VlProcessor, its defaults).
IMAGE_START = "<|image_start|>"
IMAGE_END = "<|image_end|>"
THUMBNAIL_TOKEN = "<|img_thumbnail|>"


@dataclass(frozen=True)
class Lfm2VlSplitting:
    """LFM2-VL's image splitting; its budgets and grid rounding are the tower processor's (a ``"smart"`` one).

    Attributes:
        tile: a tile's side in pixels (``tile_size``); a multiple of ``patch_size * grid_multiple``.
        min_tiles: the fewest tiles of a split image (``min_tiles``, at least 2: with one tile LFM2-VL's processor
            counts the thumbnail's tokens for the tile).
        max_tiles: the most tiles (``max_tiles``).
        use_thumbnail: whether the tiles are followed by the thumbnail (``use_thumbnail``).
        max_pixels_tolerance: an image is split when it holds more than this many times the patch budget
            (``max_pixels_tolerance``).
    """

    tile: int = 512
    min_tiles: int = 2
    max_tiles: int = 10
    use_thumbnail: bool = True
    max_pixels_tolerance: float = 2.0

    def __post_init__(self) -> None:
        check_positive_ints(self, "tile", "min_tiles", "max_tiles")
        if self.min_tiles < 2 or self.max_tiles < self.min_tiles:
            raise ValueError(
                f"LFM2-VL splits an image into 2 or more tiles: need 2 <= min_tiles <= max_tiles, got min_tiles="
                f"{self.min_tiles}, max_tiles={self.max_tiles} (for one view per image, use no splitting)"
            )
        if not isinstance(self.use_thumbnail, bool):
            raise TypeError(f"use_thumbnail must be a bool, got {self.use_thumbnail!r}")
        if not self.max_pixels_tolerance > 0:
            raise ValueError(f"max_pixels_tolerance must be positive, got {self.max_pixels_tolerance!r}")

    def check(self, config: ProcessorConfig) -> None:
        """Refuse a tower processor the splitting cannot work with: one without LFM2-VL's sizing rule, or whose tiles
        are not whole multiples of the unshuffle."""
        if config.naflex_resize != "smart":
            raise ValueError(
                f"LFM2-VL's splitting needs a NaFlex tower sized by its smart rule; this one has naflex_resize="
                f"{config.naflex_resize!r} (image_size={config.image_size}): give the tower "
                f"processor_config.replace(naflex_resize='smart', min_num_patches=..., grid_multiple=...)"
            )
        step = config.patch_size * config.grid_multiple
        if self.tile % step:
            raise ValueError(
                f"tile={self.tile} must be a multiple of patch_size * grid_multiple = {step}, so that each tile's "
                f"grid unshuffles whole"
            )

    def ratios(self) -> list[tuple[int, int]]:
        """The candidate grids as (cols, rows), fewest tiles first, in the order LFM2-VL's processor tries them."""
        low, high = self.min_tiles, self.max_tiles
        grids = [(w, h) for n in range(low, high + 1) for w in range(1, n + 1) for h in range(1, n + 1)]
        # A set's order decides among grids of as many tiles, and it depends on how the set was built: built as
        # transformers builds it, it breaks ties as transformers' does.
        return sorted(set(g for g in grids if low <= g[0] * g[1] <= high), key=lambda g: g[0] * g[1])

    def grid(self, height: int, width: int, config: ProcessorConfig) -> tuple[int, int]:
        """(rows, cols) of tiles; (0, 0) for an image that is not split (its one view is the whole image)."""
        p, step = config.patch_size, config.patch_size * config.grid_multiple
        h, w = max(p, round(height / step) * step), max(p, round(width / step) * step)
        if h * w <= config.max_num_patches * p * p * self.max_pixels_tolerance:
            return 0, 0
        aspect, best, best_diff = width / height, (1, 1), float("inf")
        for cols, rows in self.ratios():
            diff = abs(aspect - cols / rows)
            if diff < best_diff:
                best, best_diff = (cols, rows), diff
            elif diff == best_diff and height * width > 0.5 * self.tile * self.tile * cols * rows:
                best = (cols, rows)
        return best[1], best[0]

    def row_col_tokens(self) -> list[str]:
        """The ``<|img_row_r_col_c|>`` tags the prompt can hold, and the thumbnail's, for the tokenizer."""
        return [*_tags(self.max_tiles, self.max_tiles), THUMBNAIL_TOKEN]

    def views(self, image: ImageInput, processor: ImageProcessor) -> list[ProcessedImage]:
        """The image's views, preprocessed by ``processor`` (the tower's): its tiles row by row (each ``tile`` px
        square, not resized again) and the thumbnail, or its one view."""
        config = processor.config
        self.check(config)
        pixels = image_to_tensor(image)
        rows, cols = self.grid(*pixels.shape[-2:], config)
        if not rows:
            return [processor.process_one(pixels)]
        grid = resize(pixels, (rows * self.tile, cols * self.tile), config.resample)
        exact = ImageProcessor(config.replace(do_resize=False))
        budget = (self.tile // config.patch_size) ** 2
        tiles = [
            exact.process_one(grid[:, r : r + self.tile, c : c + self.tile], max_num_patches=budget)
            for r in range(0, rows * self.tile, self.tile)
            for c in range(0, cols * self.tile, self.tile)
        ]
        # the thumbnail is the view the image would be unsplit
        return [*tiles, processor.process_one(pixels)] if self.use_thumbnail else tiles

    def prompt(self, rows: int, cols: int) -> tuple[list[str], str]:
        """The text before each view's image tokens (tiles row by row, then the thumbnail) and after the last, as
        LFM2-VL's processor writes it."""
        if not rows:
            return [IMAGE_START], IMAGE_END
        before = _tags(rows, cols) + ([THUMBNAIL_TOKEN] if self.use_thumbnail else [])
        before[0] = IMAGE_START + before[0]
        return before, IMAGE_END


def _tags(rows: int, cols: int) -> list[str]:
    """The tags before the tiles of a rows x cols grid, row by row."""
    return [f"<|img_row_{r + 1}_col_{c + 1}|>" for r in range(rows) for c in range(cols)]
