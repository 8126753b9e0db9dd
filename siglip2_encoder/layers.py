"""The pre-norm transformer layer of the SigLIP vision tower: attention, MLP, and the layer that joins them.

Module and parameter names are transformers' (``self_attn.{q,k,v,out}_proj``, ``mlp.fc1/fc2``, ``layer_norm1/2``),
so Hugging Face state dicts and peft adapters apply without renaming.

Layers run on packed tokens (T, D) (see :mod:`~siglip2_encoder.packing`). Each has two paths that compute the same
function: the reference path through the submodules (autograd, peft's LoRA wrappers, forward hooks), and an
inference path used when nothing records gradients. The inference path adds residuals in place inside the output
GEMMs (``x += h @ W.T`` through ``addmm_``), applies GELU in place, and writes q, k, v and the MLP activations into
buffers reused by every layer of one forward pass: fewer passes over memory and no fresh large allocations (each
of which costs page faults on CPU).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import EncoderConfig
from .packing import Packing

__all__ = ["Attention", "MLP", "EncoderLayer", "Workspace", "activation", "weights_key"]


def activation(name: str, x: torch.Tensor) -> torch.Tensor:
    """The activations named in :data:`~siglip2_encoder.config.SUPPORTED_ACTIVATIONS`."""
    return F.gelu(x, approximate=_gelu_approximation(name))


def weights_key(*tensors: torch.Tensor) -> tuple | None:
    """Identifies the current values of ``tensors``: storage, version counter, dtype, device.

    A cache keyed on it is invalidated by in-place updates (optimizer steps, ``load_state_dict``), by moving or
    casting the model, and by replacing a parameter. None for inference tensors, which have no version counter.
    Writes through ``.data`` bypass the counter: call ``SigLIP2Encoder.clear_caches()`` after them.
    """
    try:
        return tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in tensors)
    except RuntimeError:
        return None


# Above this many tokens per forward pass the stock GEMM is at its peak and the prepacked path was measured slower
# (So400m, batch 8: 0.92-0.97x); below it, up to 1.2x faster (benchmarks/RESULTS.md).
PREPACK_MAX_TOKENS = 1024


def _gelu_approximation(name: str) -> str:
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

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.dropout = config.attention_dropout
        width = config.hidden_size
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.q_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)
        self.fuse_qkv = False  # see SigLIP2Encoder.fuse_qkv
        self._fused: tuple[tuple | None, torch.Tensor, torch.Tensor] | None = None

    def forward(self, x: torch.Tensor, packing: Packing, backend: str) -> torch.Tensor:
        """(T, D) packed tokens -> (T, D); ``backend`` a resolved attention backend name."""
        t = x.shape[0]
        q, k, v = (proj(x).view(t, self.num_heads, self.head_dim) for proj in (self.q_proj, self.k_proj, self.v_proj))
        out = packing.attend(q, k, v, backend, self.dropout if self.training else 0.0)
        return self.out_proj(out)

    def fused_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The (3D, D) weight and (3D,) bias of q, k, v stacked, rebuilt only when those weights change."""
        parts = [self.q_proj, self.k_proj, self.v_proj]
        key = weights_key(*(t for p in parts for t in (p.weight, p.bias)))
        if self._fused is None or key is None or self._fused[0] != key:
            with torch.no_grad():
                weight = torch.cat([p.weight for p in parts])
                bias = torch.cat([p.bias for p in parts])
            self._fused = (key, weight, bias)
        return self._fused[1], self._fused[2]

    def project_qkv(self, x: torch.Tensor, workspace: Workspace) -> tuple[torch.Tensor, ...]:
        """Inference path: q, k, v, each (T, heads, head_dim), written into workspace buffers."""
        t, d = x.shape
        if self.fuse_qkv:
            weight, bias = self.fused_weights()
            qkv = torch.addmm(bias, x, weight.t(), out=workspace.get("qkv", (t, 3 * d), x))
            return qkv.view(t, 3, self.num_heads, self.head_dim).unbind(1)
        qkv = workspace.get("q_k_v", (3, t, d), x)
        for out, proj in zip(qkv, (self.q_proj, self.k_proj, self.v_proj)):
            torch.addmm(proj.bias, x, proj.weight.t(), out=out)
        return tuple(out.view(t, self.num_heads, self.head_dim) for out in qkv)


class MLP(nn.Module):
    """fc1 -> GELU -> fc2."""

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        self.act = config.hidden_act
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(activation(self.act, self.fc1(x)))


class EncoderLayer(nn.Module):
    """x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = Attention(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = MLP(config)
        self.prepack = False  # see SigLIP2Encoder.prepack_for_cpu
        self._prepacked: tuple[tuple | None, dict] | None = None

    def forward(
        self, x: torch.Tensor, packing: Packing, backend: str, workspace: Workspace | None = None
    ) -> torch.Tensor:
        """(T, D) packed tokens -> (T, D).

        With a ``workspace`` (given only when autograd records nothing) and plain submodules, ``x`` is updated in
        place and returned; otherwise a new tensor comes back.
        """
        if workspace is None or not self._plain():
            x = x + self.self_attn(self.layer_norm1(x), packing, backend)
            return x + self.mlp(self.layer_norm2(x))

        if self.prepack and x.device.type == "cpu" and x.shape[0] <= PREPACK_MAX_TOKENS:
            return self._forward_onednn(x, packing, backend)
        attn, mlp = self.self_attn, self.mlp
        q, k, v = attn.project_qkv(self.layer_norm1(x), workspace)
        out = packing.attend(q, k, v, backend, attn.dropout if attn.training else 0.0)
        x.add_(attn.out_proj.bias).addmm_(out, attn.out_proj.weight.t())
        h = self.layer_norm2(x)
        h = torch.addmm(
            mlp.fc1.bias, h, mlp.fc1.weight.t(), out=workspace.get("mlp", (x.shape[0], mlp.fc1.out_features), x)
        )
        torch.ops.aten.gelu_(h, approximate=_gelu_approximation(mlp.act))
        return x.add_(mlp.fc2.bias).addmm_(h, mlp.fc2.weight.t())

    def _forward_onednn(self, x: torch.Tensor, packing: Packing, backend: str) -> torch.Tensor:
        """Inference path on CPU with oneDNN weights prepacked once (see :meth:`prepacked`): the GEMM kernels run
        on weights already in their blocked layout, with GELU and the residual adds fused into them."""
        attn, linear = self.self_attn, torch.ops.mkldnn._linear_pointwise
        w = self.prepacked()
        t = x.shape[0]
        qkv = linear(self.layer_norm1(x), *w["qkv"], "none", [], "")
        q, k, v = qkv.view(t, 3, attn.num_heads, attn.head_dim).unbind(1)
        out = packing.attend(q, k, v, backend, attn.dropout if attn.training else 0.0)
        x = linear.binary(out, x, *w["out"], "add")
        h = linear(self.layer_norm2(x), *w["fc1"], "gelu", [], _gelu_approximation(self.mlp.act))
        return linear.binary(h, x, *w["fc2"], "add")

    def prepacked(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """oneDNN-packed copies of this layer's linear weights (q, k, v stacked), rebuilt when the weights change."""
        attn, mlp = self.self_attn, self.mlp
        linears = {"q": attn.q_proj, "k": attn.k_proj, "v": attn.v_proj, "out": attn.out_proj}
        linears |= {"fc1": mlp.fc1, "fc2": mlp.fc2}
        key = weights_key(*(t for m in linears.values() for t in (m.weight, m.bias)))
        if self._prepacked is None or key is None or self._prepacked[0] != key:
            pack = torch.ops.mkldnn._reorder_linear_weight
            with torch.no_grad():
                qkv = [linears[n] for n in "qkv"]
                packed = {"qkv": (pack(torch.cat([m.weight for m in qkv]), 256), torch.cat([m.bias for m in qkv]))}
                packed |= {n: (pack(linears[n].weight, 256), linears[n].bias.detach()) for n in ("out", "fc1", "fc2")}
            self._prepacked = (key, packed)
        return self._prepacked[1]

    def _plain(self) -> bool:
        """True when every submodule is the stock one with no hooks, so the inference path computes the same thing:
        peft's LoRA wrappers, quantized linears and forward hooks need their own forward to run."""
        for module in self.modules():
            if module._forward_hooks or module._forward_pre_hooks:
                return False
            if module is not self and type(module) not in (Attention, MLP, nn.Linear, nn.LayerNorm):
                return False
        return True
