"""Pooling projector: downsample the token grid, then an MLP."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..config import check_positive_ints
from .base import ProjectedTokens, Projector, ProjectorConfig, VisionFeatures, mlp, register

__all__ = ["PoolConfig", "PoolProjector"]


@dataclass(frozen=True)
class PoolConfig(ProjectorConfig):
    kind = "pool"
    factor: int = 2  # the grid shrinks by this factor on each side (rounded up)
    mode: str = "avg"  # "avg": s x s average pooling; "bilinear": bilinear resize (LLaVA-OneVision)
    depth: int = 2  # MLP depth after pooling
    hidden_features: int | None = None  # MLP hidden width; None = out_features

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_ints(self, "factor", "depth")
        if self.mode not in ("avg", "bilinear"):
            raise ValueError(f"mode must be 'avg' or 'bilinear', got mode={self.mode!r}")


@register
class PoolProjector(Projector):
    """2x2 (``factor``) downsampling of the grid before an MLP, as LLaVA-OneVision pools video / extra-image
    features (it resizes bilinearly to ceil(h/2) x ceil(w/2)).

    ``mode="avg"`` averages each s x s block; blocks cut by the grid's edge average the tokens they hold.
    An image with grid (h, w) yields ceil(h/s) * ceil(w/s) tokens in both modes.
    """

    config_class = PoolConfig

    def __init__(self, config: PoolConfig) -> None:
        super().__init__(config)
        hidden = config.hidden_features or config.out_features
        self.proj = mlp(config.input_width, hidden, config.out_features, config.depth)

    def num_tokens(self, grid: tuple[int, int]) -> int:
        s = self.config.factor
        return -(-grid[0] // s) * -(-grid[1] // s)

    def _pool(self, grid: torch.Tensor) -> torch.Tensor:
        """(h, w, C) -> (ceil(h/s) * ceil(w/s), C)."""
        s = self.config.factor
        x = grid.permute(2, 0, 1)[None]  # (1, C, h, w)
        if self.config.mode == "avg":
            x = F.avg_pool2d(x, s, s, ceil_mode=True)
        else:
            size = (-(-grid.shape[0] // s), -(-grid.shape[1] // s))
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        return x[0].flatten(1).T

    def project(self, features: VisionFeatures) -> ProjectedTokens:
        return ProjectedTokens.pack([self.proj(self._pool(grid)) for grid in features.per_image()])
