"""The pre-norm transformer layer of the SigLIP towers: attention, MLP, and the layer that joins them.

Module and parameter names are transformers' (``self_attn.{q,k,v,out}_proj``, ``mlp.fc1/fc2``, ``layer_norm1/2``),
so Hugging Face state dicts and peft adapters apply without renaming.

Layers run on packed tokens (T, D) (see :mod:`~siglip2_encoder.models.packing`). The layer's maths is written twice:

* the reference path, through the submodules: autograd, peft's LoRA wrappers and forward hooks all see it;
* :func:`inference_layer`, used when autograd records nothing, with the GEMMs supplied by a :class:`Gemms`
  object. :class:`InPlaceGemms` runs them on the layer's live weights, adding residuals in place inside the
  output GEMMs (``x += h @ W.T`` through ``addmm_``), applying GELU in place and writing q, k, v and the MLP
  activations into buffers that every layer of one forward pass reuses: fewer passes over memory and no fresh
  large allocations (each of which costs page faults on CPU). :mod:`~siglip2_encoder.export.onednn` supplies oneDNN
  GEMMs on prepacked copies for a separate inference tower.

:meth:`EncoderLayer.forward_at` is the reference path at one position per sequence, for a last layer of which only
a pooled position is read.

Neither path keeps anything derived from the weights between calls, so no weight change can leave it stale.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..config import TransformerConfig
from .attention import AttendFn

__all__ = ["Attention", "Encoder", "EncoderLayer", "Gemms", "InPlaceGemms", "MLP", "Workspace", "gelu_approximation"]


def gelu_approximation(name: str) -> str:
    """``F.gelu``'s ``approximate`` argument for a name in :data:`~siglip2_encoder.config.SUPPORTED_ACTIVATIONS`."""
    return "tanh" if name == "gelu_pytorch_tanh" else "none"


class Workspace:
    """Buffers one inference forward pass reuses across layers, so big activations are allocated once."""

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        buf = self._buffers.get(name)
        if buf is None or buf.shape != shape or buf.dtype != like.dtype or buf.device != like.device:
            buf = self._buffers[name] = torch.empty(shape, dtype=like.dtype, device=like.device)
        return buf


class Attention(nn.Module):
    """Multi-head self-attention over packed tokens, block-diagonal per image."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.dropout = config.attention_dropout
        width = config.hidden_size
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.q_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Xavier-uniform weights and zero biases (big_vision's ``MultiHeadDotProductAttention``)."""
        for linear in (self.q_proj, self.k_proj, self.v_proj, self.out_proj):
            nn.init.xavier_uniform_(linear.weight)
            nn.init.zeros_(linear.bias)

    def forward(self, x: torch.Tensor, attend: AttendFn) -> torch.Tensor:
        """(T, D) packed tokens -> (T, D)."""
        t = x.shape[0]
        q, k, v = (proj(x).view(t, self.num_heads, self.head_dim) for proj in (self.q_proj, self.k_proj, self.v_proj))
        return self.out_proj(attend(q, k, v, self.dropout if self.training else 0.0))


class MLP(nn.Module):
    """fc1 -> GELU -> fc2."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.approximate = gelu_approximation(config.hidden_act)
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Xavier-uniform weights, biases normal(std=1e-6) (big_vision's ``MlpBlock``)."""
        for linear in (self.fc1, self.fc2):
            nn.init.xavier_uniform_(linear.weight)
            nn.init.normal_(linear.bias, std=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate=self.approximate))


class Gemms(Protocol):
    """The four GEMM steps of :func:`inference_layer`; ``x`` is the (T, D) residual stream."""

    def qkv(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(T, D) -> q, k, v, each (T, heads, head_dim)."""

    def out_residual(self, attended: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """x + out_proj(attended)."""

    def fc1_gelu(self, h: torch.Tensor) -> torch.Tensor:
        """gelu(fc1(h))."""

    def fc2_residual(self, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """x + fc2(h)."""


def inference_layer(
    x: torch.Tensor, norm1: nn.Module, norm2: nn.Module, gemms: Gemms, attend: AttendFn
) -> torch.Tensor:
    """The layer's maths for inference (no autograd, no dropout): x + attn(ln1(x)), then x + mlp(ln2(x))."""
    q, k, v = gemms.qkv(norm1(x))
    x = gemms.out_residual(attend(q, k, v, 0.0), x)
    return gemms.fc2_residual(gemms.fc1_gelu(norm2(x)), x)


class InPlaceGemms:
    """Inference GEMMs on a layer's live weights, updating the residual stream ``x`` in place."""

    def __init__(self, attention: Attention, mlp: MLP, workspace: Workspace) -> None:
        self.attention, self.mlp, self.workspace = attention, mlp, workspace

    def qkv(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        attn, (t, d) = self.attention, h.shape
        qkv = self.workspace.get("q_k_v", (3, t, d), h)
        for out, proj in zip(qkv, (attn.q_proj, attn.k_proj, attn.v_proj)):
            torch.addmm(proj.bias, h, proj.weight.t(), out=out)
        q, k, v = (out.view(t, attn.num_heads, attn.head_dim) for out in qkv)
        return q, k, v

    def out_residual(self, attended: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        proj = self.attention.out_proj
        return x.add_(proj.bias).addmm_(attended, proj.weight.t())

    def fc1_gelu(self, h: torch.Tensor) -> torch.Tensor:
        fc1 = self.mlp.fc1
        out = self.workspace.get("mlp", (h.shape[0], fc1.out_features), h)
        torch.addmm(fc1.bias, h, fc1.weight.t(), out=out)
        return torch.ops.aten.gelu_(out, approximate=self.mlp.approximate)

    def fc2_residual(self, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        fc2 = self.mlp.fc2
        return x.add_(fc2.bias).addmm_(h, fc2.weight.t())


class EncoderLayer(nn.Module):
    """x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = Attention(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = MLP(config)

    def reset_parameters(self) -> None:
        for part in (self.layer_norm1, self.self_attn, self.layer_norm2, self.mlp):
            part.reset_parameters()

    def forward(self, x: torch.Tensor, attend: AttendFn, workspace: Workspace | None = None) -> torch.Tensor:
        """(T, D) packed tokens -> (T, D).

        With a ``workspace`` (given only when autograd records nothing) and plain submodules, ``x`` is updated in
        place and returned; otherwise a new tensor comes back.
        """
        if workspace is None or self.training or not self.is_plain():
            x = x + self.self_attn(self.layer_norm1(x), attend)
            return x + self.mlp(self.layer_norm2(x))
        return inference_layer(
            x, self.layer_norm1, self.layer_norm2, InPlaceGemms(self.self_attn, self.mlp, workspace), attend
        )

    def forward_at(self, x: torch.Tensor, at: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """The layer's output at one position per sequence, for a tower's last layer when only a pooled position
        is read (the text tower's features): every position gives keys and values, only the read one a query,
        attention output and MLP. Runs through the submodules (autograd and peft's wrappers see it).

        Args:
            x: (B, L, D) the layer's input, one padded sequence per row.
            at: (B,) the position to compute in each sequence.
            keep: (B, L), False for keys every query ignores (a padding mask); None attends to all.

        Returns:
            (B, D): what :meth:`forward` gives at those positions.
        """
        attn, (batch, length, width) = self.self_attn, x.shape
        h = self.layer_norm1(x)
        rows = torch.arange(batch, device=x.device)
        q = attn.q_proj(h[rows, at]).view(batch, attn.num_heads, 1, attn.head_dim)
        k, v = (proj(h).view(batch, length, attn.num_heads, attn.head_dim).transpose(1, 2) for proj in
                (attn.k_proj, attn.v_proj))  # fmt: skip
        mask = None if keep is None else keep.to(torch.bool)[:, None, None, :]
        dropout = attn.dropout if self.training else 0.0
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout).reshape(batch, width)
        y = x[rows, at] + attn.out_proj(attended)
        return y + self.mlp(self.layer_norm2(y))

    def has_hooks(self) -> bool:
        """True when a forward hook sits on this layer or any of its submodules."""
        return any(module._forward_hooks or module._forward_pre_hooks for module in self.modules())

    def is_plain(self) -> bool:
        """True when every submodule is the stock one with no hooks, so :func:`inference_layer` computes what the
        submodules would: peft's LoRA wrappers, quantized linears and forward hooks need their own forward to run."""
        if self.has_hooks():
            return False
        for module in self.modules():
            if module is not self and type(module) not in (Attention, MLP, nn.Linear, nn.LayerNorm):
                return False
            # torchao quantizes a Linear in place: same module type, its weight a quantized tensor subclass.
            if any(type(p) is not nn.Parameter for p in module.parameters(recurse=False)):
                return False
        return True


class Encoder(nn.Module):
    """The stack of encoder layers (named ``encoder.layers.N`` as in transformers), shared by both towers."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList([EncoderLayer(config) for _ in range(config.num_hidden_layers)])
        self.gradient_checkpointing = False

    def forward(
        self,
        x: torch.Tensor,
        attend: AttendFn,
        depth: int | None = None,
        fast: bool = True,
        each: Callable[[int, torch.Tensor, bool], None] | None = None,
    ) -> torch.Tensor:
        """Run the first ``depth`` layers (default all) on packed (T, D) tokens.

        Args:
            fast: use the in-place inference path when autograd records nothing (see :func:`inference_layer`).
            each: called as ``each(i, x, in_place)`` with the input of the stack (i = 0) and each layer's output
                (i = 1..depth); ``in_place`` says that later layers will overwrite ``x``, so keep a copy.
        """
        recording = torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters()))
        workspace = Workspace() if fast and not recording else None
        if each is not None:
            each(0, x, workspace is not None)
        for i, layer in enumerate(self.layers[:depth], start=1):
            if self.gradient_checkpointing and self.training and recording:
                x = checkpoint(layer, x, attend, use_reentrant=False)
            else:
                x = layer(x, attend, workspace)
            if each is not None:
                each(i, x, workspace is not None)
        return x
