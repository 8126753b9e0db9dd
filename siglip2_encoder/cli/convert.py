"""Commands that write a tower in another format: ``convert`` (transformers, timm, big_vision) and ``export-onnx``."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from ..checkpoints.folders import checkpoint_format
from ..models.model import SigLIP2Encoder
from ..models.text import SigLIP2TextEncoder
from .common import (
    EXIT_OK,
    FatalError,
    UsageError,
    add_model_options,
    check_output_folder,
    from_checkpoint,
    load_model,
    positive_int,
)

logger = logging.getLogger("siglip2_encoder")


CONVERT_SOURCES = ("auto", "hf", "timm", "big_vision")


def cmd_convert(args: argparse.Namespace) -> int:
    source = args.source_format if args.source_format != "auto" else checkpoint_format(args.source)
    if args.image_size is not None and source != "big_vision":
        raise UsageError(f"--image-size is for big_vision .npz sources; {args.source} is read as {source}")
    check_output_folder(args.destination)
    destination = Path(args.destination)
    if destination.is_dir() and any(destination.iterdir()) and not args.overwrite:
        raise UsageError(f"{args.destination} exists and is not empty; pass --overwrite to write into it")
    if source == "hf":
        tower = from_checkpoint(lambda: SigLIP2Encoder.from_pretrained(args.source), args.source)
    elif source == "big_vision":
        tower = from_checkpoint(
            lambda: SigLIP2Encoder.from_big_vision(args.source, image_size=args.image_size), args.source
        )
    else:
        from ..integrations.timm_models import load_timm

        try:
            tower = load_timm(args.source)
        except (RuntimeError, FileNotFoundError, ValueError, TypeError) as err:
            raise FatalError(f"cannot load {args.source} as a timm SigLIP model: {err}") from None
    try:
        if args.to == "hf":
            tower.save_pretrained(destination)
        else:
            from ..integrations.timm_models import save_timm

            save_timm(tower, destination)
    except ValueError as err:
        raise FatalError(f"--to {args.to}: {err}") from None
    logger.info("wrote %s as %s (from %s, read as %s)", args.destination, args.to, args.source, source)
    return EXIT_OK


def cmd_export_onnx(args: argparse.Namespace) -> int:
    if args.old_destination is not None:
        raise UsageError(
            "export-onnx takes the model as --model MODEL (or --random-weights PRESET) and OUT.onnx alone since "
            f"0.2.0: export-onnx {args.old_destination} --model {args.destination}"
        )
    if args.old_output is not None:
        raise UsageError(f"export-onnx's --output is --returns since 0.2.0: --returns {args.old_output}")
    if args.text:
        if args.patch_attention_mask:
            raise UsageError("--patch-attention-mask is an input of vision towers: leave it out with --text")
        if args.random_weights:
            raise UsageError("--text exports a checkpoint's text tower: give a checkpoint, not --random-weights")
        from ..export.onnx_export import export_text_onnx

        tower = from_checkpoint(lambda: SigLIP2TextEncoder.from_pretrained(args.model), args.model)
        try:
            export_text_onnx(tower, args.destination)
        except ImportError as err:
            raise FatalError(f"{err}; pip install 'siglip2-encoder[onnx]'") from None
        logger.info("wrote %s (the text tower of %s)", args.destination, args.model)
        return EXIT_OK
    output = args.returns if args.returns in ("pooled", "tokens") else None
    if output is None:
        try:
            output = int(args.returns)
        except ValueError:
            raise UsageError(
                f"--returns {args.returns}: give pooled, tokens or a hidden-state index such as -2"
            ) from None
    model, _ = load_model(args.model, args.random_weights)
    if args.patch_attention_mask and model.config.position_lookup != "buckets":
        raise UsageError(
            f"--patch-attention-mask is for towers with bucketed positions (Idefics3's, SmolVLM's); "
            f"{args.random_weights or args.model} interpolates its positions and takes whole images: leave it out"
        )
    if isinstance(output, int):
        try:
            model.layer_index(output)
        except ValueError as err:
            raise UsageError(f"--returns {output}: {err}") from None
    from ..export.onnx_export import export_onnx

    try:
        export_onnx(model, args.destination, output=output, patch_attention_mask=args.patch_attention_mask)
    except ImportError as err:
        raise FatalError(f"{err}; pip install 'siglip2-encoder[onnx]'") from None
    except ValueError as err:
        raise UsageError(f"--returns {args.returns}: {err}") from None
    logger.info("wrote %s (%s of %s)", args.destination, output, args.random_weights or args.model)
    return EXIT_OK


def _convert_command(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "convert", help="a vision tower from one format to another (transformers, timm, big_vision)"
    )
    p.add_argument("source", help="Hub id or folder (transformers or timm), hf-hub:ID (timm), or a big_vision .npz")
    p.add_argument("destination", help="output folder")
    p.add_argument(
        "--to", choices=("hf", "timm"), required=True, help="hf: transformers' SiglipVisionModel layout; timm"
    )
    p.add_argument(
        "--from", dest="source_format", choices=CONVERT_SOURCES, default="auto", help="SOURCE's format (default auto)"
    )
    p.add_argument(
        "--image-size", type=positive_int, help="big_vision: native size, where not grid x patch (So400m/14-384)"
    )
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty destination folder")
    p.set_defaults(run=cmd_convert)


def _export_onnx_command(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("export-onnx", help="the vision (or text) tower as an ONNX model, dynamic batch and grid")
    p.add_argument("destination", help="the .onnx file to write (its weights go beside it, in DESTINATION.data)")
    p.add_argument("old_destination", nargs="?", help=argparse.SUPPRESS)  # the MODEL OUT.onnx form before 0.2.0
    add_model_options(p)
    p.add_argument(
        "--returns", default="pooled", help="what the graph returns: pooled (default), tokens, or a hidden state (-2)"
    )
    p.add_argument("--output", dest="old_output", help=argparse.SUPPRESS)  # --returns before 0.2.0
    p.add_argument(
        "--text",
        action="store_true",
        help="export the checkpoint's text tower: input_ids (padded to 64, no mask, as trained) to pooled features",
    )
    p.add_argument(
        "--patch-attention-mask",
        action="store_true",
        help="towers with bucketed positions (Idefics3's, Aria's): transformers' layout, (B, C, H, W) images and a "
        "(B, H/p, W/p) bool input of each image's real patches",
    )
    p.set_defaults(run=cmd_export_onnx)


def register(commands: argparse._SubParsersAction) -> None:
    """Add this module's commands to the parser."""
    _convert_command(commands)
    _export_onnx_command(commands)
