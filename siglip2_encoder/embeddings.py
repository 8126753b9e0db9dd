"""Patch and position embeddings for both tower families.

* :class:`FixedResolutionEmbeddings`: conv patch embedding over (B, C, H, W) images; the learned position table is
  used as is at the native grid and resized bicubically otherwise, exactly as transformers'
  ``interpolate_pos_encoding=True`` does.
* :class:`NaFlexEmbeddings`: linear patch embedding over packed patchified pixels (T, p * p * C), the learned 16x16
  grid resized per image to its (h, w) with bilinear + antialias, as transformers' ``Siglip2VisionEmbeddings`` does.

Resized position grids are cached per (h, w) while the table is frozen (:class:`_PositionTable`).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .config import EncoderConfig
from .layers import weights_key

__all__ = ["FixedResolutionEmbeddings", "NaFlexEmbeddings", "patchify"]


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/p * W/p, p * p * C), patches in row-major order, pixels as (row, col, channel).

    This is the layout of transformers' ``Siglip2ImageProcessor`` and of the NaFlex patch embedding weights.
    """
    b, c, h, w = images.shape
    x = images.reshape(b, c, h // patch_size, patch_size, w // patch_size, patch_size)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // patch_size) * (w // patch_size), -1)


def _grid_to_tokens(grid: torch.Tensor) -> torch.Tensor:
    """(1, D, h, w) -> (h * w, D)."""
    return grid.flatten(2)[0].transpose(0, 1)


class _PositionTable(nn.Module):
    """A learned position table resized to any (h, w) grid, with the resized grids cached while the table is frozen.

    Resizing runs a (1, D, g, g) interpolation; with frozen weights its result only depends on (h, w), so it is
    computed once per grid and kept (up to ``cache_size`` grids, least recently used dropped) until the table
    changes: in place (optimizer step, ``load_state_dict``), replaced, moved or cast (see
    :func:`~siglip2_encoder.layers.weights_key`). While the table trains, nothing is cached.
    """

    cache_size = 64

    def __init__(self, grid: int, width: int) -> None:
        super().__init__()
        self.grid = grid
        self.position_embedding = nn.Embedding(grid * grid, width)
        self._cache: OrderedDict[tuple[int, int], torch.Tensor] = OrderedDict()
        self._cache_key: tuple | None = None

    def resize(self, h: int, w: int) -> torch.Tensor:
        raise NotImplementedError

    def positions(self, h: int, w: int) -> torch.Tensor:
        """Position embeddings for an (h, w) token grid: (h * w, D)."""
        table = self.position_embedding.weight
        key = weights_key(table)
        if key is None or (table.requires_grad and torch.is_grad_enabled()):
            return self.resize(h, w)
        if key != self._cache_key:
            self.clear_cache()
            self._cache_key = key
        if (h, w) in self._cache:
            self._cache.move_to_end((h, w))
        else:
            # Outside inference mode, so that the cached tensor also serves later calls that record gradients.
            with torch.inference_mode(False), torch.no_grad():
                self._cache[h, w] = self.resize(h, w)
            if len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return self._cache[h, w]

    def packed_positions(self, grids: Sequence[tuple[int, int]]) -> torch.Tensor:
        """(sum of h * w, D): each grid's positions, concatenated; each distinct grid is resized once."""
        unique = {grid: self.positions(*grid) for grid in dict.fromkeys(grids)}
        return torch.cat([unique[grid] for grid in grids])

    def clear_cache(self) -> None:
        self._cache.clear()
        self._cache_key = None


class FixedResolutionEmbeddings(_PositionTable):
    """Conv patch embedding plus a learned (g * g, D) position table."""

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__(config.position_grid, config.hidden_size)
        self.patch_size = config.patch_size
        self.patch_embedding = nn.Conv2d(config.num_channels, config.hidden_size, config.patch_size, config.patch_size)

    def positions(self, h: int, w: int) -> torch.Tensor:
        if (h, w) == (self.grid, self.grid):
            return self.position_embedding.weight
        return super().positions(h, w)

    def resize(self, h: int, w: int) -> torch.Tensor:
        """Bicubic, as transformers' ``interpolate_pos_encoding=True``."""
        grid = self.position_embedding.weight.reshape(1, self.grid, self.grid, -1).permute(0, 3, 1, 2)  # (1,D,g,g)
        return _grid_to_tokens(F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False))

    def forward(self, pixel_values: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """(B, C, H, W) -> (B, H//p * W//p, D); ``positions`` (N, D) or (B, N, D) replaces the tower's own."""
        h, w = pixel_values.shape[-2] // self.patch_size, pixel_values.shape[-1] // self.patch_size
        x = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))  # (B, D, h, w)
        return x.flatten(2).transpose(1, 2) + (self.positions(h, w) if positions is None else positions)


class NaFlexEmbeddings(_PositionTable):
    """Linear patch embedding plus a learned square position grid resized to each image's (h, w)."""

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__(config.position_grid, config.hidden_size)
        self.patch_size = config.patch_size
        self.patch_embedding = nn.Linear(config.num_channels * config.patch_size**2, config.hidden_size)

    def resize(self, h: int, w: int) -> torch.Tensor:
        """Bilinear with antialiasing, as transformers' ``Siglip2VisionEmbeddings``."""
        table = self.position_embedding.weight
        # contiguous(): PyTorch's channels-last antialiased kernel is wrong for 1-wide outputs (e.g. a 5x1 grid).
        grid = table.reshape(1, self.grid, self.grid, -1).permute(0, 3, 1, 2).contiguous()  # (1, D, g, g)
        # Antialiased resizing has no half-precision CPU kernel; transformers upcasts there too.
        if grid.device.type == "cpu":
            grid = grid.float()
        resized = F.interpolate(grid, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
        return _grid_to_tokens(resized).to(table.dtype)

    def forward(
        self, patches: torch.Tensor, grids: Sequence[tuple[int, int]], positions: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Args:
            patches: (T, p * p * C) packed patchified pixels, the images' patches one after another.
            grids: each image's (h, w) in the same order, with sum of h * w = T.
            positions: optional (T, D) position embeddings instead of the tower's own.

        Returns:
            (T, D).
        """
        x = self.patch_embedding(patches.to(self.patch_embedding.weight.dtype))
        return x + (self.packed_positions(grids) if positions is None else positions)
