"""Exact nearest-neighbour search by cosine similarity, over a bank of vectors given in chunks.

Memory is bounded by one chunk's scores plus the running top k per query, so a bank of millions of vectors (the
shards of an ``extract`` folder, read one at a time) is searched without holding it whole.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F

__all__ = ["CHUNK", "top_k"]


CHUNK = 65536  # bank rows scored at once when the bank is one tensor: (Q, 65536) fp32 scores, 256 KiB per query


def top_k(
    queries: torch.Tensor, bank: torch.Tensor | Iterable[torch.Tensor], k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` bank vectors most similar to each query (exact search; for an approximate index over a folder see
    :class:`~siglip2_encoder.pipeline.faiss_index.FaissIndex`).

    Args:
        queries: (Q, D), e.g. ``get_text_features`` of the query texts (normalised here).
        bank: (N, D) vectors in memory (scored :data:`CHUNK` rows at a time), or chunks (n_i, D) in order, such as
            the shards of an ``extract`` folder; a vector's index is its row in their concatenation.
        k: how many per query (fewer if the bank is smaller).

    Returns:
        (Q, k) cosine similarities, highest first, and (Q, k) long indices into the bank.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got k={k!r}")
    queries = F.normalize(queries.float(), dim=-1)
    if isinstance(bank, torch.Tensor):
        bank = bank.split(CHUNK)
    scores = queries.new_empty(len(queries), 0)
    indices = torch.empty(len(queries), 0, dtype=torch.long, device=queries.device)
    offset = 0
    for chunk in bank:
        if chunk.shape[-1] != queries.shape[-1]:
            raise ValueError(f"bank vectors have {chunk.shape[-1]} dimensions, queries {queries.shape[-1]}")
        similarity = queries @ F.normalize(chunk.to(queries.device).float(), dim=-1).T  # (Q, n)
        rows = torch.arange(offset, offset + len(chunk), device=queries.device).expand(len(queries), -1)
        scores, order = torch.cat([scores, similarity], 1).topk(min(k, scores.shape[1] + len(chunk)), dim=1)
        indices = torch.cat([indices, rows], 1).gather(1, order)
        offset += len(chunk)
    return scores, indices
