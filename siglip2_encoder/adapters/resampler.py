"""Resampler projector: a fixed number of learned queries cross-attend to however many tokens an image has."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import check_positive_ints
from .base import ProjectedTokens, Projector, ProjectorConfig, VisionFeatures, mlp, register

__all__ = ["ResamplerConfig", "ResamplerProjector"]


@dataclass(frozen=True)
class ResamplerConfig(ProjectorConfig):
    kind = "resampler"
    num_queries: int = 64  # tokens per image, whatever its grid
    num_heads: int = 8  # must divide out_features
    depth: int = 2  # cross-attention + MLP blocks
    mlp_ratio: int = 4

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_ints(self, "num_queries", "num_heads", "depth", "mlp_ratio")
        if self.out_features % self.num_heads:
            raise ValueError(
                f"num_heads must divide out_features, got num_heads={self.num_heads}, out_features={self.out_features}"
            )


class _CrossAttentionBlock(nn.Module):
    """queries + attn(ln(queries), ln(tokens)), then queries + mlp(ln(queries))."""

    def __init__(self, width: int, heads: int, mlp_ratio: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm_q, self.norm_kv, self.norm_mlp = nn.LayerNorm(width), nn.LayerNorm(width), nn.LayerNorm(width)
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(width, width) for _ in range(4))
        self.mlp = mlp(width, width * mlp_ratio, width, depth=2)

    def forward(self, queries: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """queries (B, Q, D), tokens (B, N, D), mask (B, N) bool or None -> (B, Q, D)."""
        b, q_len, d = queries.shape
        kv = self.norm_kv(tokens)

        def heads(x: torch.Tensor) -> torch.Tensor:
            return x.view(b, -1, self.heads, d // self.heads).transpose(1, 2)  # (B, heads, len, head_dim)

        q = heads(self.q_proj(self.norm_q(queries)))
        attn_mask = None if mask is None else mask[:, None, None, :]
        out = F.scaled_dot_product_attention(q, heads(self.k_proj(kv)), heads(self.v_proj(kv)), attn_mask=attn_mask)
        queries = queries + self.out_proj(out.transpose(1, 2).reshape(b, q_len, d))
        return queries + self.mlp(self.norm_mlp(queries))


@register
class ResamplerProjector(Projector):
    """Perceiver-resampler / Q-Former style (Flamingo, Qwen-VL, Idefics2): ``num_queries`` learned queries attend
    to the image's real tokens only (padding is masked), so every image yields exactly ``num_queries`` tokens.
    No position embedding is added: SigLIP tokens already carry their position."""

    config_class = ResamplerConfig

    def __init__(self, config: ResamplerConfig) -> None:
        super().__init__(config)
        width = config.out_features
        self.queries = nn.Parameter(torch.empty(config.num_queries, width))
        nn.init.trunc_normal_(self.queries, std=0.02)
        self.kv_proj = nn.Linear(config.input_width, width)
        self.blocks = nn.ModuleList(
            _CrossAttentionBlock(width, config.num_heads, config.mlp_ratio) for _ in range(config.depth)
        )
        self.norm = nn.LayerNorm(width)

    def num_tokens(self, grid: tuple[int, int]) -> int:
        return self.config.num_queries

    def project(self, features: VisionFeatures) -> ProjectedTokens:
        tokens = self.kv_proj(features.tokens)
        x = self.queries.expand(len(tokens), -1, -1)
        for block in self.blocks:
            x = block(x, tokens, features.mask)
        return ProjectedTokens(self.norm(x), [self.config.num_queries] * len(tokens))
