"""Token merging inside the tower (ToMe, Bolya et al., ICLR 2023): after each layer's attention, ``r`` tokens are
merged into their most similar others, so every later layer (and the LLM) sees fewer tokens.

Per layer, as the paper: the tokens are split alternately into sets A (even positions) and B (odd); each A token is
scored against every B token by the cosine of their attention keys (averaged over heads); the ``r`` A tokens with the
best match are merged into it - a size-weighted average, sizes added - and the other A tokens kept. Attention is
proportional: ``log(size)`` is added to every key's logit, so a merged token counts as the tokens it stands for
(tested: a token of size 2 gives the attention of two equal tokens). The pooling head attends proportionally too.
Kept A tokens stay in their order, followed by the B tokens in theirs; a layer merges at most half its tokens.

The merged tokens have no grid: outputs are (B, N', D) token sets with their (B, N') sizes, for the pooled feature
and tokenwise uses. Dense maps (``feature_map``, segmentation) are refused: merging would have to be undone through
the source map, which is not kept. Fixed-resolution batches only (every image the same number of tokens), on the
reference path: SDPA with the size bias (the varlen / flash kernels take no bias).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..config import check_positive_ints
from .head import MultiheadAttentionPoolingHead
from .inputs import parse_inputs
from .layers import EncoderLayer, InPlaceGemms, Workspace
from .model import SigLIP2Encoder

__all__ = ["MergedTokens", "TokenMerging", "bipartite_merge", "merged_forward", "merged_layer", "merged_pooling"]


@dataclass(frozen=True)
class TokenMerging:
    """Merge ``r`` tokens in each layer (ToMe's r; the paper's ViT-L/16 setting is 8, its fastest 13-16).

    ``depth``: the hidden state whose tokens are used (0..num_layers; a VLM's projector layer, e.g. 26 for layer -2
    of a 27-layer tower), so that :meth:`num_tokens` gives an image's count from its patches alone (a VLM checks it
    against its projector's layer); None where each call names its layer (:func:`merged_forward`).
    """

    r: int
    depth: int | None = None

    def __post_init__(self) -> None:
        check_positive_ints(self, "r")
        if self.depth is not None and (
            isinstance(self.depth, bool) or not isinstance(self.depth, int) or self.depth < 0
        ):
            raise ValueError(f"depth must be a hidden-state index 0..num_layers or None, got depth={self.depth!r}")

    def counts(self, tokens: int, layers: int) -> list[int]:
        """Tokens entering the tower and after each of ``layers`` layers."""
        out = [tokens]
        for _ in range(layers):
            out.append(out[-1] - min(self.r, out[-1] // 2))
        return out

    def num_tokens(self, tokens: int, depth: int | None = None) -> int:
        """Tokens of hidden state ``depth`` (after ``depth`` layers; default this merging's own) for an image of
        ``tokens`` patches."""
        depth = self.depth if depth is None else depth
        if depth is None:
            raise ValueError("give the hidden state's depth: num_tokens(tokens, depth), or TokenMerging(r, depth)")
        return self.counts(tokens, depth)[-1]


@dataclass
class MergedTokens:
    """A merged tower's output: ``tokens`` (B, N', D) of the requested hidden state and their ``sizes`` (B, N'),
    the patches each stands for; ``pooled`` (B, D) when the head ran."""

    tokens: torch.Tensor
    sizes: torch.Tensor
    pooled: torch.Tensor | None = None


def bipartite_merge(
    x: torch.Tensor, metric: torch.Tensor, size: torch.Tensor, r: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """ToMe's bipartite soft matching: (B, N, C) tokens, their (B, N, K) similarity metric and (B, N) sizes ->
    (B, N - r, C) and (B, N - r): the ``r`` A tokens (even positions) most similar to a B token (odd positions)
    averaged into it, weighted by size. ``r`` is capped at half the tokens."""
    b, n, c = x.shape
    r = min(r, n // 2)
    if r == 0:
        return x, size
    metric = F.normalize(metric.float(), dim=-1)
    scores = metric[:, ::2] @ metric[:, 1::2].transpose(1, 2)  # (B, A, B-set)
    best, target = scores.max(-1)  # each A token's best B token
    order = best.argsort(dim=-1, descending=True)
    merged, kept = order[:, :r], order[:, r:].sort(-1).values  # A tokens merged away / kept, in their order
    a_x, b_x = x[:, ::2], x[:, 1::2]
    a_size, b_size = size[:, ::2].float(), size[:, 1::2].float()
    into = target.gather(1, merged)  # (B, r) the B token each merged A token joins
    merged_size = a_size.gather(1, merged)
    b_size = b_size.scatter_add(1, into, merged_size)
    # The size-weighted average (s_b x_b + sum s_a x_a) / s_new written as x_b + sum (s_a / s_new) (x_a - x_b): only
    # the r merged rows are computed, the other tokens copied once (4x faster on CPU: benchmarks/RESULTS.md).
    rows = into[..., None].expand(-1, -1, c)
    shift = a_x.gather(1, merged[..., None].expand(-1, -1, c)).float() - b_x.gather(1, rows).float()
    shift = shift * (merged_size / b_size.gather(1, into))[..., None]
    tokens = torch.cat([a_x.gather(1, kept[..., None].expand(-1, -1, c)), b_x], dim=1).float()
    tokens[:, kept.shape[1] :].scatter_add_(1, rows, shift)
    sizes = torch.cat([a_size.gather(1, kept), b_size], dim=1)
    return tokens.to(x.dtype), sizes.to(size.dtype)


def _proportional_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, size: torch.Tensor) -> torch.Tensor:
    """SDPA over (B, heads, N, d) with ``log(size)`` added to each key's logits."""
    bias = size.log()[:, None, None, :].to(q.dtype)  # (B, 1, 1, N)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)


def merged_layer(
    layer: EncoderLayer, x: torch.Tensor, size: torch.Tensor, r: int, workspace: Workspace | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """One encoder layer with proportional attention, then ToMe's merge of ``r`` tokens, then the MLP: (B, N, D)
    tokens and (B, N) sizes -> (B, N - r', D), (B, N - r'). With a ``workspace`` (only when autograd records
    nothing) and a plain layer, the tower's in-place inference GEMMs run it (``x`` is overwritten)."""
    if workspace is not None and not layer.training and layer.is_plain():
        return _fast_merged_layer(layer, x, size, r, workspace)
    attention = layer.self_attn
    b, n, _ = x.shape
    h = layer.layer_norm1(x)
    q, k, v = (
        proj(h).view(b, n, attention.num_heads, attention.head_dim).transpose(1, 2)
        for proj in (attention.q_proj, attention.k_proj, attention.v_proj)
    )
    x = x + attention.out_proj(_proportional_attention(q, k, v, size).transpose(1, 2).reshape(b, n, -1))
    x, size = bipartite_merge(x, k.mean(1), size, r)
    return x + layer.mlp(layer.layer_norm2(x)), size


def _fast_merged_layer(
    layer: EncoderLayer, x: torch.Tensor, size: torch.Tensor, r: int, workspace: Workspace
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`merged_layer` on :class:`~.layers.InPlaceGemms`: residual adds inside the GEMMs, GELU in place, q / k /
    v and MLP buffers reused across layers."""
    attention = layer.self_attn
    gemms = InPlaceGemms(attention, layer.mlp, workspace)
    b, n, d = x.shape
    flat = x.reshape(b * n, d)
    heads = (attention.num_heads, attention.head_dim)
    q, k, v = (t.view(b, n, *heads).transpose(1, 2) for t in gemms.qkv(layer.layer_norm1(flat)))
    attended = _proportional_attention(q, k, v, size).transpose(1, 2).reshape(b * n, d)
    flat = gemms.out_residual(attended, flat)
    merged, size = bipartite_merge(flat.view(b, n, d), k.mean(1), size, r)
    flat = merged.reshape(-1, d)
    flat = gemms.fc2_residual(gemms.fc1_gelu(layer.layer_norm2(flat)), flat)
    return flat.view(b, -1, d), size


def merged_pooling(head: MultiheadAttentionPoolingHead, tokens: torch.Tensor, size: torch.Tensor) -> torch.Tensor:
    """The attention-pooling head over merged (B, N, D) final tokens, attending proportionally: (B, D)."""
    attention = head.attention
    b, n, d = tokens.shape
    heads = attention.num_heads
    w_q, w_kv = attention.in_proj_weight.split([d, 2 * d])
    b_q, b_kv = attention.in_proj_bias.split([d, 2 * d])
    q = F.linear(head.probe[0, 0], w_q, b_q).view(1, heads, 1, d // heads).expand(b, -1, -1, -1)
    k, v = F.linear(tokens, w_kv, b_kv).view(b, n, 2, heads, d // heads).permute(2, 0, 3, 1, 4)
    x = attention.out_proj(_proportional_attention(q, k, v, size).reshape(b, d))
    return x + head.mlp(head.layernorm(x))


def merged_forward(
    tower: SigLIP2Encoder,
    pixel_values: torch.Tensor,
    merging: TokenMerging,
    layer: int | None = None,
    *,
    return_pooled: bool = False,
) -> MergedTokens:
    """``tower`` on a fixed-resolution batch (B, C, H, W) with ToMe in every layer: the tokens of hidden state
    ``layer`` (transformers' indexing; None = ``last_hidden_state``, after the post-layernorm) with their sizes, and
    with ``return_pooled`` the pooled features (the head attending proportionally). Layers past the one asked for run
    only when the pooled feature is asked for."""
    if tower.config.naflex or not isinstance(pixel_values, torch.Tensor) or pixel_values.ndim != 4:
        raise ValueError("token merging takes fixed-resolution batches (B, C, H, W): every image as many tokens")
    if return_pooled and tower.head is None:
        raise ValueError("this tower has no attention-pooling head (use_head=False); pass return_pooled=False")
    layers = tower.encoder.layers
    stop = len(layers) if layer is None or return_pooled else tower.layer_index(layer)
    inputs = parse_inputs(tower.config, pixel_values)
    x = tower.embed(inputs).to(tower.encoder_dtype).view(len(pixel_values), -1, tower.config.hidden_size)
    size = torch.ones(x.shape[:2], dtype=torch.float32, device=x.device)
    wanted = (x, size) if layer is not None and tower.layer_index(layer) == 0 else None
    recording = torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in tower.parameters()))
    workspace = None if recording else Workspace()
    for i, block in enumerate(layers[:stop], start=1):
        kept = workspace is not None and wanted is not None and wanted[0] is x  # the fast path overwrites x
        x, size = merged_layer(block, x.clone() if kept else x, size, merging.r, workspace)
        if layer is not None and tower.layer_index(layer) == i:
            wanted = (x, size)
    final = tower.post_layernorm(x) if layer is None or return_pooled else None
    tokens, sizes = wanted if wanted is not None else (final, size)
    pooled = merged_pooling(tower.head, final, size) if return_pooled else None
    return MergedTokens(tokens, sizes, pooled)
