"""Fewer vision tokens for the LLM, after the tower and before the projector, where the LLM's savings are: VisionZip's
dominant + contextual tokens (Yang et al., 2024), exact counts known before any forward pass.

VisionZip ranks tokens by the attention a CLS token pays them; SigLIP has no CLS token, so the ranking here is the
attention the tower's own pooling head (its learned probe, which makes SigLIP's image embedding) pays each final
token, averaged over heads. The ``dominant`` best-ranked tokens are kept as they are, in their original order; of the
rest, ``contextual`` evenly spaced ones become targets, every other remaining token is assigned to its most similar
target (cosine of the projector's input features; VisionZip uses attention keys, which the projector's layers do not
carry) and each target becomes the mean of itself and its assigned tokens. An image of at most dominant +
contextual tokens is left whole. The tokens no longer form a grid: a tokenwise projector (``mlp``, ``linear``) maps
them; pooling and pixel-shuffle projectors, tiling and dense maps need the grid and are refused.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..adapters import VisionFeatures
from ..config import check_positive_ints

__all__ = ["TokenPruning"]


@dataclass(frozen=True)
class TokenPruning:
    """Keep ``dominant`` tokens by the pooling head's attention, merge the rest into ``contextual`` tokens."""

    dominant: int
    contextual: int

    def __post_init__(self) -> None:
        check_positive_ints(self, "dominant", "contextual")

    def num_tokens(self, tokens: int) -> int:
        """Tokens an image of ``tokens`` tokens keeps."""
        return min(tokens, self.dominant + self.contextual)

    def reduce(self, features: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """One image's (N, C) features and the (N,) attention the pooling head pays them -> (num_tokens(N), C): the
        dominant tokens in their order, then the contextual ones."""
        n = len(features)
        if n <= self.dominant + self.contextual:
            return features
        dominant = weights.topk(self.dominant).indices.sort().values
        keep = torch.ones(n, dtype=torch.bool, device=features.device)
        keep[dominant] = False
        rest = features[keep]  # (R, C), R > contextual
        step = len(rest) // self.contextual
        targets = torch.arange(self.contextual, device=features.device) * step
        is_target = torch.zeros(len(rest), dtype=torch.bool, device=features.device)
        is_target[targets] = True
        others = rest[~is_target]
        similarity = F.normalize(others.float(), dim=-1) @ F.normalize(rest[targets].float(), dim=-1).T
        assigned = similarity.argmax(-1)  # (R - contextual,) target of each other token
        sums = rest[targets].float().index_add(0, assigned, others.float())
        counts = torch.ones(self.contextual, device=features.device).index_add(
            0, assigned, torch.ones(len(others), device=features.device)
        )
        contextual = (sums / counts[:, None]).to(features.dtype)
        return torch.cat([features[dominant], contextual])

    def reduce_batch(self, features: VisionFeatures, weights: torch.Tensor) -> VisionFeatures:
        """Every image of ``features`` reduced, with its (B, N) pooling-head ``weights``: each image's tokens a
        1 x k row (they no longer form a grid), padded to the longest."""
        per_image = [grid.flatten(0, 1) for grid in features.per_image()]  # (h, w, C) -> (h * w, C)
        reduced = [self.reduce(tokens, w[: len(tokens)]) for tokens, w in zip(per_image, weights)]
        lengths = torch.tensor([len(r) for r in reduced])
        longest = int(lengths.max())
        tokens = torch.stack([F.pad(r, (0, 0, 0, longest - len(r))) for r in reduced])
        mask = (torch.arange(longest) < lengths[:, None]).to(tokens.device)
        return VisionFeatures(tokens, [(1, len(r)) for r in reduced], mask)
