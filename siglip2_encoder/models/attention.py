"""Block-diagonal self-attention over packed tokens: one registry of kernels, as transformers'
``ALL_ATTENTION_FUNCTIONS``.

Each :class:`AttentionBackend` says where it runs and how to prepare itself for a
:class:`~siglip2_encoder.models.packing.Packing` (once per forward pass, e.g. flex attention's block mask); the
prepared function then serves every layer.
No backend builds a (T x T) or padded (B x N x N) additive mask.

* ``"sdpa"``: ``F.scaled_dot_product_attention`` once per run of equal-length images (the CPU path, and the
  fallback everywhere). A fixed-resolution batch is one run: exactly one SDPA call, as an unpacked model makes.
* ``"varlen"``: PyTorch's ``torch.nn.attention.varlen.varlen_attn`` (flash attention over ``cu_seqlens``).
* ``"flash_attn"``: ``flash_attn.flash_attn_varlen_func`` from the flash-attn package.
* ``"flex"``: ``torch.nn.attention.flex_attention`` with a block-diagonal block mask over the whole sequence; fused
  only under ``torch.compile``, without it PyTorch materialises the scores.

``"auto"`` takes the first of :data:`AUTO_ORDER` that can run (flash_attn, varlen: CUDA, half precision, no
attention dropout), so sdpa on CPU and in fp32.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .packing import Packing

__all__ = [
    "ATTENTION_BACKENDS",
    "AUTO_ORDER",
    "AttendFn",
    "AttentionBackend",
    "attention_backend_names",
    "key_padding_attention",
    "register_attention_backend",
    "select_attention_backend",
]

# q, k, v: (T, heads, head_dim) packed; dropout probability -> (T, heads * head_dim).
AttendFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]


@dataclass(frozen=True)
class AttentionBackend:
    """One attention kernel for packed tokens.

    Attributes:
        name: the registry key, the value of ``SigLIP2Encoder.attention_backend``.
        prepare: ``prepare(packing)`` -> the attention function for that layout, built once per forward pass.
        cuda_half_only: runs only on CUDA tensors in fp16 / bf16 (the flash kernels).
        dropout: supports attention dropout (training with ``attention_dropout > 0``).
        module: a module that must be importable, and how to get it.
    """

    name: str
    prepare: Callable[[Packing], AttendFn]
    cuda_half_only: bool = False
    dropout: bool = True
    module: tuple[str, str] | None = None

    def unavailable(self, device: torch.device, dtype: torch.dtype, dropout: float) -> str | None:
        """Why this backend cannot run here, or None if it can."""
        if self.cuda_half_only and not (device.type == "cuda" and dtype in (torch.float16, torch.bfloat16)):
            return f"needs a CUDA device and fp16 or bf16, got {device.type} and {dtype}"
        if dropout and not self.dropout:
            return f"has no attention dropout (got dropout {dropout}); use 'sdpa' for training with dropout"
        if self.module is not None and importlib.util.find_spec(self.module[0]) is None:
            return f"needs {self.module[0]} ({self.module[1]})"
        return None


ATTENTION_BACKENDS: dict[str, AttentionBackend] = {}
AUTO_ORDER = ("flash_attn", "varlen", "sdpa")


def register_attention_backend(backend: AttentionBackend) -> AttentionBackend:
    """Make ``backend`` selectable by its name."""
    ATTENTION_BACKENDS[backend.name] = backend
    return backend


def attention_backend_names() -> tuple[str, ...]:
    """The values ``SigLIP2Encoder.attention_backend`` accepts."""
    return ("auto", *ATTENTION_BACKENDS)


def select_attention_backend(name: str, device: torch.device, dtype: torch.dtype, dropout: float) -> AttentionBackend:
    """The backend ``name`` names ("auto": the first of :data:`AUTO_ORDER` that runs here); raises ValueError when an
    explicitly named one cannot run here, saying why."""
    if name == "auto":
        return next(
            ATTENTION_BACKENDS[n] for n in AUTO_ORDER if not ATTENTION_BACKENDS[n].unavailable(device, dtype, dropout)
        )
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"attention backend {name!r} is not one of {attention_backend_names()}")
    reason = ATTENTION_BACKENDS[name].unavailable(device, dtype, dropout)
    if reason:
        raise ValueError(f"attention backend {name!r} {reason}; use 'auto' or 'sdpa'")
    return ATTENTION_BACKENDS[name]


def key_padding_attention(keep: torch.Tensor) -> AttendFn:
    """SDPA over a (B, L) batch of padded sequences packed as (B * L, ...), where keys whose ``keep`` (B, L) entry is
    False are ignored by every query (padding queries are still computed): transformers' bidirectional padding mask,
    which the SigLIP text towers take."""
    batch, length = keep.shape
    mask = keep.to(torch.bool)[:, None, None, :]  # (B, 1, 1, L), broadcast over heads and queries

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout: float) -> torch.Tensor:
        q, k, v = (x.unflatten(0, (batch, length)).transpose(1, 2) for x in (q, k, v))  # (B, heads, L, head_dim)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        return out.transpose(1, 2).reshape(batch * length, -1)

    return attend


def _sdpa(packing: Packing) -> AttendFn:
    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout: float) -> torch.Tensor:
        runs = zip(packing.runs_of(q), packing.runs_of(k), packing.runs_of(v))
        # (G, heads, n, head_dim) -> (G * n, heads * head_dim): a view for SDPA's CPU output layout.
        outs = [F.scaled_dot_product_attention(*run, dropout_p=dropout).transpose(1, 2).flatten(0, 1) for run in runs]
        out = outs[0] if len(outs) == 1 else torch.cat(outs)
        return out.reshape(q.shape[0], -1)

    return attend


def _varlen(packing: Packing) -> AttendFn:
    from torch.nn.attention.varlen import varlen_attn

    cu, n = packing.cu_seqlens, packing.max_tokens

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout: float) -> torch.Tensor:
        return varlen_attn(q, k, v, cu, cu, n, n).reshape(q.shape[0], -1)

    return attend


def _flash_attn(packing: Packing) -> AttendFn:
    from flash_attn import flash_attn_varlen_func

    cu, n = packing.cu_seqlens, packing.max_tokens

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout: float) -> torch.Tensor:
        return flash_attn_varlen_func(q, k, v, cu, cu, n, n, dropout_p=dropout).reshape(q.shape[0], -1)

    return attend


def _flex(packing: Packing) -> AttendFn:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    counts = torch.tensor([packing.counts[i] for i in packing.order], device=packing.device)
    image = torch.repeat_interleave(torch.arange(packing.num_images, device=packing.device), counts)

    def same_image(b, h, q_idx, kv_idx):
        return image[q_idx] == image[kv_idx]

    t = packing.num_tokens
    block_mask = create_block_mask(same_image, None, None, t, t, device=packing.device)

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout: float) -> torch.Tensor:
        out = flex_attention(*(x.transpose(0, 1)[None] for x in (q, k, v)), block_mask=block_mask)  # (1, h, T, d)
        return out[0].transpose(0, 1).reshape(q.shape[0], -1)

    return attend


register_attention_backend(AttentionBackend("sdpa", _sdpa))
register_attention_backend(
    AttentionBackend(
        "varlen", _varlen, cuda_half_only=True, dropout=False, module=("torch.nn.attention.varlen", "torch")
    )
)
register_attention_backend(
    AttentionBackend("flash_attn", _flash_attn, cuda_half_only=True, module=("flash_attn", "pip install flash-attn"))
)
register_attention_backend(AttentionBackend("flex", _flex, dropout=False))
