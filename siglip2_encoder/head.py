"""The multi-head attention-pooling (MAP) head: one learned probe attends over the final tokens.

transformers builds it on ``nn.MultiheadAttention``; this module keeps that module's parameter names
(``attention.in_proj_weight``, ``attention.in_proj_bias``, ``attention.out_proj``) so state dicts load unchanged, but
runs on packed tokens (one SDPA call per run of equal-length images, :meth:`Packing.pool`): no padding, no mask.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import EncoderConfig
from .layers import MLP
from .packing import Packing

__all__ = ["MultiheadAttentionPoolingHead"]


class _PoolingAttention(nn.Module):
    """Cross-attention from the probe to each image's tokens, with ``nn.MultiheadAttention``'s parameter layout."""

    def __init__(self, width: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))  # rows: q, k, v
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def forward(self, query: torch.Tensor, tokens: torch.Tensor, packing: Packing) -> torch.Tensor:
        """Args:
            query: (D,), the same for every image.
            tokens: (T, D) packed tokens.

        Returns:
            (B, D) in packed order.
        """
        t, d = tokens.shape
        w_q, w_kv = self.in_proj_weight.split([d, 2 * d])
        b_q, b_kv = self.in_proj_bias.split([d, 2 * d])
        head_dim = d // self.num_heads
        q = F.linear(query, w_q, b_q).view(self.num_heads, head_dim)
        k, v = F.linear(tokens, w_kv, b_kv).view(t, 2, self.num_heads, head_dim).unbind(1)
        return self.out_proj(packing.pool(q, k, v))


class MultiheadAttentionPoolingHead(nn.Module):
    """probe -> attention over tokens -> x + mlp(layernorm(x)); the pooled feature of SigLIP."""

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        self.probe = nn.Parameter(torch.randn(1, 1, config.hidden_size))
        self.attention = _PoolingAttention(config.hidden_size, config.num_attention_heads)
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = MLP(config)

    def forward(self, tokens: torch.Tensor, packing: Packing) -> torch.Tensor:
        """(T, D) packed tokens after post-layernorm -> (B, D) pooled features in input order."""
        x = self.attention(self.probe[0, 0], tokens, packing)
        return packing.to_input_order(x + self.mlp(self.layernorm(x)))
