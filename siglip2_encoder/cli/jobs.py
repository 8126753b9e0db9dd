"""``extract`` and ``embed-text``: images (files, folders, tar shards, videos) or texts into a resumable folder of
features."""

from __future__ import annotations

import argparse
import logging
import os

from ..checkpoints.families import IMAGE_TEXT_TYPES
from ..checkpoints.hub import CheckpointSource
from ..data.images import DEFAULT_MAX_PIXELS
from ..data.tokenizer import TextTokenizer
from ..export.quantize import QUANTIZATIONS
from ..models.model import SigLIP2Encoder
from ..models.text import SigLIP2TextEncoder
from ..pipeline.distributed import Ranks
from ..pipeline.extract import TextTower, extract
from ..pipeline.settings import ExtractSettings, ExtractSummary, TextEmbedSettings
from ..pipeline.sources import FileSource, InputSource, TarSource, discover_inputs, expand_videos, read_file_list
from ..pipeline.texts import embed_texts
from .common import (
    DEFAULT_MODEL,
    EXIT_OK,
    EXIT_PARTIAL,
    RANDOM_BANNER,
    UsageError,
    add_job_options,
    add_model_options,
    add_text_options,
    check_file_list,
    check_output_folder,
    check_text_options,
    from_checkpoint,
    load_model,
    load_tokenizer,
    non_negative_int,
    positive_int,
    resolve_device,
)

logger = logging.getLogger("siglip2_encoder")


def _check_input_options(args: argparse.Namespace) -> None:
    if args.fps is not None and not args.fps > 0:
        raise UsageError(f"--fps {args.fps}: must be > 0")
    videos = args.fps is not None or args.num_frames is not None
    if args.no_captions and not args.tar:
        raise UsageError("--no-captions is for tar shards (--tar), whose samples hold captions")
    if args.tar and videos:
        raise UsageError("--fps / --num-frames take frames of video files; tar shards (--tar) hold images")
    if args.tar and (args.inputs or args.file_list):
        raise UsageError("--tar reads tar shards: give either --tar or image files / folders / --file-list, not both")


def _text_tower(args: argparse.Namespace) -> TextTower | None:
    """With tar shards and an image-text checkpoint that holds its tokenizer: the text tower that embeds each
    sample's caption beside its image (clip-retrieval's image-caption pairs); None otherwise."""
    if not args.tar or args.no_captions or args.random_weights:
        return None
    source = from_checkpoint(lambda: CheckpointSource(args.model), args.model)
    config = from_checkpoint(lambda: source.read_json("config.json"), args.model) or {}
    if config.get("model_type") not in IMAGE_TEXT_TYPES:
        return None
    tokenizer = from_checkpoint(lambda: TextTokenizer.from_source(source), args.model)
    if tokenizer is None:
        logger.info("%s has a text tower but no tokenizer: the captions are not embedded", args.model)
        return None
    tower = from_checkpoint(lambda: SigLIP2TextEncoder.from_source(source), args.model)
    logger.info("embedding each sample's caption with the text tower of %s (--no-captions: images only)", args.model)
    return TextTower(tower, tokenizer)


def _extract_source(args: argparse.Namespace, captions: bool) -> InputSource:
    """What ``extract`` reads: tar shards (with ``captions``, each sample's caption too), or files (video files
    expanded into frames when --fps / --num-frames ask)."""
    if args.tar:
        try:
            return TarSource(args.tar, captions=captions)
        except (ValueError, ImportError) as err:
            raise UsageError(f"--tar {' '.join(args.tar)}: {err}") from None
    videos = args.fps is not None or args.num_frames is not None
    paths = discover_inputs(args.inputs, args.file_list, videos=videos)
    if not paths:
        raise UsageError("no input images: give files, folders, glob patterns, --file-list or --tar")
    return FileSource(expand_videos(paths, fps=args.fps, num_frames=args.num_frames))


def _extract_settings(
    args: argparse.Namespace, model: SigLIP2Encoder, name: str, device: str, captions: bool
) -> ExtractSettings:
    """The settings the options ask for, checked against the model (its layers, NaFlex, its pooling head)."""
    if args.max_num_patches is not None and not model.config.naflex:
        raise UsageError(f"--max-num-patches applies to NaFlex checkpoints; {name} has a fixed resolution")
    for index in args.layers:
        try:
            model.layer_index(index)
        except ValueError as err:
            raise UsageError(f"--layers {index}: {err}") from None
    pooled, tokens = not args.no_pooled, args.tokens
    if pooled and model.head is None:  # e.g. the towers of PaliGemma and LLaVA-OneVision
        pooled = False
        if not (tokens or args.layers):
            tokens = True
            logger.warning("%s has no attention-pooling head: saving the final tokens (--tokens) instead", name)
        else:
            logger.info("%s has no attention-pooling head: saving only the requested tokens", name)
    return ExtractSettings(
        model=name,
        random_weights=bool(args.random_weights),
        pooled=pooled,
        last_hidden_state=tokens,
        layers=tuple(dict.fromkeys(args.layers)),
        save_dtype=args.save_dtype,
        dtype=args.dtype,
        device=device,
        batch_size=args.batch_size,
        max_num_patches=args.max_num_patches,
        shard_size=args.shard_size,
        exif_transpose=not args.no_exif,
        max_pixels=args.max_pixels,
        video_fps=args.fps,
        video_frames=args.num_frames,
        quantize=args.quantize,
        captions=captions,
    )


def _report(summary: ExtractSummary, output: str, where: str) -> None:
    for path, reason in summary.failures[:20]:
        logger.warning("failed: %s", reason if path in reason else f"{path}: {reason}")
    if len(summary.failures) > 20:
        logger.warning("... and %d more failures, listed in %s/manifest.jsonl", len(summary.failures) - 20, output)
    if summary.failed_before:
        logger.warning("%d inputs failed in the earlier run; see %s/manifest.jsonl", summary.failed_before, output)
    logger.info("%s%s", summary, where)


def cmd_extract(args: argparse.Namespace) -> int:
    # Everything is checked before anything is written: options, inputs, the model.
    check_output_folder(args.output)
    check_file_list(args.file_list)
    device = resolve_device(args.device)
    _check_input_options(args)
    model, processor = load_model(args.model, args.random_weights)
    text = _text_tower(args)
    source = _extract_source(args, captions=text is not None)
    settings = _extract_settings(args, model, args.random_weights or args.model, device, captions=text is not None)
    workers = args.workers if args.workers is not None else min(4, os.cpu_count() or 1)
    ranks = Ranks.from_env()  # under torchrun: this process's share of the inputs
    where = f" (rank {ranks.rank} of {ranks.world})" if ranks.distributed else ""
    count = f"{len(source.urls)} tar shards" if args.tar else f"{len(source.paths)} inputs"
    logger.info("%s -> %s (%s)%s", count, args.output, ", ".join(settings.feature_names), where)
    summary = extract(
        source,
        args.output,
        model,
        processor,
        settings,
        resume=args.resume,
        overwrite=args.overwrite,
        num_workers=workers,
        progress=None if not args.quiet else False,
        ranks=ranks,
        text=text,
    )
    if settings.random_weights:
        logger.warning(RANDOM_BANNER, settings.model)
    _report(summary, args.output, where)
    if ranks.distributed:
        # torchrun turns any non-zero exit into its own failure report (and one rank's into the others' end): rank 0
        # names the whole folder's failures here, and every rank exits 0.
        if ranks.main and summary.failed_total:
            logger.warning("%d inputs failed; they are listed in %s/manifest.jsonl", summary.failed_total, args.output)
        return EXIT_OK
    return EXIT_PARTIAL if summary.failed_total else EXIT_OK


def cmd_embed_text(args: argparse.Namespace) -> int:
    check_output_folder(args.output)
    check_text_options(args)
    check_file_list(args.file_list, what="one text per line")
    device = resolve_device(args.device)
    texts = list(args.texts) + (read_file_list(args.file_list) if args.file_list else [])
    if not texts:
        raise UsageError("no texts: give them as arguments or with --file-list (one text per line)")
    tower = from_checkpoint(lambda: SigLIP2TextEncoder.from_pretrained(args.model), args.model)
    tokenizer = load_tokenizer(args.model, args.text_preprocessing)
    settings = TextEmbedSettings(
        model=args.model,
        text_preprocessing=tokenizer.preprocessing,
        save_dtype=args.save_dtype,
        dtype=args.dtype,
        device=device,
        batch_size=args.batch_size,
        shard_size=args.shard_size,
    )
    summary = embed_texts(
        texts,
        args.output,
        tower,
        tokenizer,
        settings,
        resume=args.resume,
        overwrite=args.overwrite,
        progress=None if not args.quiet else False,
    )
    logger.info("%s", summary)
    return EXIT_OK


def _extract_command(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("extract", help="extract features of many images into safetensors shards")
    p.add_argument("inputs", nargs="*", help="image files, folders (recursive) or glob patterns")
    p.add_argument("--file-list", metavar="TXT", help="a text file with one image path per line")
    p.add_argument(
        "--tar",
        action="append",
        default=[],
        metavar="SPEC",
        help="WebDataset tar shards instead of files: a path, a brace pattern ('shards-{000..099}.tar'), 'pipe:CMD' "
        "or a URL; repeatable. Each sample's key is its id in the manifest; with an image-text checkpoint each "
        "sample's caption (txt, or json 'caption') is embedded too, as caption_pooled",
    )
    p.add_argument("--no-captions", action="store_true", help="tar shards: extract the images only")
    frames = p.add_mutually_exclusive_group()
    frames.add_argument("--fps", type=float, help="take video files too: a frame every 1/FPS seconds")
    frames.add_argument("--num-frames", type=positive_int, help="take video files too: N frames, evenly spaced")
    add_job_options(p, "images", batch_size=32, shard_size=1024)
    add_model_options(p)
    p.add_argument("--no-pooled", action="store_true", help="do not save the pooled (attention-pool) features")
    p.add_argument("--tokens", action="store_true", help="save the final patch tokens (after post-layernorm)")
    p.add_argument(
        "--layers",
        type=int,
        nargs="+",
        default=[],
        metavar="I",
        help="save these hidden states (transformers' indexing: 0 embeddings, -1 last, -2 penultimate)",
    )
    p.add_argument(
        "--quantize", choices=sorted(QUANTIZATIONS), help="torchao int8 encoder layers (int8: weights and activations)"
    )
    p.add_argument(
        "--workers", type=non_negative_int, help="image decoding processes (default: min(4, CPUs); 0: in this one)"
    )
    p.add_argument(
        "--max-num-patches", type=positive_int, help="NaFlex patch budget per image (default: the checkpoint's)"
    )
    p.add_argument("--no-exif", action="store_true", help="ignore EXIF orientation")
    p.add_argument(
        "--max-pixels",
        type=positive_int,
        default=DEFAULT_MAX_PIXELS,
        help=f"larger images are rejected as decompression bombs (default {DEFAULT_MAX_PIXELS})",
    )
    p.set_defaults(run=cmd_extract)


def _embed_text_command(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("embed-text", help="text embeddings of many texts, in extract's layout")
    p.add_argument("texts", nargs="*", help="texts")
    p.add_argument("--file-list", metavar="TXT", help="a text file with one text per line")
    add_job_options(p, "texts", batch_size=256, shard_size=65536)
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"Hub id or local folder (default {DEFAULT_MODEL})")
    add_text_options(p, "lower for SigLIP 2 checkpoints, raw for SigLIP 1")
    p.set_defaults(run=cmd_embed_text)


def register(commands: argparse._SubParsersAction) -> None:
    """Add this module's commands to the parser."""
    _extract_command(commands)
    _embed_text_command(commands)
