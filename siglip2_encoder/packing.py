"""Packed variable-length execution: images with different token counts share one (T, D) token sequence.

Every linear layer runs on the T real tokens only (no padding); attention is block-diagonal, one block per image.
Images are reordered so that those with equal token counts sit next to each other: each run of equal-length images
is then a contiguous (G * n, D) slice that views as a (G, n, D) batch without copying. Attention backends:

* ``"sdpa"``: ``F.scaled_dot_product_attention`` once per run of equal-length images (the CPU path, and the
  fallback everywhere). A fixed-resolution batch is one run: exactly one SDPA call, as an unpacked model makes.
* ``"varlen"``: PyTorch's ``torch.nn.attention.varlen.varlen_attn`` (flash attention over ``cu_seqlens``; CUDA,
  fp16/bf16).
* ``"flash_attn"``: ``flash_attn.flash_attn_varlen_func`` from the flash-attn package (CUDA, fp16/bf16).
* ``"flex"``: ``torch.nn.attention.flex_attention`` with a block-diagonal block mask over the whole sequence.
  Fused only under ``torch.compile``; without it PyTorch materialises the scores.

``"auto"`` takes flash_attn, then varlen, where they apply (CUDA, half precision, no attention dropout), and sdpa
otherwise. No backend builds a (T x T) or padded (B x N x N) additive mask.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from functools import cached_property
from typing import Literal

import torch
import torch.nn.functional as F

__all__ = ["ATTENTION_BACKENDS", "AttentionBackend", "Packing", "resolve_backend"]

AttentionBackend = Literal["auto", "sdpa", "varlen", "flash_attn", "flex"]
ATTENTION_BACKENDS: tuple[str, ...] = ("auto", "sdpa", "varlen", "flash_attn", "flex")


def _has_torch_varlen() -> bool:
    return importlib.util.find_spec("torch.nn.attention.varlen") is not None


def _has_flash_attn() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype, dropout: float) -> str:
    """The concrete backend for ``backend`` on this device and dtype; raises if an explicit one cannot run."""
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"attention backend {backend!r} is not one of {ATTENTION_BACKENDS}")
    half = dtype in (torch.float16, torch.bfloat16)
    fused_ok = device.type == "cuda" and half and dropout == 0.0
    if backend == "auto":
        if fused_ok and _has_flash_attn():
            return "flash_attn"
        if fused_ok and _has_torch_varlen():
            return "varlen"
        return "sdpa"
    if backend in ("varlen", "flash_attn"):
        if not fused_ok:
            raise ValueError(
                f"attention backend {backend!r} needs a CUDA device, fp16 or bf16 and no attention dropout; got "
                f"{device.type}, {dtype}, dropout {dropout}. Use 'auto' or 'sdpa'"
            )
        if backend == "flash_attn" and not _has_flash_attn():
            raise ValueError("attention backend 'flash_attn' needs the flash-attn package: pip install flash-attn")
        if backend == "varlen" and not _has_torch_varlen():
            raise ValueError(f"attention backend 'varlen' needs torch.nn.attention.varlen (torch {torch.__version__})")
    if backend == "flex" and dropout:
        raise ValueError("attention backend 'flex' has no attention dropout; use 'sdpa' for training with dropout")
    return backend


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

    # ------------------------------------------------------------------------------------------------- attention

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str, dropout: float = 0.0):
        """Block-diagonal self-attention of packed (T, heads, head_dim) q, k, v -> (T, heads * head_dim).

        ``backend`` is a resolved name (see :func:`resolve_backend`), never "auto".
        """
        t, heads, head_dim = q.shape
        if backend == "sdpa":
            outs = []
            for run in self.runs:
                out = F.scaled_dot_product_attention(_run(q, *run), _run(k, *run), _run(v, *run), dropout_p=dropout)
                outs.append(out.transpose(1, 2).reshape(-1, heads * head_dim))  # a view for SDPA's CPU layout
            return outs[0] if len(outs) == 1 else torch.cat(outs)
        if backend == "varlen":
            from torch.nn.attention.varlen import varlen_attn

            cu, n = self.cu_seqlens, self.max_tokens
            return varlen_attn(q, k, v, cu, cu, n, n).reshape(t, -1)
        if backend == "flash_attn":
            from flash_attn import flash_attn_varlen_func

            cu, n = self.cu_seqlens, self.max_tokens
            return flash_attn_varlen_func(q, k, v, cu, cu, n, n, dropout_p=dropout).reshape(t, -1)
        if backend == "flex":
            from torch.nn.attention.flex_attention import flex_attention

            out = flex_attention(*(x.transpose(0, 1)[None] for x in (q, k, v)), block_mask=self.block_mask)
            return out[0].transpose(0, 1).reshape(t, -1)
        raise ValueError(f"unknown attention backend {backend!r}")

    @cached_property
    def block_mask(self):
        """The block-diagonal flex-attention block mask over the packed sequence, built once per packing."""
        from torch.nn.attention.flex_attention import create_block_mask

        counts = torch.tensor([self.counts[i] for i in self.order], device=self.device)
        image = torch.repeat_interleave(torch.arange(self.num_images, device=self.device), counts)

        def same_image(b, h, q_idx, kv_idx):
            return image[q_idx] == image[kv_idx]

        t = self.num_tokens
        return create_block_mask(same_image, None, None, t, t, device=self.device)

    def pool(self, query: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Cross-attention of one (heads, head_dim) query per image to its packed (T, heads, head_dim) keys.

        Returns (B, heads * head_dim) in packed order.
        """
        heads, head_dim = query.shape
        outs = []
        for run in self.runs:
            q = query[None, :, None].expand(run[1], heads, 1, head_dim)
            outs.append(F.scaled_dot_product_attention(q, _run(k, *run), _run(v, *run)).reshape(run[1], -1))
        return outs[0] if len(outs) == 1 else torch.cat(outs)


def _run(x: torch.Tensor, start: int, images: int, n: int) -> torch.Tensor:
    """The (images, heads, n, head_dim) view of one run of a packed (T, heads, head_dim) tensor."""
    return x[start : start + images * n].unflatten(0, (images, n)).transpose(1, 2)
