"""Patch and position embeddings for both tower families.

* :class:`FixedResolutionEmbeddings`: conv patch embedding over (B, C, H, W) images; the learned position table is
  used as is at the native grid and resized bicubically otherwise, exactly as transformers'
  ``interpolate_pos_encoding=True`` does.
* :class:`NaFlexEmbeddings`: linear patch embedding over patchified pixels (B, L, p * p * C), the learned 16x16 grid
  resized per image to its (h, w) with bilinear + antialias, as transformers' ``Siglip2VisionEmbeddings`` does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import EncoderConfig

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


class FixedResolutionEmbeddings(nn.Module):
    """Conv patch embedding plus a learned (g * g, D) position table."""

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        self.grid = config.position_grid
        self.patch_size = config.patch_size
        self.patch_embedding = nn.Conv2d(config.num_channels, config.hidden_size, config.patch_size, config.patch_size)
        self.position_embedding = nn.Embedding(self.grid * self.grid, config.hidden_size)

    def positions(self, h: int, w: int) -> torch.Tensor:
        """Position embeddings for an (h, w) token grid: (h * w, D)."""
        table = self.position_embedding.weight
        if (h, w) == (self.grid, self.grid):
            return table
        grid = table.reshape(1, self.grid, self.grid, -1).permute(0, 3, 1, 2)  # (1, D, g, g)
        return _grid_to_tokens(F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False))

    def forward(self, pixel_values: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """(B, C, H, W) -> (B, H//p * W//p, D); ``positions`` (N, D) replaces the tower's own position embeddings."""
        h, w = pixel_values.shape[-2] // self.patch_size, pixel_values.shape[-1] // self.patch_size
        x = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))  # (B, D, h, w)
        return x.flatten(2).transpose(1, 2) + (self.positions(h, w) if positions is None else positions)


class NaFlexEmbeddings(nn.Module):
    """Linear patch embedding plus a learned square position grid resized to each image's (h, w)."""

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        self.grid = config.position_grid
        self.patch_size = config.patch_size
        self.patch_embedding = nn.Linear(config.num_channels * config.patch_size**2, config.hidden_size)
        self.position_embedding = nn.Embedding(config.num_patches, config.hidden_size)

    def positions(self, h: int, w: int) -> torch.Tensor:
        """Position embeddings for an (h, w) token grid: (h * w, D)."""
        table = self.position_embedding.weight
        # contiguous(): PyTorch's channels-last antialiased kernel is wrong for 1-wide outputs (e.g. a 5x1 grid).
        grid = table.reshape(1, self.grid, self.grid, -1).permute(0, 3, 1, 2).contiguous()  # (1, D, g, g)
        # Antialiased resizing has no half-precision CPU kernel; transformers upcasts there too.
        if grid.device.type == "cpu":
            grid = grid.float()
        resized = F.interpolate(grid, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
        return _grid_to_tokens(resized).to(table.dtype)

    def forward(
        self, patches: torch.Tensor, spatial_shapes: list[tuple[int, int]], positions: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Args:
            patches: (B, L, p * p * C) patchified pixels, image b's first h_b * w_b rows real, the rest padding.
            spatial_shapes: per image (h_b, w_b), with h_b * w_b <= L.
            positions: optional (L, D) position embeddings for every image instead of the tower's own.

        Returns:
            (B, L, D); padding rows get no position embedding.
        """
        x = self.patch_embedding(patches.to(self.patch_embedding.weight.dtype))
        if positions is not None:
            return x + positions
        pos = torch.zeros_like(x)
        cache: dict[tuple[int, int], torch.Tensor] = {}  # images of one batch often share a grid
        for i, (h, w) in enumerate(spatial_shapes):
            if (h, w) not in cache:
                cache[h, w] = self.positions(h, w)
            pos[i, : h * w] = cache[h, w]
        return x + pos
