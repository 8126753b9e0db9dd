"""Projectors that map each vision token on its own: one token in, one token out."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..config import check_positive_ints
from .base import ProjectedTokens, Projector, ProjectorConfig, VisionFeatures, mlp, register

__all__ = ["LinearConfig", "LinearProjector", "MLPConfig", "MLPProjector"]


class _Tokenwise(Projector):
    """Shared by projectors that map each token alone through ``self.proj``."""

    proj: nn.Module

    def num_tokens(self, grid: tuple[int, int]) -> int:
        return grid[0] * grid[1]

    def project(self, features: VisionFeatures) -> ProjectedTokens:
        tokens = self.proj(features.tokens)
        if features.mask is not None:
            tokens = tokens.masked_fill(~features.mask[..., None], 0.0)
        return ProjectedTokens(tokens, features.token_counts, features.mask)


@dataclass(frozen=True)
class LinearConfig(ProjectorConfig):
    kind = "linear"


@register
class LinearProjector(_Tokenwise):
    """One linear layer per token, as PaliGemma's ``multi_modal_projector``."""

    config_class = LinearConfig

    def __init__(self, config: LinearConfig) -> None:
        super().__init__(config)
        self.proj = nn.Linear(config.input_width, config.out_features)


@dataclass(frozen=True)
class MLPConfig(ProjectorConfig):
    kind = "mlp"
    depth: int = 2  # linear layers, GELU between them
    hidden_features: int | None = None  # width of the hidden layers; None = out_features (LLaVA)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_ints(self, "depth")


@register
class MLPProjector(_Tokenwise):
    """Linear -> GELU -> ... -> linear per token: LLaVA-1.5's ``mlp2x_gelu`` (depth 2), as in transformers'
    ``LlavaMultiModalProjector``."""

    config_class = MLPConfig

    def __init__(self, config: MLPConfig) -> None:
        super().__init__(config)
        hidden = config.hidden_features or config.out_features
        self.proj = mlp(config.input_width, hidden, config.out_features, config.depth)
