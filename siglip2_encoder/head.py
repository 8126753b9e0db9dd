"""The multi-head attention-pooling (MAP) head: one learned probe attends over the final tokens.

transformers builds it on ``nn.MultiheadAttention``; this module keeps that module's parameter names
(``attention.in_proj_weight``, ``attention.in_proj_bias``, ``attention.out_proj``) so state dicts load unchanged, but
runs through ``F.scaled_dot_product_attention`` so a boolean key mask (NaFlex padding) costs nothing extra.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import EncoderConfig
from .layers import MLP

__all__ = ["MultiheadAttentionPoolingHead"]


class _PoolingAttention(nn.Module):
    """Cross-attention from a few queries to the tokens, with ``nn.MultiheadAttention``'s parameter layout."""

    def __init__(self, width: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))  # rows: q, k, v
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def forward(self, query: torch.Tensor, tokens: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        """Args:
            query: (B, Q, D).
            tokens: (B, N, D).
            key_mask: optional (B, N) bool, True for real tokens.

        Returns:
            (B, Q, D).
        """
        b, n, d = tokens.shape
        w_q, w_kv = self.in_proj_weight.split([d, 2 * d])
        b_q, b_kv = self.in_proj_bias.split([d, 2 * d])
        head_dim = d // self.num_heads
        q = F.linear(query, w_q, b_q).view(b, -1, self.num_heads, head_dim).transpose(1, 2)  # (B, heads, Q, hd)
        k, v = F.linear(tokens, w_kv, b_kv).view(b, n, 2, self.num_heads, head_dim).permute(2, 0, 3, 1, 4)
        mask = None if key_mask is None else key_mask[:, None, None, :]  # (B, 1, 1, N)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out_proj(out.transpose(1, 2).reshape(b, -1, d))


class MultiheadAttentionPoolingHead(nn.Module):
    """probe -> attention over tokens -> x + mlp(layernorm(x)); the pooled feature of SigLIP."""

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        self.probe = nn.Parameter(torch.randn(1, 1, config.hidden_size))
        self.attention = _PoolingAttention(config.hidden_size, config.num_attention_heads)
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = MLP(config)

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, N, D) tokens after post-layernorm, optional (B, N) bool validity mask -> (B, D) pooled features."""
        x = self.attention(self.probe.expand(tokens.shape[0], -1, -1), tokens, mask)
        x = x + self.mlp(self.layernorm(x))
        return x[:, 0]
