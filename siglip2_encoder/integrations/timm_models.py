"""timm and open_clip models, both ways: timm's SigLIP ViTs (``vit_*_siglip_*``), its NaFlexViTs
(``naflexvit_*_siglip``) and open_clip's SigLIP image towers (a timm trunk) <-> :class:`SigLIP2Encoder`.

The architecture is read from the timm model itself, not from a name: timm's SigLIP 1 definitions (B/16, So400m/14)
use exact GELU where transformers and big_vision use the tanh approximation, so the activation travels with the model
(``hidden_act="gelu"``) and outputs equal timm's. Anything this tower cannot express (a class token, register
tokens, layer scale, q/k norms, a classifier, another pooling) is refused with the part named; the ``_gap_`` towers
(average pooling, PaliGemma's) load without a head.

Files: :func:`save_timm` writes what ``timm.create_model("local-dir:FOLDER", pretrained=True)`` loads (timm's own
``save_for_hf``); :func:`load_timm` reads such a folder, a ``hf-hub:`` id, or a registered name with ``pretrained``.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import timm
import torch
from timm.layers import GELU, GELUTanh
from timm.models.naflexvit import NaFlexVit
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from ..checkpoints.strict import build_loaded
from ..checkpoints.timm_format import convert_timm_state_dict, to_timm_state_dict
from ..config import EncoderConfig, ProcessorConfig
from ..models.model import SigLIP2Encoder

logger = logging.getLogger(__name__)

__all__ = ["config_from_timm", "from_open_clip", "from_timm", "load_timm", "save_timm", "to_timm"]

# timm's activation modules -> transformers' names; torch's GELU by its ``approximate``.
_ACTIVATIONS: dict[type, str] = {GELU: "gelu", GELUTanh: "gelu_pytorch_tanh"}
_TORCH_GELU = {"none": "gelu", "tanh": "gelu_pytorch_tanh"}
_TIMM_ACT = {"gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh"}
_TIMM_EPS = 1e-6  # timm's SigLIP ViTs build their LayerNorms with this eps


def _activation(module: nn.Module) -> str:
    if type(module) is nn.GELU:
        return _TORCH_GELU[module.approximate]
    if type(module) not in _ACTIVATIONS:
        raise ValueError(f"the timm model's MLP activation is {module!r}; only GELU (exact or tanh) is supported")
    return _ACTIVATIONS[type(module)]


def _refuse_extras(model: nn.Module) -> None:
    """Raise ValueError naming the first part of a timm ViT that this tower does not have."""
    embeds = model.embeds if isinstance(model, NaFlexVit) else model
    patch_norm = getattr(model.embeds if isinstance(model, NaFlexVit) else model.patch_embed, "norm", nn.Identity())
    block = model.blocks[0]
    checks = [
        (
            f"global_pool={model.global_pool!r} (SigLIP pools with 'map'; '' and 'avg' load without a head)",
            model.global_pool not in ("map", "", "avg"),
        ),
        ("a class token (class_token=True)", getattr(embeds, "cls_token", None) is not None),
        ("register tokens (reg_tokens > 0)", getattr(embeds, "reg_token", None) is not None),
        ("a pre-norm (norm_pre)", not isinstance(model.norm_pre, nn.Identity)),
        ("a patch-embedding norm", not isinstance(patch_norm, nn.Identity)),
        ("a classifier head (num_classes > 0)", not isinstance(model.head, nn.Identity)),
        ("an fc_norm after pooling", not isinstance(model.fc_norm, nn.Identity)),
        ("layer scale (init_values)", not isinstance(block.ls1, nn.Identity)),
        ("q/k norms (qk_norm=True)", not isinstance(block.attn.q_norm, nn.Identity)),
    ]
    for part, present in checks:
        if present:
            raise ValueError(f"the timm model has {part}, which the SigLIP tower does not; it cannot be converted")
    if getattr(embeds, "pos_embed_type", "learned") != "learned" or getattr(embeds, "pos_embed", None) is None:
        raise ValueError("the timm model has no learned absolute position table; it cannot be converted")


def config_from_timm(model: nn.Module) -> EncoderConfig:
    """The architecture of a timm SigLIP ViT or NaFlexViT, read from the model's modules."""
    if not isinstance(model, (VisionTransformer, NaFlexVit)):
        raise TypeError(f"expected a timm VisionTransformer or NaFlexVit, got {type(model).__name__}")
    _refuse_extras(model)
    block = model.blocks[0]
    eps = {block.norm1.eps, block.norm2.eps, model.norm.eps}
    if len(eps) != 1:
        raise ValueError(f"the timm model's layer norms use different eps values {sorted(eps)}; expected one")
    common: dict[str, Any] = dict(
        hidden_size=model.embed_dim,
        intermediate_size=block.mlp.fc1.out_features,
        num_hidden_layers=len(model.blocks),
        num_attention_heads=block.attn.num_heads,
        hidden_act=_activation(block.mlp.act),
        layer_norm_eps=eps.pop(),
        use_head=model.attn_pool is not None,
    )
    if model.global_pool == "avg":  # the `_gap_` towers (PaliGemma's): the average has no weights to carry
        logger.info(
            "the timm model averages its tokens (global_pool='avg'): loaded without a head; "
            "last_hidden_state.mean(1) is its pooled output"
        )
    if isinstance(model, NaFlexVit):
        embeds = model.embeds
        if not embeds.is_linear:
            raise ValueError("the NaFlexViT embeds patches with a conv (is_linear=False); only linear is supported")
        if embeds.pos_embed_interp_mode != "bilinear" or embeds.pos_embed_ar_preserving:
            raise ValueError(
                f"the NaFlexViT resizes positions with pos_embed_interp_mode={embeds.pos_embed_interp_mode!r}, "
                f"pos_embed_ar_preserving={embeds.pos_embed_ar_preserving}; SigLIP 2 needs 'bilinear', False"
            )
        grid = embeds.pos_embed.shape[1:3]
        if grid[0] != grid[1] or embeds.patch_size[0] != embeds.patch_size[1]:
            raise ValueError(f"only square grids and patches, got grid {tuple(grid)}, patch {embeds.patch_size}")
        return EncoderConfig(image_size=None, num_patches=grid[0] * grid[1], patch_size=embeds.patch_size[0], **common)
    patch, size = model.patch_embed.patch_size, model.patch_embed.img_size
    if patch[0] != patch[1] or size[0] != size[1]:
        raise ValueError(f"only square images and patches, got img_size {size}, patch_size {patch}")
    return EncoderConfig(
        image_size=size[0], patch_size=patch[0], num_channels=model.patch_embed.proj.in_channels, **common
    )


def _state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    state = model.state_dict()
    if isinstance(model, NaFlexVit) and not model.embeds.channels_last:  # (D, C * p * p) -> ours, (D, p * p * C)
        weight = state["embeds.proj.weight"]
        p = model.embeds.patch_size[0]
        state["embeds.proj.weight"] = weight.view(len(weight), -1, p, p).permute(0, 2, 3, 1).flatten(1)
    return convert_timm_state_dict(state)


def from_timm(model: nn.Module, processor_config: ProcessorConfig | None = None) -> SigLIP2Encoder:
    """A :class:`SigLIP2Encoder` with a timm model's architecture and weights (copied); equal outputs.

    ``processor_config`` defaults to the tower's SigLIP preprocessing with the model's mean, std and filter. (timm's
    own eval transform resizes the short side and centre-crops, which differs from SigLIP's resize for non-square
    images.)
    """
    config = config_from_timm(model)
    if processor_config is None:
        data = getattr(model, "pretrained_cfg", {}) or {}
        resample = data.get("interpolation", "bicubic")
        processor_config = ProcessorConfig.default_for(
            config, resample=resample if resample == "bilinear" else "bicubic"
        )
        if "mean" in data and "std" in data:
            processor_config = processor_config.replace(image_mean=data["mean"], image_std=data["std"])
    state = {k: v.detach().clone() for k, v in _state_dict(model).items()}
    return build_loaded(lambda: SigLIP2Encoder(config, processor_config), state, type(model).__name__, "tower")


def from_open_clip(model: nn.Module, processor_config: ProcessorConfig | None = None) -> SigLIP2Encoder:
    """The image tower of an open_clip SigLIP model (``open_clip.create_model("ViT-B-16-SigLIP", ...)``): its timm
    trunk, refused if open_clip adds a projection or pooling after it (``timm_proj`` / ``timm_pool`` other than
    'none' / the trunk's own)."""
    visual = getattr(model, "visual", model)
    trunk = getattr(visual, "trunk", None)
    if trunk is None:
        raise TypeError(
            f"expected an open_clip model with a timm image tower (visual.trunk), got {type(visual).__name__}; "
            f"open_clip's own ViTs are not SigLIP towers"
        )
    extra = [
        name for name, module in visual.named_children() if name != "trunk" and any(True for _ in module.parameters())
    ]
    if extra:
        raise ValueError(f"the open_clip image tower adds {extra} after its timm trunk, which the SigLIP tower lacks")
    return from_timm(trunk, processor_config)


def to_timm(encoder: SigLIP2Encoder) -> nn.Module:
    """A timm ``VisionTransformer`` (fixed-resolution) or ``NaFlexVit`` (NaFlex) with this tower's architecture and
    weights; equal outputs. Towers timm cannot express (another layer-norm eps, bucketed positions) are refused."""
    config = encoder.config
    if config.layer_norm_eps != _TIMM_EPS:
        raise ValueError(f"timm's SigLIP ViTs use layer_norm_eps={_TIMM_EPS}, this tower {config.layer_norm_eps}")
    if config.position_lookup != "interpolate":
        raise ValueError(f"timm has no ViT with position_lookup={config.position_lookup!r} (Idefics3's buckets)")
    # + 0.5: timm sizes the MLP as int(width * mlp_ratio), which a float ratio can land just below.
    kwargs: dict[str, Any] = dict(
        pretrained=False,
        num_classes=0,
        embed_dim=config.hidden_size,
        depth=config.num_hidden_layers,
        num_heads=config.num_attention_heads,
        mlp_ratio=(config.intermediate_size + 0.5) / config.hidden_size,
        patch_size=config.patch_size,
        act_layer=_TIMM_ACT[config.hidden_act],
        global_pool="map" if config.use_head else "",
    )
    if config.naflex:
        model = timm.create_model(
            "naflexvit_base_patch16_siglip", pos_embed_grid_size=(config.position_grid,) * 2, **kwargs
        )
    else:
        model = timm.create_model(
            "vit_base_patch16_siglip_224", img_size=config.image_size, in_chans=config.num_channels, **kwargs
        )
    state = to_timm_state_dict({k: v.detach().float() for k, v in encoder.state_dict().items()})
    model.load_state_dict(state, strict=True)
    return model.eval()


def save_timm(encoder: SigLIP2Encoder, folder: str | os.PathLike) -> None:
    """Write ``model.safetensors`` and ``config.json`` with timm's own writer; timm loads the folder with
    ``timm.create_model("local-dir:FOLDER", pretrained=True)``."""
    from timm.models import save_for_hf

    model = to_timm(encoder)
    processor = encoder.processor_config
    # timm's "border" crop pads with round(255 x mean) and centres by rounding, DeepSeek-VL's letterbox truncates
    # and floors, pi0's pads at the bottom and right: other pixels
    if processor.letterbox is not None:
        raise ValueError(
            f"save_timm: the tower's processor letterboxes images (letterbox={processor.letterbox!r}), which timm's "
            f"transforms do not reproduce; save it with save_pretrained (transformers' image processor for it does)"
        )
    # SigLIP resizes the whole image to the input size, aspect not kept, no crop: timm's "squash" at crop_pct 1.0
    # (timm's SigLIP defaults are crop_pct 0.9, center: a resize then a crop, pixels up to 1.9 off).
    data = dict(
        mean=list(processor.image_mean),
        std=list(processor.image_std),
        interpolation=processor.resample,
        crop_pct=1.0,
        crop_mode="squash",
    )
    if processor.image_size is not None:
        data["input_size"] = (3, *processor.image_size)
    save_for_hf(model, str(folder), safe_serialization=True, data_config=data)


def load_timm(name_or_folder: str | os.PathLike) -> SigLIP2Encoder:
    """A timm checkpoint: a folder :func:`save_timm` (or timm's ``save_for_hf``) wrote, or ``hf-hub:org/name``."""
    name = str(name_or_folder)
    if os.path.isdir(name):
        name = f"local-dir:{name}"
    model = timm.create_model(name, pretrained=True).eval()
    return from_timm(model)
