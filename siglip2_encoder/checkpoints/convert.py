"""Conversions between the tower and foreign formats, as pure functions, and whole checkpoints in and out.

* transformers: :func:`config_from_hf` / :func:`config_to_hf` (``config.json``), :func:`processor_config_from_hf` /
  :func:`processor_config_to_hf` (``preprocessor_config.json``), :func:`convert_hf_state_dict` (image-text or
  vision-only weights, with or without the ``vision_model.`` prefix; the text tower is dropped by name, explicitly).
* timm: :func:`convert_timm_state_dict` / :func:`to_timm_state_dict`.
* :func:`read_checkpoint`: a :class:`~siglip2_encoder.checkpoints.hub.CheckpointSource` -> :class:`Checkpoint`
  (config, state dict, processor config), reading only the shards that hold vision weights; :func:`write_checkpoint`
  writes a folder transformers' ``SiglipVisionModel`` / ``Siglip2VisionModel`` loads; :func:`check_state_dict` is the
  strict key and shape check every loader uses.

Nothing here knows the model class: the tower is described by its :class:`~siglip2_encoder.EncoderConfig` and its
state dict.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..config import NAFLEX_NUM_PATCHES, EncoderConfig, ProcessorConfig, TextConfig
from ..files import write_atomic
from .hub import CheckpointError, CheckpointSource

__all__ = [
    "Checkpoint",
    "build_loaded",
    "ModelCheckpoint",
    "check_state_dict",
    "config_from_big_vision",
    "config_from_hf",
    "config_to_hf",
    "convert_big_vision",
    "convert_hf_state_dict",
    "convert_timm_state_dict",
    "foreign_modules",
    "processor_config_from_hf",
    "processor_config_to_hf",
    "read_big_vision",
    "read_checkpoint",
    "read_config",
    "read_model_checkpoint",
    "read_npz",
    "read_processor_config",
    "read_state_dict",
    "read_text_checkpoint",
    "read_text_config",
    "text_config_from_hf",
    "text_config_to_hf",
    "to_timm_state_dict",
    "write_checkpoint",
    "write_model_checkpoint",
]

logger = logging.getLogger(__name__)

# model_type -> whether the vision tower is NaFlex.
IMAGE_TEXT_TYPES = {"siglip": False, "siglip2": True}
VISION_TYPES = {
    "siglip_vision_model": False,
    "siglip2_vision_model": True,
    "idefics3_vision": False,  # Idefics3VisionTransformer: SigLIP without the head, bucketed positions
    "smolvlm_vision": False,  # SmolVLMVisionTransformer: the same tower
}
TEXT_TYPES = ("siglip_text_model", "siglip2_text_model")  # text-only checkpoints (SiglipTextModel, ...)
# Vision types whose architecture differs from SigLIP's in ways their config.json does not say: the fields fixed here.
# Their other defaults differ from SiglipVisionConfig's too, so their configs are read through transformers.
_FAMILY_FIELDS: dict[str, dict[str, Any]] = {
    "idefics3_vision": {"use_head": False, "position_lookup": "buckets"},
    "smolvlm_vision": {"use_head": False, "position_lookup": "buckets"},
}
_SIGLIP_TOWER_PREFIXES = (  # 4.x before and after its ``model.`` refactor, 5.x in memory and as saved
    "model.vision_tower.vision_model.",
    "vision_tower.vision_model.",
    "model.vision_tower.",
    "vision_tower.",
)
# VLMs that hold a SigLIP-architecture vision tower (its architecture in ``vision_config``) -> where that tower's
# weights live in the key layouts transformers writes. Longest first: the first prefix a key starts with names it; the
# language model's and the projector's keys start with none and are not read.
VLM_TYPES: dict[str, tuple[str, ...]] = {
    "paligemma": _SIGLIP_TOWER_PREFIXES,
    "gemma3": _SIGLIP_TOWER_PREFIXES,
    "llava": _SIGLIP_TOWER_PREFIXES,
    "llava_next": _SIGLIP_TOWER_PREFIXES,
    "llava_onevision": _SIGLIP_TOWER_PREFIXES,
    "lfm2_vl": _SIGLIP_TOWER_PREFIXES,
    "idefics3": ("model.vision_model.",),
    "smolvlm": ("model.vision_model.",),
}


@dataclass(frozen=True)
class _ProcessorKind:
    """What this library reproduces of one transformers image processor."""

    naflex: bool
    resample: int  # PIL code when the file names none (transformers' default for the class)
    # What the processor does beyond one SigLIP view (tiles, aspect-preserving resizes), which is not reproduced: this
    # library preprocesses the single view named here, exactly, and says so in a warning when loading.
    beyond: str = ""


_IDEFICS3_VIEWS = (
    "splits each image into tiles after an aspect-preserving LANCZOS resize; here each image is resized (bicubic) to "
    "one tile of max_image_size pixels, and images already of that size are preprocessed exactly as its tiles"
)
_ANYRES_VIEWS = (
    "adds anyres tiles (image_grid_pinpoints) to the base view; here the base view only: the image resized to the "
    "tower's native square"
)
# image_processor_type -> what is reproduced of it; transformers 4 named its torchvision processors "...Fast".
PROCESSOR_TYPES: dict[str, _ProcessorKind] = {}
for _name, _kind in {
    "SiglipImageProcessor": _ProcessorKind(False, 3),
    "Siglip2ImageProcessor": _ProcessorKind(True, 2),
    "Gemma3ImageProcessor": _ProcessorKind(False, 2),  # SigLIP's, bilinear, plus an optional pan-and-scan
    "Idefics3ImageProcessor": _ProcessorKind(False, 1, _IDEFICS3_VIEWS),
    "SmolVLMImageProcessor": _ProcessorKind(False, 1, _IDEFICS3_VIEWS),
    "LlavaNextImageProcessor": _ProcessorKind(False, 3, _ANYRES_VIEWS),
    "LlavaOnevisionImageProcessor": _ProcessorKind(False, 3, _ANYRES_VIEWS),
    "Lfm2VlImageProcessor": _ProcessorKind(
        True,
        2,
        "resizes each image between min_image_tokens and max_image_tokens by its own rule and adds tiles; here one "
        "NaFlex view within max_image_tokens x downsample_factor**2 patches, resized by SigLIP 2's rule",
    ),
}.items():
    PROCESSOR_TYPES[_name] = PROCESSOR_TYPES[_name + "Fast"] = _kind
# EncoderConfig field -> transformers' name, where they differ.
_HF_FIELD_NAMES = {"use_head": "vision_use_head"}
_PIL_RESAMPLE = {2: "bilinear", 3: "bicubic"}  # PIL's codes, as transformers stores them
_LANCZOS = 1

VISION_PREFIX = "vision_model."
TEXT_PREFIX = "text_model."
# Weights of an image-text checkpoint that are not the vision tower; skipped by name, never silently.
_NON_VISION_PREFIXES = ("text_model.", "logit_scale", "logit_bias")
# Non-persistent buffers that older transformers versions wrote into checkpoints.
_NON_TEXT_PREFIXES = ("vision_model.", "logit_scale", "logit_bias")
_IGNORED_BUFFERS = ("embeddings.position_ids",)
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
# transformers 5 saves a processor's settings in processor_config.json under "image_processor"; older versions and
# image processors saved alone write preprocessor_config.json.
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")


# ----------------------------------------------------------------------------------------------------- configs


def _square(value: Any, name: str) -> Any:
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise CheckpointError(f"only square {name} is supported, got {name}={list(value)}")
        return value[0]
    return value


def _resolved_vision_config(hf_config: Mapping[str, Any]) -> dict[str, Any]:
    """The vision tower's fields of a VLM or non-SigLIP vision config as transformers resolves them (each family's
    config class fills in its own defaults, which differ from SiglipVisionConfig's)."""
    from transformers import AutoConfig  # only for these families: plain SigLIP configs load without transformers

    settings = {k: v for k, v in hf_config.items() if k != "model_type"}
    try:
        resolved = AutoConfig.for_model(hf_config["model_type"], **settings)
    except Exception as err:  # transformers' own validation: say which file it was
        raise CheckpointError(
            f"config.json ({hf_config['model_type']!r}) is not a config transformers accepts: {err}"
        ) from None
    return (resolved.vision_config if hf_config["model_type"] in VLM_TYPES else resolved).to_dict()


def _vision_fields(hf_config: Mapping[str, Any]) -> tuple[str, Mapping[str, Any]]:
    """(vision model_type, its fields) of a transformers config.json with a SigLIP-architecture vision tower."""
    model_type = hf_config.get("model_type")
    if model_type in IMAGE_TEXT_TYPES:
        return ("siglip2" if IMAGE_TEXT_TYPES[model_type] else "siglip") + "_vision_model", hf_config.get(
            "vision_config"
        ) or {}
    if model_type in VISION_TYPES and model_type not in _FAMILY_FIELDS:
        return model_type, hf_config
    if model_type in VISION_TYPES or model_type in VLM_TYPES:
        vision = _resolved_vision_config(hf_config)
        if vision.get("model_type") not in VISION_TYPES:
            raise CheckpointError(
                f"config.json is a {model_type!r} checkpoint whose vision tower is {vision.get('model_type')!r}, "
                f"not a SigLIP-architecture tower (one of {', '.join(VISION_TYPES)}); load it with the library of its "
                f"own tower"
            )
        return vision["model_type"], vision
    if model_type in TEXT_TYPES:
        raise CheckpointError(
            f"config.json has model_type={model_type!r}: a text-only checkpoint, without a vision tower; give a "
            f"vision-only or image-text checkpoint, or embed texts with it (SigLIP2TextEncoder, `embed-text`)"
        )
    if model_type is None and "architecture" in hf_config:  # timm's pretrained config names its model this way
        raise CheckpointError(
            f"config.json is timm's (architecture={hf_config['architecture']!r}), not transformers'; load it with "
            f"siglip2_encoder.integrations.timm_models.load_timm, or convert it once: "
            f"`siglip2-encoder convert SRC DST --to hf`"
        )
    raise CheckpointError(
        f"config.json has model_type={model_type!r}; expected one of "
        f"{sorted([*IMAGE_TEXT_TYPES, *VISION_TYPES, *VLM_TYPES])} (a SigLIP or SigLIP 2 checkpoint, or a VLM with "
        f"a SigLIP tower)"
    )


def config_from_hf(hf_config: Mapping[str, Any]) -> EncoderConfig:
    """The vision tower's config from a transformers ``config.json``: image-text, vision-only, or a VLM's
    (:data:`VLM_TYPES`) whose vision tower has SigLIP's architecture.

    Fields missing from the file take transformers' defaults: for SigLIP's own types, :class:`EncoderConfig`'s; for
    the other families, their config classes' (read through transformers).
    """
    vision_type, vision = _vision_fields(hf_config)
    naflex = VISION_TYPES[vision_type]
    fixed = _FAMILY_FIELDS.get(vision_type, {})
    kwargs: dict[str, Any] = dict(fixed)
    for field in fields(EncoderConfig):
        key = _HF_FIELD_NAMES.get(field.name, field.name)
        if field.name not in ("image_size", "num_patches", *fixed) and vision.get(key) is not None:
            kwargs[field.name] = vision[key]
    kwargs["patch_size"] = _square(kwargs.get("patch_size", EncoderConfig.patch_size), "patch_size")
    if "attention_dropout" in kwargs:
        kwargs["attention_dropout"] = float(kwargs["attention_dropout"])
    if naflex:
        return EncoderConfig(image_size=None, num_patches=vision.get("num_patches", NAFLEX_NUM_PATCHES), **kwargs)
    return EncoderConfig(image_size=_square(vision.get("image_size", EncoderConfig.image_size), "image_size"), **kwargs)


def config_to_hf(config: EncoderConfig) -> dict[str, Any]:
    """A vision-only transformers ``config.json``: ``SiglipVisionModel`` or ``Siglip2VisionModel``, or for a tower
    with bucketed positions (from Idefics3 / SmolVLM) ``Idefics3VisionTransformer``."""
    if config.position_lookup == "buckets":
        if config.use_head:
            raise ValueError(
                "a tower with position_lookup='buckets' and a head has no transformers class to save it as "
                "(Idefics3VisionTransformer has no head); set use_head=False"
            )
        out: dict[str, Any] = {"architectures": ["Idefics3VisionTransformer"], "model_type": "idefics3_vision"}
        skipped = ("use_head", "position_lookup")
    else:
        out = {
            "architectures": ["Siglip2VisionModel" if config.naflex else "SiglipVisionModel"],
            "model_type": "siglip2_vision_model" if config.naflex else "siglip_vision_model",
        }
        skipped = ("position_lookup",)
    for name, value in config.to_dict().items():
        if value is not None and name not in skipped:
            out[_HF_FIELD_NAMES.get(name, name)] = value
    return out


def text_config_from_hf(hf_config: Mapping[str, Any]) -> TextConfig:
    """The text tower's config from an image-text ``config.json`` (its ``text_config``) or a text-only one;
    transformers' defaults for missing fields, which are :class:`TextConfig`'s own."""
    model_type = hf_config.get("model_type")
    if model_type in TEXT_TYPES:
        text = hf_config
    elif model_type in IMAGE_TEXT_TYPES:
        text = hf_config.get("text_config") or {}
    else:
        raise CheckpointError(
            f"config.json has model_type={model_type!r}, which has no text tower; give an image-text checkpoint "
            f"({' or '.join(sorted(IMAGE_TEXT_TYPES))}; a vision-only one loads with SigLIP2Encoder.from_pretrained)"
        )
    kwargs = {f.name: text[f.name] for f in fields(TextConfig) if text.get(f.name) is not None}
    if "attention_dropout" in kwargs:
        kwargs["attention_dropout"] = float(kwargs["attention_dropout"])
    return TextConfig(**kwargs)


def text_config_to_hf(config: TextConfig, siglip2: bool) -> dict[str, Any]:
    """transformers' ``text_config`` of an image-text ``config.json``. The special token ids are the tokenizer's,
    which the tower does not know (nor use): written as null, since transformers' defaults for a missing field
    (bos 49406, eos 49407, from CLIP's vocabulary) lie outside most SigLIP vocabularies and warn at load."""
    out: dict[str, Any] = {
        "model_type": "siglip2_text_model" if siglip2 else "siglip_text_model",
        "bos_token_id": None,
        "eos_token_id": None,
    }
    return out | {name: value for name, value in config.to_dict().items() if value is not None}


def processor_config_from_hf(hf: Mapping[str, Any], tower: EncoderConfig) -> ProcessorConfig:
    """From transformers' image processor settings (SigLIP's and SigLIP 2's, and the VLM processors of
    :data:`PROCESSOR_TYPES`: their single view, with a warning naming what else they do).

    The tower decides the kind of preprocessing (a NaFlex tower needs NaFlex patches); ``image_processor_type``, when
    the file names one, must agree with it. Missing fields take transformers' defaults.
    """
    name = hf.get("image_processor_type")
    if name is not None and name not in PROCESSOR_TYPES:
        raise CheckpointError(
            f"the image processor is {name!r}; expected one of {sorted(PROCESSOR_TYPES)} (a SigLIP processor, or a "
            f"VLM's whose single view this library reproduces)"
        )
    kind = PROCESSOR_TYPES[name] if name is not None else _ProcessorKind(tower.naflex, 2 if tower.naflex else 3)
    if kind.naflex != tower.naflex:
        raise CheckpointError(
            f"the image processor is {name!r} but the tower is {'NaFlex' if tower.naflex else 'fixed-resolution'}; "
            f"the checkpoint's config.json and processor settings do not belong together"
        )
    if hf.get("do_pan_and_scan"):
        raise CheckpointError(
            f"the image processor {name!r} crops pan-and-scan views (do_pan_and_scan=true), which this library does "
            f"not reproduce; set it false in the processor file to get the single resized view"
        )
    resample = hf.get("resample", kind.resample)
    if kind.beyond:
        logger.warning("the image processor %s %s", name, kind.beyond)
        if resample == _LANCZOS:
            resample = 3
    if resample not in _PIL_RESAMPLE:
        raise CheckpointError(f"the image processor has resample={resample!r}; supported: {_PIL_RESAMPLE} (PIL codes)")
    names = ("image_mean", "image_std", "rescale_factor", "do_resize", "do_rescale", "do_normalize")
    common = {name: hf[name] for name in names if hf.get(name) is not None}
    try:
        if tower.naflex:
            patch = hf.get("patch_size", hf.get("encoder_patch_size", tower.patch_size))
            if patch != tower.patch_size:
                raise CheckpointError(
                    f"the image processor cuts {patch}-pixel patches but the tower's patch_size is {tower.patch_size}"
                )
            budget = hf.get("max_num_patches", NAFLEX_NUM_PATCHES)
            if "max_image_tokens" in hf:  # LFM2-VL: its whole-image view's budget, in tokens after its 2x2 unshuffle
                budget = hf["max_image_tokens"] * hf.get("downsample_factor", 2) ** 2
            return ProcessorConfig(
                image_size=None, max_num_patches=budget, patch_size=patch, resample=_PIL_RESAMPLE[resample], **common
            )
        return ProcessorConfig(
            image_size=_view_size(hf, kind, tower),
            patch_size=tower.patch_size,
            resample=_PIL_RESAMPLE[resample],
            **common,
        )
    except CheckpointError:
        raise
    except (ValueError, TypeError) as err:
        raise CheckpointError(f"invalid image processor settings: {err}") from None


def _view_size(hf: Mapping[str, Any], kind: _ProcessorKind, tower: EncoderConfig) -> tuple[int, int]:
    """(height, width) of the fixed-resolution view: ``size``; for Idefics3's processors, one tile
    (``max_image_size``); for anyres ones without height and width (LLaVA-NeXT's shortest edge), the tower's square."""
    tile = hf.get("max_image_size")
    if kind.beyond and isinstance(tile, Mapping) and "longest_edge" in tile:
        return (tile["longest_edge"], tile["longest_edge"])
    size = hf.get("size", {"height": 224, "width": 224})
    if isinstance(size, Mapping) and {"height", "width"} <= set(size):
        return (size["height"], size["width"])
    if kind.beyond:
        return (tower.image_size, tower.image_size)
    raise CheckpointError(f"the image processor's size must give height and width, got size={size!r}")


def processor_config_to_hf(config: ProcessorConfig) -> dict[str, Any]:
    """transformers' ``preprocessor_config.json`` for this preprocessing."""
    out: dict[str, Any] = {
        "do_resize": config.do_resize,
        "resample": {v: k for k, v in _PIL_RESAMPLE.items()}[config.resample],
        "do_rescale": config.do_rescale,
        "rescale_factor": config.rescale_factor,
        "do_normalize": config.do_normalize,
        "image_mean": list(config.image_mean),
        "image_std": list(config.image_std),
    }
    if config.naflex:
        return {
            "image_processor_type": "Siglip2ImageProcessor",
            "patch_size": config.patch_size,
            "max_num_patches": config.max_num_patches,
            **out,
        }
    height, width = config.image_size
    return {
        "image_processor_type": "SiglipImageProcessor",
        "do_convert_rgb": True,
        "size": {"height": height, "width": width},
        **out,
    }


# ----------------------------------------------------------------------------------------------------- weights


KeyMap = Callable[[str], "str | None"]  # a checkpoint key -> our name for it, or None to skip it


def _tower_keys(prefix: str, others: tuple[str, ...]) -> KeyMap:
    """Names one tower's keys of a SigLIP checkpoint, with or without its ``prefix``; keys starting with ``others``
    (the other tower, ``logit_scale``, ``logit_bias``) are known not to belong to it and are skipped by name."""

    def select(key: str) -> str | None:
        if key.startswith(others):
            return None
        key = key.removeprefix(prefix)
        return None if key in _IGNORED_BUFFERS else key

    return select


_vision_key = _tower_keys(VISION_PREFIX, _NON_VISION_PREFIXES)


def _vlm_tower_keys(prefixes: tuple[str, ...]) -> KeyMap:
    """Names a VLM checkpoint's keys as the tower does; None for the language model's and projector's weights."""

    def select(key: str) -> str | None:
        for prefix in prefixes:
            if key.startswith(prefix):
                key = key.removeprefix(prefix)
                return None if key in _IGNORED_BUFFERS else key
        return None

    return select


_text_key = _tower_keys(TEXT_PREFIX, _NON_TEXT_PREFIXES)


def _model_key(key: str) -> str | None:
    """An image-text checkpoint's key as the joint model names it: unchanged, but for stale non-persistent buffers."""
    return None if key.removeprefix(VISION_PREFIX).removeprefix(TEXT_PREFIX) in _IGNORED_BUFFERS else key


def convert_hf_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers SigLIP / SigLIP 2 weights -> this tower's names (the same names, minus prefix and text tower)."""
    return {name: value for key, value in state_dict.items() if (name := _vision_key(key)) is not None}


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


def foreign_modules(model: torch.nn.Module, reference: torch.nn.Module) -> list[tuple[str, str]]:
    """(name, qualified type) of every outermost module of ``model`` whose type differs from ``reference``'s module
    of that name (LoRA wrappers, quantized or prepacked layers): their weights do not have the checkpoint layout.
    ``reference`` is the plain model of the same config (build it on the meta device: it costs no memory)."""
    own = {name: type(m) for name, m in reference.named_modules()}
    foreign: list[tuple[str, str]] = []
    for name, module in model.named_modules():
        inside = foreign and name.startswith(foreign[-1][0] + ".")
        if own.get(name) is not type(module) and not inside:
            foreign.append((name, f"{type(module).__module__}.{type(module).__qualname__}"))
    return foreign


def check_state_dict(
    expected: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor], source: str, what: str = "tower"
) -> None:
    """Strict loading: raise :class:`CheckpointError` listing missing, unexpected and misshapen weights.

    ``expected`` is the model's own state dict (shapes only are read; a model on the meta device will do).
    """
    for key, tensor in state.items():
        if key in expected and tensor.shape != expected[key].shape:
            raise CheckpointError(
                f"weight {key} in {source} has shape {tuple(tensor.shape)}, but the config implies "
                f"{tuple(expected[key].shape)}"
            )
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:

        def show(keys: list[str]) -> str:
            return ", ".join(keys[:8]) + (f", ... ({len(keys)} in all)" if len(keys) > 8 else "")

        parts = [
            f"missing: {show(missing)}" if missing else "",
            f"unexpected: {show(unexpected)}" if unexpected else "",
        ]
        raise CheckpointError(
            f"the weights in {source} do not match the {what} its config describes "
            f"({'; '.join(p for p in parts if p)}). Is this a SigLIP / SigLIP 2 checkpoint, and is config.json its own?"
        )


ModuleT = TypeVar("ModuleT", bound=torch.nn.Module)


def build_loaded(
    build: Callable[[], ModuleT],
    state_dict: Mapping[str, torch.Tensor],
    source: str,
    what: str,
    device: str | torch.device | None = None,
) -> ModuleT:
    """``build()`` on the meta device, checked strictly against ``state_dict`` and given its tensors (no random
    initialisation, no copy), moved to ``device``, in eval(): the last step of every ``from_pretrained``."""
    with torch.device("meta"):
        model = build()
    check_state_dict(model.state_dict(), state_dict, source, what=what)
    model.load_state_dict(state_dict, strict=True, assign=True)
    return model.to(device=device).eval() if device is not None else model.eval()


# ----------------------------------------------------------------------------------------------------- checkpoints


@dataclass(frozen=True)
class ModelCheckpoint:
    """An image-text model as stored: both towers' architectures, every weight (transformers' names), preprocessing."""

    vision_config: EncoderConfig
    text_config: TextConfig
    state_dict: dict[str, torch.Tensor]
    processor_config: ProcessorConfig


@dataclass(frozen=True)
class Checkpoint:
    """A vision tower as stored: architecture, weights under the tower's names, and its preprocessing."""

    config: EncoderConfig
    state_dict: dict[str, torch.Tensor]
    processor_config: ProcessorConfig


def _missing_config(source: CheckpointSource) -> CheckpointError:
    """The error for a source without ``config.json``, naming open_clip's layout when it is that."""
    if source.get("open_clip_config.json") is not None:
        return CheckpointError(
            f"{source} is an open_clip checkpoint (open_clip_config.json, no config.json); build it with "
            f"open_clip.create_model_and_transforms and take its image tower with "
            f"siglip2_encoder.integrations.timm_models.from_open_clip(model)"
        )
    return source.missing("config.json; is it a transformers SigLIP checkpoint?")


def read_config(source: CheckpointSource) -> EncoderConfig:
    """The tower's config from the source's ``config.json``."""
    hf_config = source.read_json("config.json")
    if hf_config is None:
        raise _missing_config(source)
    try:
        return config_from_hf(hf_config)
    except CheckpointError:
        raise
    except (ValueError, TypeError) as err:
        raise CheckpointError(f"config.json of {source} is not a valid SigLIP config: {err}") from None


def read_processor_config(source: CheckpointSource, tower: EncoderConfig) -> ProcessorConfig:
    """The checkpoint's preprocessing, from whichever layout transformers wrote; SigLIP 2's defaults for the tower
    (with a warning) only when the source has no processor file at all."""
    for filename in PROCESSOR_FILES:
        settings = source.read_json(filename)
        if settings is None:
            continue
        if filename == "processor_config.json":
            settings = settings.get("image_processor")
            if not isinstance(settings, dict):
                continue  # a processor file without image settings (e.g. a tokenizer-only processor)
        try:
            return processor_config_from_hf(settings, tower)
        except CheckpointError as err:
            raise CheckpointError(f"{filename} of {source}: {err}") from None
    default = ProcessorConfig.default_for(tower)
    logger.warning("%s has no %s; using the SigLIP 2 defaults %s", source, " or ".join(PROCESSOR_FILES), default)
    return default


def _shard_names(index_file: Path, select: KeyMap) -> list[str]:
    """The shard files of a sharded checkpoint that hold weights ``select`` keeps."""
    try:
        weight_map = json.loads(index_file.read_text())["weight_map"]
        return sorted({file for key, file in weight_map.items() if select(key)})
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise CheckpointError(f"{index_file} is not a valid checkpoint index (needs a 'weight_map'): {err}") from err


def _weight_files(source: CheckpointSource, select: KeyMap) -> list[Path]:
    """The files holding the weights ``select`` keeps: one file, or the shards of a sharded checkpoint holding them."""
    for name in WEIGHT_FILES:
        path = source.get(name)
        if path is None:
            continue
        if not name.endswith(".index.json"):
            return [path]
        shards = {shard: source.get(shard) for shard in _shard_names(path, select)}
        absent = [shard for shard, file in shards.items() if file is None]
        if absent:
            raise source.missing(f"shards {', '.join(absent)} listed in {name}")
        return list(shards.values())
    raise source.missing(f"weight file (none of {', '.join(WEIGHT_FILES)})")


def _read_tensors(files: list[Path], select: KeyMap) -> Iterator[tuple[str, torch.Tensor]]:
    """(our name, tensor) for the weights ``select`` keeps, from safetensors or torch pickles; others are not read."""
    for file in files:
        if file.suffix == ".safetensors":
            try:
                with safe_open(file, framework="pt") as f:
                    for key in f.keys():
                        if (name := select(key)) is not None:
                            yield name, f.get_tensor(key)
            except (SafetensorError, OSError) as err:
                raise CheckpointError(f"cannot read {file} (truncated or not a safetensors file?): {err}") from None
        else:
            try:
                state = torch.load(file, map_location="cpu", weights_only=True)
            except Exception as err:  # a pickle with code objects, or a corrupt file: say which file
                raise CheckpointError(f"cannot read {file} with torch.load(weights_only=True): {err}") from err
            yield from ((name, value) for key, value in state.items() if (name := select(key)) is not None)


def read_checkpoint(source: CheckpointSource, *, dtype: torch.dtype | None = None) -> Checkpoint:
    """Read a transformers SigLIP / SigLIP 2 checkpoint's vision tower, or the SigLIP tower of a VLM checkpoint
    (:data:`VLM_TYPES`: only the shards holding it are read); ``dtype=None`` keeps the stored dtype."""
    config = read_config(source)
    prefixes = VLM_TYPES.get(source.read_json("config.json").get("model_type"))
    select = _vlm_tower_keys(prefixes) if prefixes else _vision_key
    return Checkpoint(config, read_state_dict(source, select, dtype), read_processor_config(source, config))


def read_text_config(source: CheckpointSource) -> TextConfig:
    """The text tower's config from the source's ``config.json`` (image-text or text-only)."""
    hf_config = source.read_json("config.json")
    if hf_config is None:
        raise _missing_config(source)
    try:
        return text_config_from_hf(hf_config)
    except CheckpointError as err:
        raise CheckpointError(f"{source}: {err}") from None
    except (ValueError, TypeError) as err:
        raise CheckpointError(f"config.json of {source} is not a valid SigLIP text config: {err}") from None


def read_text_checkpoint(
    source: CheckpointSource, *, dtype: torch.dtype | None = None
) -> tuple[TextConfig, dict[str, torch.Tensor]]:
    """The text tower of an image-text or text-only checkpoint: its config and weights (the tower's names), reading
    only the shards that hold them."""
    return read_text_config(source), read_state_dict(source, _text_key, dtype)


def read_model_checkpoint(source: CheckpointSource, *, dtype: torch.dtype | None = None) -> ModelCheckpoint:
    """Read a transformers ``siglip`` / ``siglip2`` image-text checkpoint: both towers, ``logit_scale`` and
    ``logit_bias``."""
    text = read_text_config(source)
    vision = read_config(source)
    state = read_state_dict(source, _model_key, dtype)
    return ModelCheckpoint(vision, text, state, read_processor_config(source, vision))


def write_model_checkpoint(
    folder: str | os.PathLike,
    vision_config: EncoderConfig,
    text_config: TextConfig,
    state_dict: Mapping[str, torch.Tensor],
    processor_config: ProcessorConfig,
) -> None:
    """Write an image-text folder that transformers' ``SiglipModel`` / ``Siglip2Model`` loads (NaFlex towers make a
    SigLIP 2 checkpoint, fixed-resolution ones a SigLIP one: transformers' SigLIP 2 model is the NaFlex one)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    siglip2 = vision_config.naflex
    vision = {k: v for k, v in config_to_hf(vision_config).items() if k != "architectures"}
    hf_config = {
        "architectures": ["Siglip2Model" if siglip2 else "SiglipModel"],
        "model_type": "siglip2" if siglip2 else "siglip",
        "vision_config": vision,
        "text_config": text_config_to_hf(text_config, siglip2),
    }
    state = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    write_atomic(folder / "model.safetensors", lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
    write_atomic(folder / "config.json", (json.dumps(hf_config, indent=2) + "\n").encode())
    processor = processor_config_to_hf(processor_config)
    write_atomic(folder / "preprocessor_config.json", (json.dumps(processor, indent=2) + "\n").encode())


def read_state_dict(source: CheckpointSource, select: KeyMap, dtype: torch.dtype | None = None) -> dict:
    """The weights ``select`` keeps (renamed by it), opening only the files that hold them."""
    files = _weight_files(source, select)
    return {key: tensor.to(dtype) if dtype is not None else tensor for key, tensor in _read_tensors(files, select)}


def write_checkpoint(
    folder: str | os.PathLike,
    config: EncoderConfig,
    state_dict: Mapping[str, torch.Tensor],
    processor_config: ProcessorConfig,
) -> None:
    """Write config.json, model.safetensors and preprocessor_config.json, each atomically.

    Keys get transformers' ``vision_model.`` prefix, the layout of Google's Hub checkpoints, which every transformers
    version loads; a tower with bucketed positions is written as ``Idefics3VisionTransformer`` saves itself, unprefixed.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    dtypes = {t.dtype for t in state_dict.values() if t.is_floating_point()}
    hf_config = config_to_hf(config)
    if len(dtypes) == 1:
        hf_config["dtype"] = str(dtypes.pop()).removeprefix("torch.")
    prefix = "" if config.position_lookup == "buckets" else VISION_PREFIX
    state = {prefix + k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    write_atomic(folder / "model.safetensors", lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
    write_atomic(folder / "config.json", (json.dumps(hf_config, indent=2) + "\n").encode())
    processor = processor_config_to_hf(processor_config)
    write_atomic(folder / "preprocessor_config.json", (json.dumps(processor, indent=2) + "\n").encode())
