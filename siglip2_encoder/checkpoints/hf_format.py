"""transformers' formats, as pure functions: :func:`config_from_hf` / :func:`config_to_hf` (``config.json``, vision
towers of every family in :mod:`.families`), :func:`text_config_from_hf` / :func:`text_config_to_hf`,
:func:`processor_config_from_hf` / :func:`processor_config_to_hf` (the image processor's settings), and the key maps
that name a checkpoint's weights as the towers do (:func:`convert_hf_state_dict`: image-text or vision-only weights,
with or without the ``vision_model.`` prefix; the text tower is dropped by name, explicitly).

Nothing here knows the model class: a tower is described by its config and its state dict."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import fields
from typing import Any

import torch

from ..config import LETTERBOX_MIN_SIDE, NAFLEX_NUM_PATCHES, EncoderConfig, ProcessorConfig, TextConfig
from .families import (
    ARIA_MIN_SIDE,
    CODED_TOWERS,
    FAMILY_FIELDS,
    IDEFICS2_EDGES,
    IMAGE_TEXT_TYPES,
    KEY_RENAMES,
    MLP_RATIO_TYPES,
    NESTED_VISION_CONFIGS,
    PHI4_MAX_TILES,
    PROCESSOR_TYPES,
    REQUIRED_SETTINGS,
    TEXT_TYPES,
    TOWER_EXTRAS,
    VISION_TYPES,
    VLM_TYPES,
    ProcessorKind,
)
from .hub import CheckpointError

__all__ = [
    "KeyMap",
    "TEXT_PREFIX",
    "VISION_PREFIX",
    "config_from_hf",
    "config_to_hf",
    "convert_hf_state_dict",
    "hf_loading",
    "model_key",
    "processor_config_from_hf",
    "processor_config_to_hf",
    "text_config_from_hf",
    "text_config_to_hf",
    "text_key",
    "tower_keys",
    "vision_key",
    "vlm_tower_keys",
]

logger = logging.getLogger(__name__)

# EncoderConfig field -> transformers' name, where they differ.
_HF_FIELD_NAMES = {"use_head": "vision_use_head"}
_PIL_RESAMPLE = {1: "lanczos", 2: "bilinear", 3: "bicubic"}  # PIL's codes, as transformers stores them

VISION_PREFIX = "vision_model."
TEXT_PREFIX = "text_model."
# Weights of an image-text checkpoint that are not the vision tower; skipped by name, never silently.
_NON_VISION_PREFIXES = ("text_model.", "logit_scale", "logit_bias")
# Non-persistent buffers that older transformers versions wrote into checkpoints.
_NON_TEXT_PREFIXES = ("vision_model.", "logit_scale", "logit_bias")
_IGNORED_BUFFERS = ("embeddings.position_ids",)


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
    if hf_config["model_type"] not in VLM_TYPES:
        return resolved.to_dict()
    for name in NESTED_VISION_CONFIGS.get(hf_config["model_type"], ("vision_config",)):
        resolved = getattr(resolved, name)
    return resolved.to_dict()


def _vision_fields(hf_config: Mapping[str, Any]) -> tuple[str, Mapping[str, Any]]:
    """(vision model_type, its fields) of a transformers config.json with a SigLIP-architecture vision tower."""
    model_type = hf_config.get("model_type")
    if model_type in IMAGE_TEXT_TYPES:
        return ("siglip2" if IMAGE_TEXT_TYPES[model_type] else "siglip") + "_vision_model", hf_config.get(
            "vision_config"
        ) or {}
    if model_type in VISION_TYPES and model_type not in FAMILY_FIELDS:
        return model_type, hf_config
    if model_type in CODED_TOWERS:  # the file describes no tower: transformers' defaults for the one its code builds
        return CODED_TOWERS[model_type], _resolved_vision_config({"model_type": CODED_TOWERS[model_type]})
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
    if model_type is None and "type" in hf_config:  # LeRobot's policies name their kind so
        raise CheckpointError(_lerobot_error(hf_config["type"]))
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
    for name, wanted in REQUIRED_SETTINGS.get(vision_type, {}).items():
        if vision.get(name, wanted) != wanted:
            raise CheckpointError(
                f"config.json's {vision_type} tower has {name}={vision[name]!r}; a SigLIP-architecture tower has "
                f"{name}={wanted!r}, so this one cannot be loaded here"
            )
    fixed = FAMILY_FIELDS.get(vision_type, {})
    kwargs: dict[str, Any] = dict(fixed)
    if vision_type in MLP_RATIO_TYPES:
        kwargs["intermediate_size"] = int(vision["hidden_size"] * vision["mlp_ratio"])
    for field in fields(EncoderConfig):
        key = _HF_FIELD_NAMES.get(field.name, field.name)
        if field.name not in ("image_size", "num_patches", *kwargs) and vision.get(key) is not None:
            kwargs[field.name] = vision[key]
    kwargs["patch_size"] = _square(kwargs.get("patch_size", EncoderConfig.patch_size), "patch_size")
    if "attention_dropout" in kwargs:
        kwargs["attention_dropout"] = float(kwargs["attention_dropout"])
    if naflex:
        return EncoderConfig(image_size=None, num_patches=vision.get("num_patches", NAFLEX_NUM_PATCHES), **kwargs)
    return EncoderConfig(image_size=_square(vision.get("image_size", EncoderConfig.image_size), "image_size"), **kwargs)


def config_to_hf(config: EncoderConfig) -> dict[str, Any]:
    """A vision-only transformers ``config.json``: ``SiglipVisionModel`` or ``Siglip2VisionModel``, or for a tower
    with bucketed positions ``Idefics3VisionTransformer`` (Idefics2 / 3, SmolVLM, Aria), with a head
    ``Phi4MultimodalVisionModel`` (Phi-4-multimodal's; transformers' AutoModel does not map it)."""
    if config.position_lookup == "buckets":
        name, model_type = (
            ("Phi4MultimodalVisionModel", "phi4_multimodal_vision")
            if config.use_head
            else ("Idefics3VisionTransformer", "idefics3_vision")
        )
        out: dict[str, Any] = {"architectures": [name], "model_type": model_type}
        skipped: tuple[str, ...] = ("use_head", "position_lookup")
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


# transformers classes config_to_hf names that need a loading argument to compute as the tower does -> that argument.
# Phi4MultimodalVisionModel: with sdpa (its default), transformers 5.25 drops an unpadded image's all-ones mask and its
# attention's is_causal=True then makes SDPA causal; its eager path is bidirectional, as the original model's SigLIP.
_LOADING_ARGUMENTS = {"Phi4MultimodalVisionModel": 'attn_implementation="eager"'}


def hf_loading(config: EncoderConfig) -> tuple[str, str]:
    """(transformers' class that loads a tower saved with this config, the arguments its ``from_pretrained`` needs
    after the folder, as code: ``""`` or ``', attn_implementation="eager"'``)."""
    name = config_to_hf(config)["architectures"][0]
    arguments = _LOADING_ARGUMENTS.get(name)
    return name, f", {arguments}" if arguments else ""


# LeRobot policies whose model transformers has -> its model and processor classes
_LEROBOT_MODELS = {
    "pi0": ("PI0ForConditionalGeneration", "PI0Processor"),
    "pi05": ("PI05ForConditionalGeneration", "PI05Processor"),
}


def _lerobot_error(policy: object) -> str:
    """The error for a LeRobot policy's ``config.json``: how to save it in transformers' format, where it can be."""
    message = f"config.json is a LeRobot policy's (type={policy!r}), not transformers' (it names no model_type)"
    if not isinstance(policy, str) or policy not in _LEROBOT_MODELS:
        return f"{message}; this library reads transformers' checkpoints"
    model, processor = _LEROBOT_MODELS[policy]
    return (
        f"{message}; save it in transformers' format first and load that folder: "
        f"{model}.from_pretrained(SRC).save_pretrained(DIR), and its processor, "
        f"{processor}.from_pretrained(SRC).save_pretrained(DIR)"
    )


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


def processor_config_from_hf(hf: Mapping[str, Any], tower: EncoderConfig, views: bool = False) -> ProcessorConfig:
    """From transformers' image processor settings (SigLIP's and SigLIP 2's, and the VLM processors of
    :data:`PROCESSOR_TYPES`: their single view, with a warning naming what else they do, unless ``views``: the caller
    reproduces their other views, as a tiled VLM does).

    The tower decides the kind of preprocessing (a NaFlex tower needs NaFlex patches); ``image_processor_type``, when
    the file names one, must agree with it. Missing fields take transformers' defaults.
    """
    name = hf.get("image_processor_type")
    if name is not None and name not in PROCESSOR_TYPES:
        raise CheckpointError(
            f"the image processor is {name!r}; expected one of {sorted(PROCESSOR_TYPES)} (a SigLIP processor, or a "
            f"VLM's whose single view this library reproduces)"
        )
    if name is None:  # a file naming no type is read as SigLIP's own processor of the tower's kind
        name = "Siglip2ImageProcessor" if tower.naflex else "SiglipImageProcessor"
    kind = PROCESSOR_TYPES[name]
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
    if kind.does_more(hf) and not views:
        logger.warning("the image processor %s %s", name, kind.beyond)
    if resample not in _PIL_RESAMPLE:
        raise CheckpointError(f"the image processor has resample={resample!r}; supported: {_PIL_RESAMPLE} (PIL codes)")
    names = ("image_mean", "image_std", "rescale_factor", "do_resize", "do_rescale", "do_normalize")
    common = dict(zip(("image_mean", "image_std"), kind.mean_std))
    common |= {name: hf[name] for name in names if hf.get(name) is not None}
    if kind.always_resized:
        common["do_resize"] = True
    if kind.letterbox is not None:
        common |= _letterbox_settings(hf, name, kind)
    common["resample"] = _PIL_RESAMPLE[resample]
    try:
        if tower.naflex:
            return ProcessorConfig(image_size=None, **common, **_naflex_settings(hf, kind, tower))
        return ProcessorConfig(image_size=_view_size(hf, kind, tower), patch_size=tower.patch_size, **common)
    except CheckpointError:
        raise
    except (ValueError, TypeError) as err:
        raise CheckpointError(f"invalid image processor settings: {err}") from None


def _letterbox_settings(hf: Mapping[str, Any], name: str, kind: ProcessorKind) -> dict[str, Any]:
    """A letterboxing processor's padding (``do_pad``) and the short side's floor (DeepSeek-VL's ``min_size``,
    Idefics2's ``shortest_edge``, Aria's ``min_image_size``); for DeepSeek-VL hybrid's, the first square
    (``high_res_size``); for Phi-4-multimodal's, the canvas's most squares (``dynamic_hd``)."""
    if kind.letterbox == "idefics2":  # do_pad only batches images: its tower masks the padding
        return dict(letterbox=kind.letterbox, letterbox_min_side=_idefics2_edges(hf)[0])
    if kind.letterbox == "aria":  # it always pads
        return dict(letterbox=kind.letterbox, letterbox_min_side=hf.get("min_image_size", ARIA_MIN_SIDE))
    if kind.letterbox == "phi4":  # it always pads its canvas
        return dict(letterbox=kind.letterbox, letterbox_max_tiles=hf.get("dynamic_hd", PHI4_MAX_TILES))
    if not hf.get("do_pad", True):
        raise CheckpointError(
            f"the image processor {name!r} has do_pad=false: each image keeps its own aspect ratio and size, which "
            f"this library does not reproduce (its views have one size); set do_pad true, its default"
        )
    if kind.letterbox == "pi0":
        return dict(letterbox=kind.letterbox)
    out = dict(letterbox=kind.letterbox, letterbox_min_side=hf.get("min_size", LETTERBOX_MIN_SIDE))
    if kind.letterbox == "deepseek_vl_hybrid":
        out["letterbox_canvas"] = _hybrid_canvas(hf, kind)
    return out


def _idefics2_edges(hf: Mapping[str, Any]) -> tuple[int, int]:
    """Idefics2's ``size``: (``shortest_edge``, ``longest_edge``), its class's defaults where the file has none."""
    size = hf.get("size") or dict(zip(("shortest_edge", "longest_edge"), IDEFICS2_EDGES))
    if not (isinstance(size, Mapping) and {"shortest_edge", "longest_edge"} <= set(size)):
        raise CheckpointError(f"the image processor's size must give shortest_edge and longest_edge, got size={size!r}")
    return size["shortest_edge"], size["longest_edge"]


def _hybrid_canvas(hf: Mapping[str, Any], kind: ProcessorKind) -> int:
    """DeepSeek-VL hybrid's first square: its ``high_res_size``, reproduced where that square is padded with the
    colour and resized with the filter of the view that follows."""
    size = hf.get("high_res_size") or {"height": 1024, "width": 1024}
    side = size.get("height") if isinstance(size, Mapping) else None
    if side is None or size.get("width") != side:
        raise CheckpointError(f"the image processor's high_res_size must be a square, got high_res_size={size!r}")
    filters = (hf.get("high_res_resample", kind.resample), hf.get("resample", kind.resample))
    if filters[0] != filters[1]:
        raise CheckpointError(
            f"the image processor resizes into its high_res_size square with high_res_resample={filters[0]!r} and "
            f"then with resample={filters[1]!r}; this library uses one filter: set them equal"
        )
    means = [hf.get(key) or kind.mean_std[0] for key in ("high_res_image_mean", "image_mean")]
    colors = [[int(mean * 255) for mean in value] for value in means]
    if colors[0] != colors[1]:
        raise CheckpointError(
            f"the image processor pads its high_res_size square with {colors[0]} (high_res_image_mean) and its view "
            f"with {colors[1]} (image_mean); this library pads with one colour: set the means equal"
        )
    return side


def _naflex_settings(hf: Mapping[str, Any], kind: ProcessorKind, tower: EncoderConfig) -> dict[str, Any]:
    """The patch size and the sizing rule with its budgets of a NaFlex processor."""
    patch = hf.get("patch_size", hf.get("encoder_patch_size", tower.patch_size))
    if patch != tower.patch_size:
        raise CheckpointError(
            f"the image processor cuts {patch}-pixel patches but the tower's patch_size is {tower.patch_size}"
        )
    if kind.smart_resize is None:
        return dict(patch_size=patch, max_num_patches=hf.get("max_num_patches", kind.max_num_patches))
    least, most, factor = kind.smart_resize  # LFM2-VL's: budgets in tokens after its unshuffle
    factor = hf.get("downsample_factor", factor)
    return dict(
        patch_size=patch,
        naflex_resize="smart",
        min_num_patches=hf.get("min_image_tokens", least) * factor**2,
        max_num_patches=hf.get("max_image_tokens", most) * factor**2,
        grid_multiple=factor,
    )


def _view_size(hf: Mapping[str, Any], kind: ProcessorKind, tower: EncoderConfig) -> tuple[int, int]:
    """(height, width) of the fixed-resolution view: ``size``; for Idefics3's processors, one tile
    (``max_image_size``, Aria's a side); for anyres ones without height and width (LLaVA-NeXT's shortest edge), the
    tower's square. The class's default where the file has none."""
    if kind.letterbox == "pi0":
        return _fit_and_pad_size(hf, kind.size)
    if kind.letterbox == "idefics2":
        return (_idefics2_edges(hf)[1],) * 2
    name, value = ("max_image_size", hf.get("max_image_size")) if kind.always_resized else ("size", hf.get("size"))
    if value is None and kind.size is not None:
        return kind.size
    if kind.always_resized and isinstance(value, Mapping) and "longest_edge" in value:
        return (value["longest_edge"], value["longest_edge"])
    if kind.always_resized and isinstance(value, int) and not isinstance(value, bool):  # Aria's
        return (value, value)
    if isinstance(value, Mapping) and {"height", "width"} <= set(value):
        return (value["height"], value["width"])
    if kind.beyond and not kind.always_resized:
        return (tower.image_size, tower.image_size)
    wanted = "longest_edge" if kind.always_resized else "height and width"
    raise CheckpointError(f"the image processor's {name} must give {wanted}, got {name}={value!r}")


def _fit_and_pad_size(hf: Mapping[str, Any], default: tuple[int, int]) -> tuple[int, int]:
    """pi0's processor: images fitted within ``size`` (``max_height``, ``max_width``), then padded to ``pad_size``;
    reproduced where the two agree."""
    size, pad = hf.get("size"), hf.get("pad_size")
    if size is None:
        size = {"max_height": default[0], "max_width": default[1]}
    if not (isinstance(size, Mapping) and {"max_height", "max_width"} <= set(size)):
        raise CheckpointError(f"the image processor's size must give max_height and max_width, got size={size!r}")
    fit = (size["max_height"], size["max_width"])
    if pad is None:
        pad = {"height": default[0], "width": default[1]}
    if not (isinstance(pad, Mapping) and (pad.get("height"), pad.get("width")) == fit):
        raise CheckpointError(
            f"the image processor fits images within {fit[0]}x{fit[1]} (size) and pads them to pad_size={pad!r}; "
            f"this library pads them to the size they fit within: set pad_size to "
            f"{{'height': {fit[0]}, 'width': {fit[1]}}}"
        )
    return fit


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
    if config.naflex_resize == "smart":
        return {"image_processor_type": "Lfm2VlImageProcessor", **_lfm2_settings(config), **out}
    if config.letterbox == "aria":  # it always resizes
        del out["do_resize"]
    if config.letterbox is not None:
        return {**_letterbox_to_hf(config), **out}
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


def _letterbox_to_hf(config: ProcessorConfig) -> dict[str, Any]:
    """A letterbox's own settings, as its family's processor class names them."""
    (height, width), floor = config.image_size, config.letterbox_min_side
    if config.letterbox == "idefics2":
        edges = {"shortest_edge": floor, "longest_edge": height}
        kind = {"image_processor_type": "Idefics2ImageProcessor", "size": edges, "do_image_splitting": False}
        return {**kind, "do_convert_rgb": True, "do_pad": True}
    if config.letterbox == "aria":  # transformers' Aria takes sides of 490 or 980 pixels only
        kind = {"image_processor_type": "AriaImageProcessor", "max_image_size": height, "min_image_size": floor}
        return {**kind, "do_convert_rgb": True, "split_image": False}
    if config.letterbox == "phi4":  # its patch_size sizes the crops' masks: the tower's (SigLIP2Encoder checks)
        square = {"height": height, "width": width}
        kind = {"image_processor_type": "Phi4MultimodalImageProcessor", "size": square, "patch_size": config.patch_size}
        return {**kind, "dynamic_hd": config.letterbox_max_tiles, "do_convert_rgb": True}
    if config.letterbox == "pi0":
        fit, pad = {"max_height": height, "max_width": width}, {"height": height, "width": width}
        kind = {"image_processor_type": "PI0ImageProcessor", "size": fit, "pad_size": pad}
        return {**kind, "do_convert_rgb": True, "do_pad": True}
    deepseek = {"size": {"height": height, "width": width}, "do_pad": True, "min_size": floor}
    deepseek["background_color"] = list(config.letterbox_color)  # DeepSeek-VL's pad with the mean colour
    if config.letterbox == "deepseek_vl":
        return {"image_processor_type": "DeepseekVLImageProcessor", **deepseek}
    canvas = config.letterbox_canvas  # DeepSeek-VL hybrid's high_res_*: its SAM tower's view, written as this one
    return {
        "image_processor_type": "DeepseekVLHybridImageProcessor",
        **deepseek,
        "high_res_size": {"height": canvas, "width": canvas},
        "high_res_background_color": list(config.letterbox_color),
        "high_res_resample": {v: k for k, v in _PIL_RESAMPLE.items()}[config.resample],
        "high_res_image_mean": list(config.image_mean),
        "high_res_image_std": list(config.image_std),
    }


def _lfm2_settings(config: ProcessorConfig) -> dict[str, Any]:
    """LFM2-VL's processor settings for the "smart" rule: one view (no tiles: transformers reads do_image_splitting,
    vLLM (0.32) min_tiles and max_tiles), budgets in its tokens."""
    tokens = config.grid_multiple**2
    if config.min_num_patches % tokens or config.max_num_patches % tokens:
        raise ValueError(
            f"transformers' Lfm2VlImageProcessor counts its budgets in tokens of grid_multiple**2 = {tokens} "
            f"patches; min_num_patches={config.min_num_patches} and max_num_patches={config.max_num_patches} must "
            f"be multiples of {tokens}"
        )
    return {
        "encoder_patch_size": config.patch_size,
        "downsample_factor": config.grid_multiple,
        "min_image_tokens": config.min_num_patches // tokens,
        "max_image_tokens": config.max_num_patches // tokens,
        "do_image_splitting": False,
        "min_tiles": 1,
        "max_tiles": 1,
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


vision_key = _tower_keys(VISION_PREFIX, _NON_VISION_PREFIXES)


def vlm_tower_keys(prefixes: tuple[str, ...]) -> KeyMap:
    """Names a VLM checkpoint's keys as the tower does; None for the language model's and projector's weights."""

    def select(key: str) -> str | None:
        for prefix in prefixes:
            if key.startswith(prefix):
                key = key.removeprefix(prefix)
                return None if key in _IGNORED_BUFFERS else key
        return None

    return select


def tower_keys(model_type: str | None, config: EncoderConfig) -> KeyMap:
    """Names the keys of a checkpoint whose ``config.json`` has this ``model_type`` (and describes this tower) as
    the tower does: a VLM's by its prefixes, a SigLIP one's by :data:`vision_key`; the other weights saved under the
    tower's prefix (:data:`TOWER_EXTRAS`) are skipped by name, and a family's own names (:data:`KEY_RENAMES`) become
    ours."""
    family = model_type or ""
    prefixes = VLM_TYPES.get(family)
    select = vlm_tower_keys(prefixes) if prefixes else vision_key
    extras = TOWER_EXTRAS.get(family, ())
    if config.use_head:  # a head is the tower's where it has one
        extras = tuple(prefix for prefix in extras if prefix != "head.")
    renames = KEY_RENAMES.get(family, ())
    if not extras and not renames:
        return select

    def family_names(key: str) -> str | None:
        name = select(key)
        if name is None or name.startswith(extras):
            return None
        for theirs, ours in renames:
            name = name.replace(theirs, ours)
        return name

    return family_names


text_key = _tower_keys(TEXT_PREFIX, _NON_TEXT_PREFIXES)


def model_key(key: str) -> str | None:
    """An image-text checkpoint's key as the joint model names it: unchanged, but for stale non-persistent buffers."""
    return None if key.removeprefix(VISION_PREFIX).removeprefix(TEXT_PREFIX) in _IGNORED_BUFFERS else key


def convert_hf_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers SigLIP / SigLIP 2 weights -> this tower's names (the same names, minus prefix and text tower)."""
    return {name: value for key, value in state_dict.items() if (name := vision_key(key)) is not None}
