"""Packed variable-length layout: images with different token counts share one (T, D) token sequence.

Every linear layer runs on the T real tokens only (no padding); attention is block-diagonal, one block per image
(the kernels are in :mod:`~siglip2_encoder.models.attention`). Images are reordered so that those with equal token
counts sit next to each other: each run of equal-length images is then a contiguous (G * n, D) slice that views as a
(G, n, D) batch without copying. :class:`Packing` is pure layout: it computes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

__all__ = ["Packing"]


@dataclass(eq=False)
class Packing:
    """Where each image's tokens sit in the packed (T, D) sequence.

    Attributes:
        grids: each image's token grid (h, w), in input order.
        order: packed slot -> input image index; images sorted by token count (stable), so equal counts are adjacent.
        runs: (first token, number of images, tokens per image) for each run of equal-length images, in packed order.
        device: where the index tensors live.
        length: tokens per image in the padded (B, length, D) outputs, at least the longest image's count.
    """

    grids: tuple[tuple[int, int], ...]
    order: tuple[int, ...]
    runs: tuple[tuple[int, int, int], ...]
    device: torch.device
    length: int

    @classmethod
    def from_grids(cls, grids: list[tuple[int, int]], device: torch.device | str, length: int | None = None) -> Packing:
        """Pack images of these grids; outputs are padded to ``length`` tokens (default: the longest image)."""
        counts = [h * w for h, w in grids]
        order = sorted(range(len(grids)), key=counts.__getitem__)
        runs: list[list[int]] = []
        start = 0
        for i in order:
            n = counts[i]
            if runs and runs[-1][2] == n:
                runs[-1][1] += 1
            else:
                runs.append([start, 1, n])
            start += n
        length = max(counts) if length is None else length
        return cls(tuple(grids), tuple(order), tuple(tuple(r) for r in runs), torch.device(device), length)

    @property
    def num_images(self) -> int:
        return len(self.grids)

    @property
    def num_tokens(self) -> int:
        """T, the number of real tokens of all images."""
        start, images, n = self.runs[-1]
        return start + images * n

    @property
    def max_tokens(self) -> int:
        return self.runs[-1][2]

    @property
    def uniform(self) -> bool:
        """True when every image has ``length`` tokens: one run, images in input order, no padding."""
        return len(self.runs) == 1 and self.runs[0][2] == self.length

    @cached_property
    def counts(self) -> list[int]:
        """Tokens per image in input order."""
        return [h * w for h, w in self.grids]

    @cached_property
    def packed_grids(self) -> list[tuple[int, int]]:
        return [self.grids[i] for i in self.order]

    @cached_property
    def cu_seqlens(self) -> torch.Tensor:
        """(B + 1,) int32 cumulative token counts in packed order, as varlen kernels take them."""
        counts = torch.tensor([0] + [self.counts[i] for i in self.order], dtype=torch.int32)
        return counts.cumsum(0, dtype=torch.int32).to(self.device)

    @cached_property
    def _padded_rows(self) -> torch.Tensor:
        """(T,) row of each packed token in the (B * length) padded layout of the input order."""
        rows = [torch.arange(self.counts[i]) + i * self.length for i in self.order]
        return torch.cat(rows).to(self.device)

    @cached_property
    def inverse_order(self) -> torch.Tensor:
        """(B,) packed slot of each input image."""
        inverse = torch.empty(self.num_images, dtype=torch.long)
        inverse[list(self.order)] = torch.arange(self.num_images)
        return inverse.to(self.device)

    def pack(self, padded: torch.Tensor) -> torch.Tensor:
        """(B, length, X) padded per-image rows (image b's first h_b * w_b real) -> (T, X) packed."""
        if self.uniform:
            return padded.reshape(-1, padded.shape[-1])
        return padded.reshape(-1, padded.shape[-1]).index_select(0, self._padded_rows)

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        """(T, D) packed -> (B, length, D) in input order, padding rows zero."""
        if self.uniform:
            return x.view(self.num_images, self.length, x.shape[-1])
        out = x.new_zeros(self.num_images * self.length, x.shape[-1])
        out.index_copy_(0, self._padded_rows, x)
        return out.view(self.num_images, self.length, -1)

    def mask(self) -> torch.Tensor | None:
        """(B, length) bool validity of :meth:`unpack`'s rows, or None when every row is real."""
        if self.uniform:
            return None
        counts = torch.tensor(self.counts, device=self.device)
        return torch.arange(self.length, device=self.device) < counts[:, None]

    def to_input_order(self, per_image: torch.Tensor) -> torch.Tensor:
        """(B, ...) rows in packed order -> input order."""
        return per_image if self.order == tuple(range(self.num_images)) else per_image[self.inverse_order]

    def runs_of(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The (images, heads, n, head_dim) view of each run of a packed (T, heads, head_dim) tensor, as SDPA takes
        batches; no copies."""
        return [
            x[start : start + images * n].unflatten(0, (images, n)).transpose(1, 2) for start, images, n in self.runs
        ]
