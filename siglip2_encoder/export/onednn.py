"""A CPU inference copy of a tower whose GEMMs run through oneDNN on prepacked weights.

This is the only file that uses PyTorch's private oneDNN ops (``torch.ops.mkldnn._reorder_linear_weight``,
``torch.ops.mkldnn._linear_pointwise``); when PyTorch changes them, delete it with :func:`prepack_for_cpu`.

:func:`prepack_for_cpu` returns a separate tower that owns its own weights: the linear weights of every encoder
layer exist in it only in oneDNN's blocked layout, and nothing is shared with the tower it was made from. Training,
merging adapters into, or loading weights into the original afterwards cannot change the copy, and nothing in the
copy can go stale; to follow new weights, prepack again. Measured on a 2-core CPU (benchmarks/RESULTS.md): 1.17x
to 1.2x at batch 1 on B/16, where the stock GEMM is furthest from its peak; nothing on So400m, and 0.92-0.97x at
large batches, so it is an opt-in for small-batch CPU serving.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..checkpoints.strict import check_plain
from ..models.attention import AttendFn
from ..models.layers import EncoderLayer, Workspace, inference_layer
from ..models.model import SigLIP2Encoder

__all__ = ["PrepackedLayer", "onednn_available", "prepack_for_cpu"]

# oneDNN's block size hint for the packed layout: the batch (token count) the weights are tuned for.
_PACK_BATCH = 256


def onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


class _PackedGemms:
    """The four GEMM steps of :func:`~siglip2_encoder.models.layers.inference_layer` on prepacked weights, with GELU and
    the residual adds fused into the kernels."""

    def __init__(self, layer: EncoderLayer) -> None:
        attn, mlp = layer.self_attn, layer.mlp
        self.num_heads, self.head_dim, self.approximate = attn.num_heads, attn.head_dim, mlp.approximate
        pack = torch.ops.mkldnn._reorder_linear_weight
        with torch.no_grad():
            qkv = (attn.q_proj, attn.k_proj, attn.v_proj)
            weight, bias = torch.cat([m.weight for m in qkv]), torch.cat([m.bias for m in qkv])
            self.weights = {"qkv": (pack(weight, _PACK_BATCH), bias)}
            for name, linear in (("out", attn.out_proj), ("fc1", mlp.fc1), ("fc2", mlp.fc2)):
                self.weights[name] = (pack(linear.weight.detach(), _PACK_BATCH), linear.bias.detach().clone())

    def __deepcopy__(self, memo: dict) -> _PackedGemms:
        # oneDNN's opaque tensors cannot be copied, and nothing ever writes them: a copy may share them.
        return self

    def qkv(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        qkv = torch.ops.mkldnn._linear_pointwise(h, *self.weights["qkv"], "none", [], "")
        q, k, v = qkv.view(h.shape[0], 3, self.num_heads, self.head_dim).unbind(1)
        return q, k, v

    def out_residual(self, attended: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise.binary(attended, x, *self.weights["out"], "add")

    def fc1_gelu(self, h: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(h, *self.weights["fc1"], "gelu", [], self.approximate)

    def fc2_residual(self, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise.binary(h, x, *self.weights["fc2"], "add")


class PrepackedLayer(nn.Module):
    """An encoder layer for inference only: its own copies of the layer norms, and the linear weights prepacked."""

    def __init__(self, layer: EncoderLayer) -> None:
        super().__init__()
        self.layer_norm1 = copy.deepcopy(layer.layer_norm1)
        self.layer_norm2 = copy.deepcopy(layer.layer_norm2)
        self.gemms = _PackedGemms(layer)

    def forward(self, x: torch.Tensor, attend: AttendFn, workspace: Workspace | None = None) -> torch.Tensor:
        if workspace is None:
            raise ValueError(
                "a prepack_for_cpu() tower runs inference only: call it under torch.inference_mode() or "
                "torch.no_grad(), in eval(), with fast_inference on; train the tower it was made from"
            )
        return inference_layer(x, self.layer_norm1, self.layer_norm2, self.gemms, attend)


def prepack_for_cpu(model: SigLIP2Encoder) -> SigLIP2Encoder:
    """A frozen, eval-mode CPU copy of ``model`` whose encoder layers run oneDNN GEMMs on prepacked weights.

    The copy costs about the tower's memory again; ``model`` is not changed. Only plain towers can be prepacked:
    merge LoRA adapters first (``merge_and_unload()``), since a prepacked layer has no adapters.
    """
    if not onednn_available():
        raise ValueError(f"prepack_for_cpu needs PyTorch built with oneDNN (mkldnn); torch {torch.__version__} is not")
    if not isinstance(model, SigLIP2Encoder):
        raise TypeError(
            f"prepack_for_cpu takes a SigLIP2Encoder, got {type(model).__name__}; for a LoRA-wrapped tower pass "
            f"its merge_and_unload()"
        )
    if model.device.type != "cpu" or model.encoder_dtype != torch.float32:
        raise ValueError(
            f"prepack_for_cpu packs fp32 CPU towers; this one is {model.encoder_dtype} on {model.device}: "
            f"call model.float().cpu() first"
        )
    check_plain(model, lambda: SigLIP2Encoder(model.config), "prepack_for_cpu needs a plain tower")
    layers = model.encoder.layers
    packed = copy.deepcopy(model, memo={id(layers): nn.ModuleList()})  # everything but the layers, replaced below
    packed.encoder.layers = nn.ModuleList(PrepackedLayer(layer) for layer in layers)
    return packed.requires_grad_(False).eval()
