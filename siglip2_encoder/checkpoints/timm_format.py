"""timm's names for the tower's weights, both ways: :func:`convert_timm_state_dict` (timm's SigLIP ViT and
NaFlexViT -> ours) and :func:`to_timm_state_dict` (ours -> timm's)."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

import torch

__all__ = ["convert_timm_state_dict", "to_timm_state_dict"]


# Prefixes that differ only by name between timm's SigLIP VisionTransformer (global_pool="map") and this tower;
# "{}" stands for a layer number.
_TIMM_NAMES = [
    ("patch_embed.proj.", "embeddings.patch_embedding."),
    ("blocks.{}.norm1.", "encoder.layers.{}.layer_norm1."),
    ("blocks.{}.norm2.", "encoder.layers.{}.layer_norm2."),
    ("blocks.{}.attn.proj.", "encoder.layers.{}.self_attn.out_proj."),
    ("blocks.{}.mlp.", "encoder.layers.{}.mlp."),
    ("norm.", "post_layernorm."),
    ("attn_pool.proj.", "head.attention.out_proj."),
    ("attn_pool.norm.", "head.layernorm."),
    ("attn_pool.mlp.", "head.mlp."),
]


def _rename(key: str, source: int) -> str | None:
    """``key`` renamed by :data:`_TIMM_NAMES`, reading pairs from side ``source`` (0 = timm, 1 = ours)."""
    for pair in _TIMM_NAMES:
        pattern = re.escape(pair[source]).replace(r"\{\}", r"(\d+)")
        if m := re.match(pattern, key):
            return pair[1 - source].format(*m.groups()) + key[m.end() :]
    return None


def convert_timm_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm SigLIP ViT weights (``vit_*_siglip_*``: no class token, ``global_pool="map"``) or NaFlexViT ones
    (``naflexvit_*_siglip``: ``embeds.*``, patches flattened channels-last) -> this tower's names.

    timm fuses q, k, v (``attn.qkv``) and, in the pooling head, k and v (``attn_pool.kv``); they are split or
    joined here. Unknown keys are passed through, so strict loading names them.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if key == "pos_embed":
            out["embeddings.position_embedding.weight"] = value[0]
        elif key == "embeds.pos_embed":  # (1, g, g, D)
            out["embeddings.position_embedding.weight"] = value[0].flatten(0, 1)
        elif key.startswith("embeds.proj."):
            out["embeddings.patch_embedding." + key.removeprefix("embeds.proj.")] = value
        elif key == "attn_pool.latent":
            out["head.probe"] = value
        elif m := re.fullmatch(r"blocks\.(\d+)\.attn\.qkv\.(weight|bias)", key):
            for name, part in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3)):
                out[f"encoder.layers.{m[1]}.self_attn.{name}.{m[2]}"] = part
        elif m := re.fullmatch(r"attn_pool\.q\.(weight|bias)", key):
            out[f"head.attention.in_proj_{m[1]}"] = torch.cat([value, state_dict[f"attn_pool.kv.{m[1]}"]])
        elif not re.fullmatch(r"attn_pool\.kv\.(weight|bias)", key):
            out[_rename(key, 0) or key] = value
    return out


def to_timm_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """This tower's weights -> timm's names (the inverse of :func:`convert_timm_state_dict`): a NaFlex tower's (its
    patch embedding is a linear layer, a 2-D weight) as NaFlexViT's, a fixed-resolution one's as the SigLIP ViT's."""
    patch = state_dict.get("embeddings.patch_embedding.weight")
    naflex = patch is not None and patch.ndim == 2
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if key == "embeddings.position_embedding.weight" and naflex:
            grid = math.isqrt(len(value))
            out["embeds.pos_embed"] = value.reshape(1, grid, grid, -1)
        elif key == "embeddings.position_embedding.weight":
            out["pos_embed"] = value[None]
        elif key.startswith("embeddings.patch_embedding.") and naflex:
            out["embeds.proj." + key.removeprefix("embeddings.patch_embedding.")] = value
        elif key == "head.probe":
            out["attn_pool.latent"] = value
        elif m := re.fullmatch(r"head\.attention\.in_proj_(weight|bias)", key):
            out[f"attn_pool.q.{m[1]}"], out[f"attn_pool.kv.{m[1]}"] = value.split(
                [len(value) // 3, 2 * len(value) // 3]
            )
        elif m := re.fullmatch(r"encoder\.layers\.(\d+)\.self_attn\.q_proj\.(weight|bias)", key):
            parts = [state_dict[f"encoder.layers.{m[1]}.self_attn.{n}_proj.{m[2]}"] for n in "qkv"]
            out[f"blocks.{m[1]}.attn.qkv.{m[2]}"] = torch.cat(parts)
        elif not re.fullmatch(r"encoder\.layers\.\d+\.self_attn\.[kv]_proj\.(weight|bias)", key):
            name = _rename(key, 1)
            if name is None:
                raise ValueError(f"no timm name for weight {key!r}")
            out[name] = value
    return out
