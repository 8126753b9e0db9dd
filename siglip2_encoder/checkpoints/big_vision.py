"""big_vision's SigLIP image towers (``.npz`` of flax parameter paths): the architecture read from the weights'
shapes (:func:`config_from_big_vision`), the weights under our names (:func:`convert_big_vision`), and both as a
:class:`~.folders.Checkpoint` (:func:`read_big_vision`)."""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from ..config import EncoderConfig, ProcessorConfig
from .folders import Checkpoint
from .hub import CheckpointError

__all__ = ["BIG_VISION_PREFIXES", "config_from_big_vision", "convert_big_vision", "read_big_vision", "read_npz"]


# big_vision's parameter paths (flax module names) of a SigLIP image tower, below its prefix (``params/img/``).
BIG_VISION_PREFIXES = ("params/img/", "img/", "params/", "")
_BV_LAYER_PARTS = {  # ours (in encoder.layers.N.) -> big_vision (in Transformer/encoderblock[_N]/)
    "layer_norm1": "LayerNorm_0",
    "layer_norm2": "LayerNorm_1",
    "mlp.fc1": "MlpBlock_0/Dense_0",
    "mlp.fc2": "MlpBlock_0/Dense_1",
}


def _bv_prefix(arrays: Mapping[str, Any]) -> str:
    for prefix in BIG_VISION_PREFIXES:
        if f"{prefix}embedding/kernel" in arrays:
            return prefix
    raise CheckpointError(
        f"not a big_vision SigLIP image tower: no embedding/kernel under any of {list(BIG_VISION_PREFIXES)} "
        f"(found e.g. {sorted(arrays)[:3]})"
    )


def _bv_layer_count(arrays: Mapping[str, Any], prefix: str) -> tuple[int, bool]:
    """(number of encoder layers, whether they are stacked in one array per weight: big_vision's ``scan`` layout)."""
    stacked = f"{prefix}Transformer/encoderblock/LayerNorm_0/scale"
    if stacked in arrays:
        return int(arrays[stacked].shape[0]), True
    blocks = {
        int(m[1]) for key in arrays if (m := re.match(re.escape(prefix) + r"Transformer/encoderblock_(\d+)/", key))
    }
    return len(blocks), False


def config_from_big_vision(arrays: Mapping[str, Any], *, image_size: int | None = None) -> EncoderConfig:
    """The architecture of a big_vision SigLIP image tower, read from its weights' shapes.

    A 2-D patch kernel is a NaFlex tower (a Dense over flattened patches, its position grid stored (g, g, D)).
    ``image_size`` (fixed-resolution towers) defaults to grid x patch; give it where that is not the native size
    (So400m/14 at 384 has a 27 x 27 grid, 378 pixels).
    """
    prefix = _bv_prefix(arrays)
    kernel = arrays[f"{prefix}embedding/kernel"]
    layers, stacked = _bv_layer_count(arrays, prefix)
    block = f"{prefix}Transformer/encoderblock{'' if stacked else '_0'}/"
    query = arrays[f"{block}MultiHeadDotProductAttention_0/query/kernel"]  # ([L,] D, H, hd)
    common = dict(
        hidden_size=int(query.shape[-3]),
        num_attention_heads=int(query.shape[-2]),
        intermediate_size=int(arrays[f"{block}MlpBlock_0/Dense_0/kernel"].shape[-1]),
        num_hidden_layers=layers,
        use_head=f"{prefix}MAPHead_0/probe" in arrays,
    )
    positions = arrays[f"{prefix}pos_embedding"]
    if kernel.ndim == 2:  # NaFlex: (p * p * C, D)
        patch = math.isqrt(kernel.shape[0] // 3)
        if image_size is not None:
            raise ValueError(
                f"image_size is for fixed-resolution towers; this one is NaFlex, got image_size={image_size}"
            )
        return EncoderConfig(
            patch_size=patch, image_size=None, num_patches=int(positions.shape[0] * positions.shape[1]), **common
        )
    grid = math.isqrt(int(positions.shape[-2]))
    patch = int(kernel.shape[0])
    return EncoderConfig(
        patch_size=patch, image_size=image_size or grid * patch, num_channels=int(kernel.shape[2]), **common
    )


def read_big_vision(path: str | os.PathLike, *, image_size: int | None = None) -> Checkpoint:
    """The image tower of a big_vision ``.npz``: its architecture (read from the shapes), its weights under our
    names, and big_vision's SigLIP preprocessing for it (resize, values to [-1, 1])."""
    arrays = read_npz(path)
    try:
        config = config_from_big_vision(arrays, image_size=image_size)
        state = convert_big_vision(arrays)
    except KeyError as err:
        raise CheckpointError(f"{path} lacks the big_vision weight {err.args[0]!r} of a SigLIP image tower") from None
    return Checkpoint(config, state, ProcessorConfig.default_for(config))


def read_npz(path: str | os.PathLike) -> Mapping[str, np.ndarray]:
    """An ``.npz`` file's arrays, each read when first used (the text tower's are never read)."""
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise CheckpointError(f"cannot read {path} as an .npz file: {err}") from None


def convert_big_vision(arrays: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """big_vision SigLIP image-tower weights (an ``.npz`` of flax paths, e.g. ``params/img/...``) -> this tower's
    names: kernels transposed to PyTorch's (out, in), attention heads flattened, stacked (scanned) layers split.
    Only the image tower's keys are read; the text tower (``params/txt/``) and ``params/t``, ``params/b`` are not."""
    prefix = _bv_prefix(arrays)
    layers, stacked = _bv_layer_count(arrays, prefix)

    def get(path: str, layer: int | None = None) -> torch.Tensor:
        value = arrays[prefix + path]
        return torch.from_numpy(np.asarray(value[layer] if layer is not None else value, dtype=np.float32))

    def attention(path: str, layer: int | None) -> dict[str, torch.Tensor]:
        """q, k, v as (H * hd, D) weights and (H * hd,) biases; out as (D, H * hd)."""
        out = {n: get(f"{path}{n}/kernel", layer).flatten(1).T for n in ("query", "key", "value")}
        out |= {f"{n}_bias": get(f"{path}{n}/bias", layer).flatten() for n in ("query", "key", "value")}
        out["out"] = get(f"{path}out/kernel", layer).flatten(0, -2).T
        out["out_bias"] = get(f"{path}out/bias", layer)
        return out

    kernel = get("embedding/kernel")
    state = {
        "embeddings.patch_embedding.weight": kernel.T if kernel.ndim == 2 else kernel.permute(3, 2, 0, 1),
        "embeddings.patch_embedding.bias": get("embedding/bias"),
        "embeddings.position_embedding.weight": get("pos_embedding").reshape(-1, kernel.shape[-1]),
        "post_layernorm.weight": get("Transformer/encoder_norm/scale"),
        "post_layernorm.bias": get("Transformer/encoder_norm/bias"),
    }
    for i in range(layers):
        block, index = ("Transformer/encoderblock/", i) if stacked else (f"Transformer/encoderblock_{i}/", None)
        ours = f"encoder.layers.{i}."
        for name, theirs in _BV_LAYER_PARTS.items():
            weight = "scale" if name.startswith("layer_norm") else "kernel"
            value = get(f"{block}{theirs}/{weight}", index)
            state[f"{ours}{name}.weight"] = value if weight == "scale" else value.T
            state[f"{ours}{name}.bias"] = get(f"{block}{theirs}/bias", index)
        mha = attention(f"{block}MultiHeadDotProductAttention_0/", index)
        for short, theirs in (("q", "query"), ("k", "key"), ("v", "value"), ("out", "out")):
            state[f"{ours}self_attn.{short}_proj.weight"] = mha[theirs]
            state[f"{ours}self_attn.{short}_proj.bias"] = mha[f"{theirs}_bias"]
    if f"{prefix}MAPHead_0/probe" in arrays:
        mha = attention("MAPHead_0/MultiHeadDotProductAttention_0/", None)
        state |= {
            "head.probe": get("MAPHead_0/probe"),
            "head.attention.in_proj_weight": torch.cat([mha["query"], mha["key"], mha["value"]]),
            "head.attention.in_proj_bias": torch.cat([mha["query_bias"], mha["key_bias"], mha["value_bias"]]),
            "head.attention.out_proj.weight": mha["out"],
            "head.attention.out_proj.bias": mha["out_bias"],
            "head.layernorm.weight": get("MAPHead_0/LayerNorm_0/scale"),
            "head.layernorm.bias": get("MAPHead_0/LayerNorm_0/bias"),
        }
        for r in range(2):
            state[f"head.mlp.fc{r + 1}.weight"] = get(f"MAPHead_0/MlpBlock_0/Dense_{r}/kernel").T
            state[f"head.mlp.fc{r + 1}.bias"] = get(f"MAPHead_0/MlpBlock_0/Dense_{r}/bias")
    return {k: v.contiguous() for k, v in state.items()}
