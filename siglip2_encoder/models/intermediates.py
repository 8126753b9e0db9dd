"""timm's ``forward_intermediates`` for the vision tower, so that timm-style dense heads (segmentation, depth) take
it as they take timm's own ViTs."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch

from ..output import tokens_to_map

__all__ = ["ForwardIntermediatesMixin"]


class ForwardIntermediatesMixin:
    """``forward_intermediates`` on top of the tower's ``forward`` (its ``layers=`` request)."""

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | Sequence[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: Literal["NCHW", "NLC"] = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """timm's ``forward_intermediates`` for (B, C, H, W) images, so timm-style dense heads can use this tower.

        Indices follow timm, not transformers: block indices 0..num_layers-1 (block i's output is transformers'
        hidden state i + 1); an int n takes the last n blocks; None takes all. ``norm`` applies the post-layernorm
        to each intermediate. Returns the intermediates, preceded by the final post-layernorm tokens (B, N, D)
        unless ``intermediates_only``.
        """
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        n = self.config.num_hidden_layers
        if indices is None:
            indices = n
        if isinstance(indices, int):
            if not 0 < indices <= n:
                raise ValueError(f"indices={indices} must take between 1 and {n} last blocks")
            blocks = list(range(n - indices, n))
        else:
            blocks = [i + n if i < 0 else i for i in indices]
            if any(not 0 <= i < n for i in blocks):
                raise ValueError(f"block indices {list(indices)} must lie in [{-n}, {n - 1}]")
        # Blocks past the last one asked for never run here, so stop_early changes nothing.
        out = self(x, layers=[i + 1 for i in blocks], return_last=not intermediates_only, return_pooled=False)
        feats = [out.hidden_states[i + 1] for i in blocks]
        if norm:
            feats = [self.post_layernorm(f) for f in feats]
        if output_fmt == "NCHW":
            feats = [tokens_to_map(f, out.grids[0]).contiguous() for f in feats]
        if intermediates_only:
            return feats
        return out.last_hidden_state, feats
