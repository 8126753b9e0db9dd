"""Commands that describe a model: ``info`` (architecture, size, cost) and ``pca`` (a picture of the patch features)."""

from __future__ import annotations

import argparse
import logging

import numpy as np
import torch

from ..checkpoints.folders import read_config, read_processor_config
from ..checkpoints.hub import CheckpointError, CheckpointSource
from ..config import EncoderConfig, ProcessorConfig
from ..data.images import ImageLoadError, load_image
from ..integrations.dense import pca_rgb
from ..models.flops import encoder_flops, num_parameters
from ..presets import get_preset, list_presets
from .common import (
    EXIT_OK,
    RANDOM_BANNER,
    FatalError,
    UsageError,
    add_model_options,
    load_model,
    positive_int,
)

logger = logging.getLogger("siglip2_encoder")


def cmd_info(args: argparse.Namespace) -> int:
    if args.list:
        for name in list_presets():
            print(f"{name:36s} {get_preset(name).hub_id}")
        return EXIT_OK
    if args.old_model is not None:
        raise UsageError(f"info takes the model as --model since 0.2.0: info --model {args.old_model}")
    if args.model is None:
        raise UsageError("give --model (a Hub id, local folder or preset name), or --list")
    config, processing, source = _describe(args.model)
    tokens = (
        processing.max_num_patches
        if processing.naflex
        else ((processing.image_size[0] // config.patch_size) * (processing.image_size[1] // config.patch_size))
    )
    kind = "NaFlex" if config.naflex else "fixed-resolution"
    lines = [
        f"model            {args.model} (from the {source})",
        f"architecture     {kind} ViT: width {config.hidden_size}, {config.num_hidden_layers} layers, "
        f"{config.num_attention_heads} heads, MLP {config.intermediate_size}, patch {config.patch_size}, "
        f"{config.hidden_act}, {'attention-pooling head' if config.use_head else 'no head'}",
        f"parameters       {num_parameters(config) / 1e6:.1f} M",
        f"position grid    {config.position_grid}x{config.position_grid}",
        f"tokens / image   {tokens}" + (" (patch budget)" if processing.naflex else ""),
        f"GFLOPs / image   {encoder_flops(config, tokens) / 1e9:.1f} (all layers + head; multiply-add = 2)",
        f"LLaVA layer -2   {encoder_flops(config, tokens, layers=config.num_hidden_layers - 1, pooled=False) / 1e9:.1f}"
        " GFLOPs (stops before the last layer)",
        f"preprocessing    {_resize_text(processing)}, {processing.resample}, mean {list(processing.image_mean)}, "
        f"std {list(processing.image_std)}",
    ]
    print("\n".join(lines))
    return EXIT_OK


def _resize_text(processing: ProcessorConfig) -> str:
    """How ``info`` describes the resize and the letterbox, if any (the padding colour in 0-255 where it is one)."""
    if processing.naflex:
        return f"NaFlex, up to {processing.max_num_patches} patches, aspect ratio kept"
    (height, width), floor = processing.image_size, processing.letterbox_min_side
    if processing.letterbox == "idefics2":
        return (
            f"aspect ratio kept, the longest side at most {height}, each side at least {floor}, each image on its own "
            f"grid of whole patches"
        )
    if processing.letterbox == "aria":
        return (
            f"aspect ratio kept, the longest side {height}, the other at least {floor}, padded with black to whole "
            f"patches, each image on its own grid"
        )
    resize = f"resize to {height}x{width}"
    if processing.letterbox == "deepseek_vl":
        return f"{resize}, aspect ratio kept, centred, padded with {list(processing.letterbox_color)}"
    if processing.letterbox == "deepseek_vl_hybrid":
        side, color = processing.letterbox_canvas, list(processing.letterbox_color)
        return f"{resize}, aspect ratio kept, centred in a {side}x{side} square padded with {color}, then resized"
    if processing.letterbox == "pi0":
        return f"{resize}, aspect ratio kept, padded at the bottom and right with normalized zeros"
    if processing.letterbox == "phi4":
        return (
            f"{resize}, aspect ratio kept on a white canvas of up to {processing.letterbox_max_tiles} squares of "
            f"{height} (Phi-4-multimodal's global view)"
        )
    return resize


def _describe(model: str) -> tuple[EncoderConfig, ProcessorConfig, str]:
    """Architecture, preprocessing and their source for a Hub id, folder or preset name, loading no weights.

    A Hub id that cannot be reached falls back to the preset table when it names a preset.
    """
    try:
        preset = get_preset(model)
    except ValueError:
        preset = None
    if preset is not None and model != preset.hub_id:  # a preset's name: its table; its Hub id: the Hub first
        return preset.config, preset.processor_config, "preset table"
    try:
        source = CheckpointSource(model)
        config = read_config(source)
        return config, read_processor_config(source, config), f"config.json of {source}"
    except CheckpointError as err:
        if preset is not None:
            logger.warning("%s; showing the preset table's entry for %s", err, preset.name)
            return preset.config, preset.processor_config, "preset table"
        raise FatalError(f"{err}; `siglip2-encoder info --list` shows the presets, which need no download") from None


def cmd_pca(args: argparse.Namespace) -> int:
    from PIL import Image

    try:
        pixels = load_image(args.image)
    except ImageLoadError as err:
        raise FatalError(str(err)) from None
    model, processor = load_model(args.model, args.random_weights)
    inputs = processor(pixels, **({"max_num_patches": args.max_num_patches} if args.max_num_patches else {}))
    layers = [] if args.layer is None else [args.layer]
    with torch.inference_mode():
        out = model.eval()(**inputs, layers=layers, return_last=args.layer is None, return_pooled=False)
    features = out.feature_maps(args.layer)[0]
    shown = pixels if pixels.dtype == np.uint8 else (pixels * 255).round().astype(np.uint8)
    gap = np.full((shown.shape[0], max(4, shown.shape[1] // 50), 3), 255, np.uint8)
    picture = np.concatenate([shown, gap, pca_rgb(features, shown.shape[:2])], axis=1)  # the image, then its PCA
    Image.fromarray(picture).save(args.output)
    logger.info("PCA of %s (%dx%d tokens) written to %s", args.image, *features.shape[1:], args.output)
    if args.random_weights:
        logger.warning(RANDOM_BANNER, args.random_weights)
    return EXIT_OK


def _info_command(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("info", help="architecture, parameters, tokens and GFLOPs per image, preprocessing")
    p.add_argument("--model", help="Hub id, local folder, or preset name")
    p.add_argument("old_model", nargs="?", help=argparse.SUPPRESS)  # MODEL given positionally before 0.2.0
    p.add_argument("--list", action="store_true", help="list the preset names")
    p.set_defaults(run=cmd_info)


def _pca_command(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("pca", help="picture of the first 3 principal components of the patch features")
    p.add_argument("image")
    p.add_argument("-o", "--output", required=True, help="PNG file to write")
    add_model_options(p)
    p.add_argument("--layer", type=int, help="hidden state to show (default: the final tokens)")
    p.add_argument("--max-num-patches", type=positive_int, help="NaFlex patch budget")
    p.set_defaults(run=cmd_pca)


def register(commands: argparse._SubParsersAction) -> None:
    """Add this module's commands to the parser."""
    _info_command(commands)
    _pca_command(commands)
