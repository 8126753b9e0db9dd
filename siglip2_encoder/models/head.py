"""The multi-head attention-pooling (MAP) head: one learned probe attends over the final tokens.

transformers builds it on ``nn.MultiheadAttention``; this module keeps that module's parameter names
(``attention.in_proj_weight``, ``attention.in_proj_bias``, ``attention.out_proj``) so state dicts load unchanged, but
runs on packed tokens: one SDPA call per run of equal-length images, no padding, no mask.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import EncoderConfig
from .layers import MLP
from .packing import Packing

__all__ = ["MultiheadAttentionPoolingHead"]


class _PoolingAttention(nn.Module):
    """Cross-attention from the probe to each image's tokens, with ``nn.MultiheadAttention``'s parameter layout."""

    def __init__(self, width: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))  # rows: q, k, v
        self.in_proj_bias = nn.Parameter(torch.empty(3 * width))
        self.out_proj = nn.Linear(width, width)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Xavier-uniform weights and zero biases, as big_vision's ``MAPHead`` attention."""
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.in_proj_bias)
        nn.init.xavier_uniform_(self.out_proj.weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, query: torch.Tensor, tokens: torch.Tensor, packing: Packing) -> torch.Tensor:
        """Args:
            query: (D,), the same for every image.
            tokens: (T, D) packed tokens.

        Returns:
            (B, D) in packed order.
        """
        t, d = tokens.shape
        heads, head_dim = self.num_heads, d // self.num_heads
        w_q, w_kv = self.in_proj_weight.split([d, 2 * d])
        b_q, b_kv = self.in_proj_bias.split([d, 2 * d])
        q = F.linear(query, w_q, b_q).view(heads, 1, head_dim)
        k, v = F.linear(tokens, w_kv, b_kv).view(t, 2, heads, head_dim).unbind(1)
        pooled = [
            F.scaled_dot_product_attention(q.expand(len(k_run), -1, -1, -1), k_run, v_run).flatten(1)  # (G, D)
            for k_run, v_run in zip(packing.runs_of(k), packing.runs_of(v))
        ]
        return self.out_proj(pooled[0] if len(pooled) == 1 else torch.cat(pooled))


class MultiheadAttentionPoolingHead(nn.Module):
    """probe -> attention over tokens -> x + mlp(layernorm(x)); the pooled feature of SigLIP."""

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        self.probe = nn.Parameter(torch.empty(1, 1, config.hidden_size))
        self.attention = _PoolingAttention(config.hidden_size, config.num_attention_heads)
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = MLP(config)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        nn.init.xavier_uniform_(self.probe.view(1, -1))
        for part in (self.attention, self.layernorm, self.mlp):
            part.reset_parameters()

    def probe_weights(self, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """How much attention the probe pays each token, averaged over heads: (B, N) final tokens (after the
        post-layernorm; ``mask`` (B, N) True for real ones) -> (B, N) weights, each image's summing to 1 (0 on
        padding), as ``nn.MultiheadAttention``'s ``need_weights=True, average_attn_weights=True``."""
        attention = self.attention
        b, n, d = tokens.shape
        heads = attention.num_heads
        w_q, w_k, _ = attention.in_proj_weight.split([d, d, d])
        b_q, b_k, _ = attention.in_proj_bias.split([d, d, d])
        q = F.linear(self.probe[0, 0], w_q, b_q).view(heads, d // heads)
        k = F.linear(tokens, w_k, b_k).view(b, n, heads, d // heads)
        scores = torch.einsum("hc,bnhc->bhn", q, k) / (d // heads) ** 0.5
        if mask is not None:
            scores = scores.masked_fill(~mask[:, None, :], float("-inf"))
        return scores.softmax(-1).mean(1)

    def forward(self, tokens: torch.Tensor, packing: Packing) -> torch.Tensor:
        """(T, D) packed tokens after post-layernorm -> (B, D) pooled features in input order."""
        x = self.attention(self.probe[0, 0], tokens, packing)
        return packing.to_input_order(x + self.mlp(self.layernorm(x)))
