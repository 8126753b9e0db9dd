"""Patch and position embeddings for both tower families.

* :class:`FixedResolutionEmbeddings`: conv patch embedding over (B, C, H, W) images; the learned position table is
  used as is at the native grid and otherwise resized bicubically, exactly as transformers'
  ``interpolate_pos_encoding=True`` does, or (``position_lookup="buckets"``, Idefics3 / SmolVLM towers) read at each
  patch's fractional coordinate, exactly as ``Idefics3VisionEmbeddings`` does.
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

from ..config import EncoderConfig

__all__ = [
    "FixedResolutionEmbeddings",
    "NaFlexEmbeddings",
    "antialiased_bilinear_weights",
    "bucket_boundaries",
    "buckets_keep_native_grid",
    "fractional_buckets",
]


def antialiased_bilinear_weights(sizes: torch.Tensor, index: torch.Tensor, source: int) -> torch.Tensor:
    """(..., source) float32 weights of output sample ``index`` in a bilinear resize with antialiasing
    (``align_corners=False``) from ``source`` samples to ``sizes`` samples (``sizes`` broadcasts against ``index``):
    a triangle filter, widened by the scale when shrinking, each row normalised. The tower and its ONNX graph both
    resize NaFlex grids with these weights."""
    scale = source / sizes.float()
    support = scale.clamp(min=1.0)
    centres = (index.float() + 0.5) * scale - 0.5
    offsets = torch.arange(source, device=index.device, dtype=torch.float32) - centres[..., None]
    weights = (1 - offsets.abs() / support[..., None]).clamp(min=0)
    return weights / weights.sum(-1, keepdim=True)


def bucket_boundaries(grid: int, device: torch.device | None = None) -> torch.Tensor:
    """The float32 boundaries between a ``grid``-wide table's cells on one axis, as Idefics3 builds them (an
    ``arange`` of 1 / grid steps: up to ``grid`` values, the last one near 1 for some grids)."""
    return torch.arange(1 / grid, 1.0, 1 / grid, device=device)


def fractional_buckets(counts: torch.Tensor, length: int, boundaries: torch.Tensor) -> torch.Tensor:
    """(B, length) int64 table cells along one axis for images ``counts`` (B,) patches long on it, as
    ``Idefics3VisionEmbeddings`` computes them: patch i sits at i * (1 / count) in float32, clamped below 1, and reads
    the cell ``torch.bucketize(..., boundaries, right=True)`` gives, written as a count of boundaries at or below
    the coordinate so that the ONNX graph computes it too. Positions at or past an image's count are meaningless."""
    step = 1.0 / counts  # (B,) float32, as Idefics3's per-image patch counts give it
    coords = torch.arange(length, device=counts.device, dtype=torch.float32)[None] * step[:, None]
    return (coords.clamp(max=1.0 - 1e-6)[..., None] >= boundaries).sum(-1)


def buckets_keep_native_grid(grid: int) -> bool:
    """Whether Idefics3's bucketed lookup reads a (grid, grid) table cell by cell at its native size: true of most
    grids (14, 16, 24, 26, 27, 32, 35, 70 among them), not of 19, 25, 29, 31, ..., where float32 coordinates fall
    below some boundaries and patches read a neighbour's cell."""
    buckets = fractional_buckets(torch.tensor([grid]), grid, bucket_boundaries(grid))[0]
    return torch.equal(buckets, torch.arange(grid))


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
        self.position_lookup = config.position_lookup

    def positions(self, h: int, w: int) -> torch.Tensor:
        """Bucketed (``position_lookup="buckets"``) at every grid, the native one included: Idefics3's float32
        coordinates miss some cells of grids such as 19 or 25 wide, and its towers were trained so. Otherwise the
        table as is at the native grid, bicubic elsewhere, as transformers' ``interpolate_pos_encoding``."""
        table = self.table()
        if self.position_lookup == "buckets":
            return table.flatten(0, 1)[self._bucket_ids(h, w, table.device)]
        if (h, w) == (self.grid, self.grid):
            return table.flatten(0, 1)
        grid = table.permute(2, 0, 1)[None]  # (1, D, g, g)
        return _grid_to_tokens(F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False))

    def _bucket_ids(self, h: int, w: int, device: torch.device) -> torch.Tensor:
        """(h * w,) table rows: patch (i, j) of an (h, w) grid reads the table cell holding its fractional coordinate
        (i / h, j / w), as :func:`fractional_buckets` computes it."""
        boundaries = bucket_boundaries(self.grid, device)
        rows, columns = (fractional_buckets(torch.tensor([n], device=device), n, boundaries)[0] for n in (h, w))
        return (rows[:, None] * self.grid + columns[None, :]).flatten()

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
        """Bilinear with antialiasing, as transformers' ``Siglip2VisionEmbeddings``, in float32.

        The resize is written out as one weight matrix per axis rather than ``F.interpolate(antialias=True)``, whose
        kernels have given wrong values for 1-wide outputs (a 40x1 grid): the contiguous one in PyTorch 2.14, the
        channels-last one in earlier releases.
        """
        table = self.table()
        device = table.device
        rows, columns = (  # (h, g), (w, g)
            antialiased_bilinear_weights(torch.tensor(n, device=device), torch.arange(n, device=device), self.grid)
            for n in (h, w)
        )
        resized = (rows @ table.float().flatten(1)).view(h, self.grid, -1)  # (h, g, D)
        return torch.einsum("wj,hjd->hwd", columns, resized).flatten(0, 1).to(table.dtype)

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
