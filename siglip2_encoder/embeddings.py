"""Patch and position embeddings for both tower families.

* :class:`FixedResolutionEmbeddings`: conv patch embedding over (B, C, H, W) images; the learned position table is
  used as is at the native grid and resized bicubically otherwise, exactly as transformers'
  ``interpolate_pos_encoding=True`` does.
* :class:`NaFlexEmbeddings`: linear patch embedding over packed patchified pixels (T, p * p * C), the learned square
  grid resized per image to its (h, w) with bilinear + antialias, as transformers' ``Siglip2VisionEmbeddings`` does.

Resized grids are computed from the live table on every call (each distinct grid once per call), never cached
across calls: a cache would have to notice every way a table can change (``.data`` writes included), and resizing
costs 0.2-2 ms per grid on a 2-core CPU, under 1% of the smallest tower's forward pass (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .config import EncoderConfig

__all__ = ["FixedResolutionEmbeddings", "NaFlexEmbeddings"]


def _grid_to_tokens(grid: torch.Tensor) -> torch.Tensor:
    """(1, D, h, w) -> (h * w, D)."""
    return grid.flatten(2)[0].transpose(0, 1)


class _Embeddings(nn.Module):
    """What both families share: a patch embedding, a learned (g * g, D) position table and their initialisation."""

    patch_embedding: nn.Module

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        self.grid = config.position_grid
        self.patch_size = config.patch_size
        self.position_embedding = nn.Embedding(self.grid * self.grid, config.hidden_size)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """lecun-normal patch embedding (truncated normal, std sqrt(1 / fan_in), corrected for the truncation),
        zero bias, normal(1 / sqrt(D)) positions: the reference implementations' choices."""
        weight = self.patch_embedding.weight
        nn.init.trunc_normal_(weight, std=math.sqrt(1.0 / weight[0].numel()) / 0.87962566103423978)
        nn.init.zeros_(self.patch_embedding.bias)
        table = self.position_embedding.weight
        nn.init.normal_(table, std=1 / math.sqrt(table.shape[1]))

    def table(self) -> torch.Tensor:
        """The (g, g, D) learned position grid, read from the live weight."""
        if type(self.position_embedding) is not nn.Embedding:
            # Resizing reads the weight itself, which would bypass a wrapper's forward (e.g. an unmerged LoRA).
            raise ValueError(
                f"position_embedding is a {type(self.position_embedding).__name__}, not an nn.Embedding: adapters on "
                f"the position table are not supported (merge them, or target the encoder layers)"
            )
        return self.position_embedding.weight.view(self.grid, self.grid, -1)

    def positions(self, h: int, w: int) -> torch.Tensor:
        """Position embeddings for an (h, w) token grid: (h * w, D)."""
        raise NotImplementedError


class FixedResolutionEmbeddings(_Embeddings):
    """Conv patch embedding plus a learned (g * g, D) position table."""

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__(config)
        self.patch_embedding = nn.Conv2d(config.num_channels, config.hidden_size, config.patch_size, config.patch_size)

    def positions(self, h: int, w: int) -> torch.Tensor:
        """The table as is at the native grid; bicubic otherwise, as transformers' ``interpolate_pos_encoding``."""
        table = self.table()
        if (h, w) == (self.grid, self.grid):
            return table.flatten(0, 1)
        grid = table.permute(2, 0, 1)[None]  # (1, D, g, g)
        return _grid_to_tokens(F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False))

    def forward(self, pixel_values: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """(B, C, H, W) -> (B, H//p * W//p, D); ``positions`` (N, D) or (B, N, D) replaces the tower's own."""
        h, w = pixel_values.shape[-2] // self.patch_size, pixel_values.shape[-1] // self.patch_size
        x = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))  # (B, D, h, w)
        return x.flatten(2).transpose(1, 2) + (self.positions(h, w) if positions is None else positions)


class NaFlexEmbeddings(_Embeddings):
    """Linear patch embedding plus a learned square position grid resized to each image's (h, w)."""

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__(config)
        self.patch_embedding = nn.Linear(config.num_channels * config.patch_size**2, config.hidden_size)

    def positions(self, h: int, w: int) -> torch.Tensor:
        """Bilinear with antialiasing, as transformers' ``Siglip2VisionEmbeddings``."""
        table = self.table()
        # contiguous(): PyTorch's channels-last antialiased kernel is wrong for 1-wide outputs (e.g. a 5x1 grid).
        grid = table.permute(2, 0, 1)[None].contiguous()  # (1, D, g, g)
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
        if positions is None:
            resized = {grid: self.positions(*grid) for grid in dict.fromkeys(grids)}  # each distinct grid once
            positions = torch.cat([resized[grid] for grid in grids])
        return x + positions
