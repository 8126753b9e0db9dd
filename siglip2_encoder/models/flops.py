"""Parameter and FLOP counts of the tower, for ``siglip2-encoder info`` and the benchmarks.

FLOPs count a multiply-add as 2. Per image with N tokens, width D, MLP width F and L layers:

* patch embedding: 2 * N * (p * p * C) * D
* each layer: q, k, v, out projections 8 * N * D^2; attention scores and weighted sum 4 * N^2 * D; MLP 4 * N * D * F
* attention-pooling head (one query): k, v projections 4 * N * D^2, q and out 4 * D^2, attention 4 * N * D,
  MLP 4 * D * F

Layer norms, activations, softmax and residual adds are not counted (well under 1% here).
"""

from __future__ import annotations

from ..config import EncoderConfig

__all__ = ["encoder_flops", "num_parameters"]


def encoder_flops(config: EncoderConfig, num_tokens: int, *, layers: int | None = None, pooled: bool = True) -> int:
    """FLOPs for one image of ``num_tokens`` patches through ``layers`` layers (default all) and the head."""
    n, d, f = num_tokens, config.hidden_size, config.intermediate_size
    depth = config.num_hidden_layers if layers is None else layers
    total = 2 * n * config.num_channels * config.patch_size**2 * d
    total += depth * (8 * n * d * d + 4 * n * n * d + 4 * n * d * f)
    if pooled and config.use_head:
        total += 4 * n * d * d + 4 * d * d + 4 * n * d + 4 * d * f
    return total


def num_parameters(config: EncoderConfig) -> int:
    """Number of weights of the tower (the same count ``sum(p.numel() for p in model.parameters())`` gives)."""
    d, f = config.hidden_size, config.intermediate_size

    def linear(fan_in: int, fan_out: int) -> int:
        return fan_in * fan_out + fan_out

    layer = 4 * linear(d, d) + linear(d, f) + linear(f, d) + 4 * d
    total = linear(config.num_channels * config.patch_size**2, d) + config.position_grid**2 * d
    total += config.num_hidden_layers * layer + 2 * d
    if config.use_head:
        total += d + 3 * d * d + 3 * d + linear(d, d) + 2 * d + linear(d, f) + linear(f, d)
    return total
