"""Every public SigLIP 2 vision tower (and the common SigLIP 1 ones) in one table.

Widths and depths (sources):

* B = ViT-Base (768 wide, 12 layers, 12 heads, MLP 3072), L = ViT-Large (1024, 24, 16, 4096):
  Dosovitskiy et al. 2021, Table 1.
* So400m (1152 wide, 27 layers, 16 heads, MLP 4304): "Getting ViT in Shape", Alabdulmohsin et al. 2023, Table 1;
  the same numbers are in big_vision's ``vit.py`` variant table ("So400m").
* g-opt (1536 wide, 40 layers, 16 heads, MLP 6144): SigLIP 2 paper (Tschannen et al. 2025), Sec. 2 and model cards;
  timm registers it as ``vit_giantopt_patch16_siglip_*``.
* Resolutions, patch sizes and Hub ids: the ``google/siglip2-*`` model cards of the SigLIP 2 collection.
* NaFlex towers learn a 16x16 position grid (``num_patches=256``) and default to a budget of 256 patches per image:
  their ``config.json`` / ``preprocessor_config.json``.
* Image preprocessing: inputs are scaled to [-1, 1] (mean = std = 0.5) for every SigLIP checkpoint. SigLIP 1
  processors resize bicubic, SigLIP 2 ones bilinear. When a checkpoint is loaded, its own
  ``preprocessor_config.json`` is used, not this table.
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import NAFLEX_NUM_PATCHES, EncoderConfig, ProcessorConfig

__all__ = ["Preset", "PRESETS", "get_preset", "list_presets"]


@dataclass(frozen=True)
class Preset:
    """One released vision tower: its architecture, Hub id and default preprocessing."""

    name: str
    hub_id: str
    config: EncoderConfig
    resample: str  # "bilinear" or "bicubic", the checkpoint processor's resize filter

    @property
    def processor_config(self) -> ProcessorConfig:
        """The checkpoint's preprocessing: native size (fixed resolution) or a 256-patch budget (NaFlex)."""
        return ProcessorConfig.default_for(self.config, resample=self.resample)


_WIDTHS = {  # name: (hidden_size, intermediate_size, num_hidden_layers, num_attention_heads)
    "base": (768, 3072, 12, 12),
    "large": (1024, 4096, 24, 16),
    "so400m": (1152, 4304, 27, 16),
    "giant-opt": (1536, 6144, 40, 16),
}


def _preset(family: str, width: str, patch: int, size: int | None, resample: str = "bilinear") -> Preset:
    """``size`` None: a NaFlex tower with its 16x16 position grid."""
    hidden, mlp, depth, heads = _WIDTHS[width]
    name = f"{family}-{width}-patch{patch}-{size or 'naflex'}"
    config = EncoderConfig(
        hidden_size=hidden,
        intermediate_size=mlp,
        num_hidden_layers=depth,
        num_attention_heads=heads,
        patch_size=patch,
        image_size=size,
        num_patches=None if size else NAFLEX_NUM_PATCHES,
    )
    return Preset(name=name, hub_id=f"google/{name}", config=config, resample=resample)


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        *(_preset("siglip2", "base", 16, s) for s in (224, 256, 384, 512)),
        _preset("siglip2", "base", 32, 256),
        *(_preset("siglip2", "large", 16, s) for s in (256, 384, 512)),
        *(_preset("siglip2", "so400m", 14, s) for s in (224, 384)),
        *(_preset("siglip2", "so400m", 16, s) for s in (256, 384, 512)),
        *(_preset("siglip2", "giant-opt", 16, s) for s in (256, 384)),
        _preset("siglip2", "base", 16, None),
        _preset("siglip2", "so400m", 16, None),
        # SigLIP 1: the same architecture, bicubic preprocessing.
        _preset("siglip", "base", 16, 224, "bicubic"),
        _preset("siglip", "so400m", 14, 224, "bicubic"),
        _preset("siglip", "so400m", 14, 384, "bicubic"),
    ]
}


def list_presets() -> list[str]:
    """Names accepted by :func:`get_preset`, e.g. ``"siglip2-so400m-patch14-384"``."""
    return sorted(PRESETS)


def get_preset(name: str) -> Preset:
    """Look a preset up by name; the ``google/`` Hub id and names without ``siglip2-`` are accepted too
    (``"so400m-patch14-384"`` is SigLIP 2 So400m/14 at 384)."""
    key = name.removeprefix("google/")
    for candidate in (key, f"siglip2-{key}"):
        if candidate in PRESETS:
            return PRESETS[candidate]
    raise ValueError(f"unknown preset {name!r}; choose one of: {', '.join(list_presets())}")
