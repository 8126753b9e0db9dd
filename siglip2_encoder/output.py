"""The typed result of :class:`~siglip2_encoder.SigLIP2Encoder`, with safe per-image views of variable token counts."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

__all__ = ["EncoderOutput", "Layer", "tokens_to_map"]

# A requested output layer: an int is a hidden state in transformers' indexing (0 = embeddings, -1 = the last layer
# before the post-layernorm, -2 = the penultimate layer); None is ``last_hidden_state``, the final tokens after it.
Layer = int | None


def tokens_to_map(tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Row-major tokens (..., h * w, D) -> feature maps (..., D, h, w)."""
    h, w = grid
    return tokens.unflatten(-2, (h, w)).movedim(-1, -3)


@dataclass
class EncoderOutput:
    """What one forward pass computed; fields that were not asked for are None or absent.

    Token tensors are padded to a common length N when images have different grids (NaFlex, lists of images of
    different sizes); they are computed packed, without padding, and padded on the way out. Padding rows are
    zero and ``attention_mask`` marks the real ones. Image b's real tokens are its first ``h_b * w_b`` rows, in
    row-major order of its (h_b, w_b) grid.

    Attributes:
        last_hidden_state: (B, N, D) final tokens after post-layernorm (transformers' ``last_hidden_state``).
        pooler_output: (B, D) attention-pooled features (transformers' ``pooler_output`` /
            ``get_image_features``).
        hidden_states: requested layers keyed by the index they were requested with, each (B, N, D), indexed as
            transformers' ``hidden_states``: 0 = embeddings, i = output of layer i, -1 = last layer before
            post-layernorm, -2 = the penultimate layer.
        spatial_shapes: (B, 2) long, each image's token grid (h, w).
        attention_mask: (B, N) bool, True for real tokens; None when every token is real.
    """

    last_hidden_state: torch.Tensor | None
    pooler_output: torch.Tensor | None
    hidden_states: dict[int, torch.Tensor] = field(default_factory=dict)
    spatial_shapes: torch.Tensor | None = None
    attention_mask: torch.Tensor | None = None

    def tokens(self, layer: Layer = None) -> torch.Tensor:
        """The padded (B, N, D) tokens of ``layer`` (a requested hidden-state index) or, for None, the final ones."""
        if layer is None:
            if self.last_hidden_state is None:
                raise ValueError(
                    "last_hidden_state was not computed; call the encoder with return_last=True or None in layers"
                )
            return self.last_hidden_state
        if layer not in self.hidden_states:
            raise ValueError(
                f"layer {layer} was not requested; requested layers: {sorted(self.hidden_states)}. "
                f"Pass layers=[{layer}] to the encoder."
            )
        return self.hidden_states[layer]

    @property
    def grids(self) -> list[tuple[int, int]]:
        """Each image's token grid (h, w)."""
        return [(int(h), int(w)) for h, w in self.spatial_shapes.tolist()]

    @property
    def token_counts(self) -> list[int]:
        """Number of real tokens per image (h * w)."""
        return [h * w for h, w in self.grids]

    def per_image(self, layer: Layer = None) -> list[torch.Tensor]:
        """A list of B tensors, image b's real tokens (h_b * w_b, D), padding removed."""
        x = self.tokens(layer)
        return [x[b, :n] for b, n in enumerate(self.token_counts)]

    def padded(self, layer: Layer = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, N, D) tokens and their (B, N) bool validity mask (all True for fixed-resolution batches)."""
        x = self.tokens(layer)
        mask = self.attention_mask
        if mask is None:
            mask = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        return x, mask

    def feature_maps(self, layer: Layer = None) -> list[torch.Tensor]:
        """A list of B maps, image b's tokens as (D, h_b, w_b)."""
        return [tokens_to_map(t, grid) for t, grid in zip(self.per_image(layer), self.grids)]

    def feature_map(self, layer: Layer = None) -> torch.Tensor:
        """(B, D, h, w) maps; every image must share one grid (use :meth:`feature_maps` otherwise)."""
        grids = set(self.grids)
        if len(grids) != 1:
            raise ValueError(
                f"images have different token grids {sorted(grids)}; use feature_maps() for a per-image list"
            )
        h, w = grids.pop()
        return tokens_to_map(self.tokens(layer)[:, : h * w], (h, w))
