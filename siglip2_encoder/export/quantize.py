"""Quantized inference copies of the tower through torchao: int8 weights, optionally int8 dynamic activations.

:func:`quantize` returns a separate frozen copy (the tower it came from is unchanged, so nothing can go stale);
only the encoder layers' linear layers are quantized, the patch and position embeddings, the post-layernorm and the
attention-pool head stay in the tower's precision (benchmarks/RESULTS.md measures speed and the features' fidelity).
Quantized layers run their own (torchao) forward, so the copy takes the reference path, never the in-place one.
"""

from __future__ import annotations

import copy

from ..checkpoints.strict import check_plain
from ..models.model import SigLIP2Encoder

__all__ = ["QUANTIZATIONS", "quantize"]

# scheme -> what torchao does to each linear layer of the encoder.
QUANTIZATIONS = {
    "int8": "int8 weights and int8 dynamic (per-token) activations",
    "int8-weight": "int8 weights, activations in the tower's precision",
}


def quantize(model: SigLIP2Encoder, scheme: str = "int8") -> SigLIP2Encoder:
    """A frozen eval copy of ``model`` whose encoder layers are quantized by torchao (``scheme`` one of
    :data:`QUANTIZATIONS`); ``model`` itself is not changed. The copy cannot be saved or trained."""
    if scheme not in QUANTIZATIONS:
        raise ValueError(f"scheme must be one of {sorted(QUANTIZATIONS)}, got scheme={scheme!r}")
    if not isinstance(model, SigLIP2Encoder):
        raise TypeError(f"quantize takes a SigLIP2Encoder, got {type(model).__name__}; merge LoRA adapters first")
    check_plain(model, lambda: SigLIP2Encoder(model.config), "quantize needs a plain tower")
    try:
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig, quantize_
    except ImportError:
        raise ImportError("quantized inference needs torchao: pip install 'siglip2-encoder[quantize]'") from None
    config = Int8DynamicActivationInt8WeightConfig() if scheme == "int8" else Int8WeightOnlyConfig()
    quantized = copy.deepcopy(model).requires_grad_(False).eval()
    quantize_(quantized.encoder, config)
    return quantized
