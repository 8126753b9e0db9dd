"""Pixel-shuffle (space-to-depth) projector: fewer, wider tokens, then a linear layer or MLP."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import check_positive_ints
from .base import ProjectedTokens, Projector, ProjectorConfig, VisionFeatures, mlp, register

__all__ = ["PixelShuffleConfig", "PixelShuffleProjector", "pixel_shuffle"]


def pixel_shuffle(grid: torch.Tensor, factor: int) -> torch.Tensor:
    """(h, w, C) -> (ceil(h/s) * ceil(w/s), s * s * C).

    A grid that ``factor`` does not divide is zero-padded at the bottom and right first. Each output token holds
    the s x s block's tokens in row-major order, (dy, dx, C).
    """
    h, w, c = grid.shape
    pad_h, pad_w = -h % factor, -w % factor
    if pad_h or pad_w:
        grid = F.pad(grid, (0, 0, 0, pad_w, 0, pad_h))
    h2, w2 = (h + pad_h) // factor, (w + pad_w) // factor
    x = grid.reshape(h2, factor, w2, factor, c).permute(0, 2, 1, 3, 4)  # (h2, w2, dy, dx, C)
    return x.reshape(h2 * w2, factor * factor * c)


@dataclass(frozen=True)
class PixelShuffleConfig(ProjectorConfig):
    kind = "pixel_shuffle"
    factor: int = 2  # s: each output token merges an s x s block
    depth: int = 1  # 1: a linear layer (Idefics3, nanoVLM); more: an MLP
    hidden_features: int | None = None  # MLP hidden width; None = out_features
    bias: bool = True  # False: Idefics3's / SmolVLM's modality projection, a linear layer without bias
    norm: bool = False  # a LayerNorm over the shuffled channels before the linear layers (LFM2-VL's, by default)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_ints(self, "factor", "depth")


@register
class PixelShuffleProjector(Projector):
    """Space-to-depth by ``factor`` then a linear layer: Idefics3 / SmolVLM / nanoVLM's modality projector; with
    ``norm`` and depth 2, LFM2-VL's (a LayerNorm, then linear, GELU, linear).

    Grids that ``factor`` does not divide are zero-padded at the bottom and right, so an image with grid (h, w)
    yields ceil(h/s) * ceil(w/s) tokens.
    """

    config_class = PixelShuffleConfig

    def __init__(self, config: PixelShuffleConfig) -> None:
        super().__init__(config)
        wide = config.input_width * config.factor**2
        hidden = config.hidden_features or config.out_features
        self.norm = nn.LayerNorm(wide) if config.norm else None
        self.proj = mlp(wide, hidden, config.out_features, config.depth, bias=config.bias)

    def num_tokens(self, grid: tuple[int, int]) -> int:
        s = self.config.factor
        return -(-grid[0] // s) * -(-grid[1] // s)

    def project(self, features: VisionFeatures) -> ProjectedTokens:
        shuffled = [pixel_shuffle(grid, self.config.factor) for grid in features.per_image()]
        if self.norm is not None:
            shuffled = [self.norm(x) for x in shuffled]
        return ProjectedTokens.pack([self.proj(x) for x in shuffled])
