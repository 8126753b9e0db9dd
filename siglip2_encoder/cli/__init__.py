"""``siglip2-encoder``: feature extraction and inspection from the command line.

Commands: ``extract`` (folders of images -> safetensors shards + manifest), ``embed-text`` (texts -> the same
layout), ``classify`` (zero-shot labels of images with an image-text checkpoint), ``search`` (texts or images
against an ``extract`` / ``embed-text`` folder, exact or through a FAISS index), ``index`` (build that index),
``export-npy`` (index-ready files for autofaiss / clip-retrieval), ``convert`` (a tower between transformers', timm's
and big_vision's formats), ``export-onnx`` (the vision or text tower as an ONNX graph), ``serve`` (an HTTP server
for embeddings, zero-shot labels and search), ``info`` (architecture, size, cost), ``pca`` (the first three
principal components of the patch features as a picture); ``similarity QUERY`` is an alias of ``search --image
QUERY`` kept from before 0.2.0. Every command that loads a model takes it as ``--model`` (or ``--random-weights
PRESET`` for an offline architecture with random weights).

Exit status: 0 success; 1 fatal error (model not loadable, output exists or is being written, disk full, ...);
2 bad command line (an option's value, a missing --file-list, a device this machine lacks); 3 some inputs failed
(all others were written; a resumed run counts the failures of the run it continues); 130 interrupted (rerun
``extract`` with ``--resume``). Every error is one line naming the option to change; nothing is written before the
command line, the model and the inputs have been checked.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from tqdm import tqdm

from ..checkpoints.convert import read_config, read_processor_config
from ..checkpoints.hub import CheckpointError, CheckpointSource, HubUnreachableError
from ..config import EncoderConfig, ProcessorConfig
from ..data.images import DEFAULT_MAX_PIXELS, ImageLoadError, load_image
from ..data.processor import ImageProcessor
from ..data.tokenizer import TextTokenizer
from ..errors import ArgumentError
from ..export.quantize import QUANTIZATIONS
from ..files import write_atomic
from ..models.flops import encoder_flops, num_parameters
from ..models.joint import DEFAULT_TEMPLATE, SigLIP2Model
from ..models.model import SigLIP2Encoder
from ..models.text import SigLIP2TextEncoder
from ..pipeline.distributed import Ranks
from ..pipeline.extract import (
    DTYPES,
    ExtractSettings,
    TextEmbedSettings,
    discover_inputs,
    embed_texts,
    expand_tar_specs,
    expand_videos,
    extract_features,
    extract_tar_features,
    read_file_list,
)
from ..pipeline.faiss_index import FaissIndex
from ..pipeline.index_ready import NPY_DTYPES, export_index_ready
from ..pipeline.retrieval import top_k
from ..pipeline.store import TEXT_INPUTS, ExtractedFeatures
from ..presets import get_preset, list_presets

__all__ = ["main"]

logger = logging.getLogger("siglip2_encoder")

EXIT_OK, EXIT_FATAL, EXIT_USAGE, EXIT_PARTIAL, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
# The library's arguments (errors.ArgumentError) as this command line spells them.
OPTION_SPELLINGS = {"resume": "--resume", "overwrite": "--overwrite", "output": "-o", "pooled": "without --no-pooled"}
DEFAULT_MODEL = "google/siglip2-so400m-patch14-384"
RANDOM_BANNER = "RANDOM WEIGHTS (%s): the architecture runs, but the features are meaningless"
T = TypeVar("T")


class FatalError(Exception):
    """Ends the command with a one-line error and exit status 1."""


class UsageError(FatalError):
    """A bad command line: ends the command with a one-line error naming the option, and exit status 2."""


def offline_hint(model: str) -> str:
    """What to do without Hub access: the preset of the same architecture, if ``model`` names one."""
    try:
        preset = get_preset(model)
    except ValueError:
        return "`siglip2-encoder info --list` shows the architectures --random-weights builds offline"
    return f"run the same command with --random-weights {preset.name} (offline, meaningless features)"


def positive_int(text: str) -> int:
    """argparse type: an int >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive int, got {value}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def from_checkpoint(load: Callable[[], T], model: str) -> T:
    """``load()``, a checkpoint's loading, with its failures as one-line fatal errors."""
    try:
        return load()
    except HubUnreachableError as err:
        raise FatalError(
            f"cannot fetch {err.repo_id} from the Hugging Face Hub ({err.reason}); pass a local folder with --model, "
            f"or {offline_hint(model)}"
        ) from None
    except (CheckpointError, OSError) as err:  # OSError: transformers' AutoTokenizer on a folder without one
        raise FatalError(str(err).splitlines()[0]) from None


def load_model(model: str, random_weights: str | None) -> tuple[SigLIP2Encoder, ImageProcessor]:
    """The encoder and processor named on the command line; random weights are seeded, so runs agree."""
    if random_weights:
        logger.warning(RANDOM_BANNER, random_weights)
        torch.manual_seed(0)
        return SigLIP2Encoder.from_preset(random_weights), ImageProcessor.from_preset(random_weights)
    return from_checkpoint(
        lambda: (SigLIP2Encoder.from_pretrained(model), ImageProcessor.from_pretrained(model)), model
    )


def load_tokenizer(model: str, no_lowercase: bool) -> TextTokenizer:
    lowercase = False if no_lowercase else None
    return from_checkpoint(lambda: TextTokenizer.from_pretrained(model, lowercase=lowercase), model)


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--model", default=DEFAULT_MODEL, help=f"Hub id or local folder (default {DEFAULT_MODEL})")
    group.add_argument(
        "--random-weights",
        metavar="PRESET",
        type=_preset_name,
        help="no download: this architecture with seeded random weights (meaningless features); see `info --list`",
    )


def _preset_name(name: str) -> str:
    try:
        return get_preset(name).name
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _device(name: str | None) -> str:
    """--device checked against this machine (default: cuda if available)."""
    if name is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device {name!r} is not a device; use cpu, cuda or cuda:N") from None
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if device.type not in available:
        raise UsageError(f"--device {name!r}: only cpu, cuda and mps are supported")
    if not available[device.type]:
        raise UsageError(f"--device {name}: this machine has no {device.type.upper()} device; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UsageError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return str(device)


def _check_output_folder(output: str) -> None:
    path = Path(output)
    if path.exists() and not path.is_dir():
        raise UsageError(f"-o {output} is a file; give a folder (it is created if missing)")
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not os.access(existing, os.W_OK | os.X_OK):
        raise FatalError(f"cannot write the output folder {output}: {existing} is not writable")


def _check_file_list(file_list: str | None, option: str = "--file-list", what: str = "one image path per line") -> None:
    if file_list is None:
        return
    path = Path(file_list)
    if path.is_dir():
        raise UsageError(f"{option} {file_list} is a folder; give a text file with {what}")
    if not path.is_file():
        raise UsageError(f"{option} {file_list}: no such file")
    if not os.access(path, os.R_OK):
        raise UsageError(f"{option} {file_list} is not readable")


# ------------------------------------------------------------------------------------------------------ extract


def _extract_inputs(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """(tar shard URLs, files) that ``extract`` reads: one of the two is empty; videos are expanded later, once the
    settings say how."""
    if args.fps is not None and not args.fps > 0:
        raise UsageError(f"--fps {args.fps}: must be > 0")
    videos = args.fps is not None or args.num_frames is not None
    if args.tar and videos:
        raise UsageError("--fps / --num-frames take frames of video files; tar shards (--tar) hold images")
    if args.tar and (args.inputs or args.file_list):
        raise UsageError("--tar reads tar shards: give either --tar or image files / folders / --file-list, not both")
    if args.tar:
        try:
            return expand_tar_specs(args.tar), []
        except (ValueError, ImportError) as err:
            raise UsageError(f"--tar {' '.join(args.tar)}: {err}") from None
    paths = discover_inputs(args.inputs, args.file_list, videos=videos)
    if not paths:
        raise UsageError("no input images: give files, folders, glob patterns, --file-list or --tar")
    return [], paths


def cmd_extract(args: argparse.Namespace) -> int:
    # Everything is checked before anything is written: options, inputs, the model.
    _check_output_folder(args.output)
    _check_file_list(args.file_list)
    device = _device(args.device)
    urls, paths = _extract_inputs(args)
    videos = args.fps is not None or args.num_frames is not None
    model, processor = load_model(args.model, args.random_weights)
    name = args.random_weights or args.model
    if args.max_num_patches is not None and not processor.config.naflex:
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
    settings = ExtractSettings(
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
    )
    if videos:
        paths = expand_videos(paths, settings)
    workers = args.workers if args.workers is not None else min(4, os.cpu_count() or 1)
    ranks = Ranks.from_env()  # under torchrun: this process's share of the inputs
    where = f" (rank {ranks.rank} of {ranks.world})" if ranks.distributed else ""
    count = f"{len(urls)} tar shards" if args.tar else f"{len(paths)} inputs"
    logger.info("%s -> %s (%s)%s", count, args.output, ", ".join(settings.feature_names), where)
    summary = (extract_tar_features if args.tar else extract_features)(
        urls if args.tar else paths,
        args.output,
        model,
        processor,
        settings,
        resume=args.resume,
        overwrite=args.overwrite,
        num_workers=workers,
        progress=None if not args.quiet else False,
        ranks=ranks,
    )
    for path, reason in summary.failures[:20]:
        logger.warning("failed: %s", reason if path in reason else f"{path}: {reason}")
    if len(summary.failures) > 20:
        logger.warning("... and %d more failures, listed in %s/manifest.jsonl", len(summary.failures) - 20, args.output)
    if summary.failed_before:
        logger.warning("%d inputs failed in the earlier run; see %s/manifest.jsonl", summary.failed_before, args.output)
    if settings.random_weights:
        logger.warning(RANDOM_BANNER, settings.model)
    logger.info("%s%s", summary, where)
    if ranks.distributed:
        # torchrun turns any non-zero exit into its own failure report (and one rank's into the others' end): rank 0
        # names the whole folder's failures here, and every rank exits 0.
        if ranks.main and summary.failed_total:
            logger.warning("%d inputs failed; they are listed in %s/manifest.jsonl", summary.failed_total, args.output)
        return EXIT_OK
    return EXIT_PARTIAL if summary.failed_total else EXIT_OK


# ------------------------------------------------------------------------------------------------------ info


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
        "preprocessing    "
        + (
            f"NaFlex, up to {processing.max_num_patches} patches, aspect ratio kept"
            if processing.naflex
            else f"resize to {processing.image_size[0]}x{processing.image_size[1]}"
        )
        + f", {processing.resample}, mean {list(processing.image_mean)}, std {list(processing.image_std)}",
    ]
    print("\n".join(lines))
    return EXIT_OK


def _describe(model: str) -> tuple[EncoderConfig, ProcessorConfig, str]:
    """Architecture, preprocessing and their source for a Hub id, folder or preset name, loading no weights.

    A Hub id that cannot be reached falls back to the preset table when it names a preset.
    """
    try:
        preset = get_preset(model)
    except ValueError:
        preset = None
    if preset is not None and not model.startswith("google/"):
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


# ------------------------------------------------------------------------------------------------------ pca


def pca_picture(image: np.ndarray, features: torch.Tensor) -> np.ndarray:
    """The image beside its features' first three principal components as RGB.

    Args:
        image: (H, W, 3) uint8.
        features: (D, h, w) patch features.

    Returns:
        (H, 2 * W + gap, 3) uint8: the image, then the components (each scaled to its 1st-99th percentile),
        upsampled bilinearly to the image size.
    """
    d, h, w = features.shape
    tokens = features.reshape(d, h * w).T.float()
    tokens = tokens - tokens.mean(0)
    _, _, v = torch.linalg.svd(tokens, full_matrices=False)
    components = tokens @ v[:3].T  # (h * w, 3)
    low, high = torch.quantile(components, 0.01, dim=0), torch.quantile(components, 0.99, dim=0)
    components = ((components - low) / (high - low).clamp_min(1e-6)).clamp(0, 1)
    grid = components.T.reshape(1, 3, h, w)
    height, width = image.shape[:2]
    upsampled = torch.nn.functional.interpolate(grid, size=(height, width), mode="bilinear", align_corners=False)
    pca = (upsampled[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    gap = np.full((height, max(4, width // 50), 3), 255, np.uint8)
    return np.concatenate([image, gap, pca], axis=1)


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
    picture = pca_picture(shown, features)
    Image.fromarray(picture).save(args.output)
    logger.info("PCA of %s (%dx%d tokens) written to %s", args.image, *features.shape[1:], args.output)
    if args.random_weights:
        logger.warning(RANDOM_BANNER, args.random_weights)
    return EXIT_OK


# ------------------------------------------------------------------------------------------------------ similarity


def cmd_similarity(args: argparse.Namespace) -> int:
    """``similarity QUERY`` before 0.2.0: now ``search --image QUERY``, which it runs, saying so."""
    logger.warning(
        "similarity is `search --image %s --features %s -k %d` since 0.2.0; this alias will be removed",
        args.query,
        args.features,
        args.top_k,
    )
    search = argparse.Namespace(**vars(args), image=[args.query], queries=[], faiss=False, no_lowercase=False)
    return cmd_search(search)


# ------------------------------------------------------------------------------------------------------ classify


def _labels(args: argparse.Namespace) -> list[str]:
    labels = list(args.labels or [])
    if args.labels_file:
        _check_file_list(args.labels_file, option="--labels-file", what="one label per line")
        labels += read_file_list(args.labels_file)
    if not labels:
        raise UsageError("no labels: give them with --labels A B C or --labels-file FILE (one per line)")
    return labels


def cmd_classify(args: argparse.Namespace) -> int:
    labels = _labels(args)
    if args.random_weights:
        raise UsageError(
            "classify needs the checkpoint's tokenizer, which random weights do not have: pass --model with a Hub id "
            "or a local folder of an image-text checkpoint"
        )
    paths = discover_inputs(args.inputs)
    if not paths:
        raise UsageError("no input images: give files, folders or glob patterns")
    model = from_checkpoint(lambda: SigLIP2Model.from_pretrained(args.model), args.model)
    tokenizer = load_tokenizer(args.model, args.no_lowercase)
    try:
        label_set = model.encode_labels(labels, tokenizer, args.template or [DEFAULT_TEMPLATE])
    except ValueError as err:
        raise UsageError(f"--labels / --template: {err}") from None
    processor = ImageProcessor(model.vision_model.processor_config)
    rows: list[dict] = []
    show = not args.quiet and sys.stderr.isatty()
    for start in tqdm(range(0, len(paths), args.batch_size), disable=not show, unit="batch"):
        batch = {path: None for path in paths[start : start + args.batch_size]}  # path -> its row, input order
        loaded = {}
        for path in batch:
            try:
                loaded[path] = load_image(path)
            except ImageLoadError as err:
                batch[path] = {"path": path, "status": "failed", "error": str(err)}
                logger.warning("failed: %s", err)
        if loaded:
            ranked = model.classify(list(loaded.values()), label_set, processor=processor, top_k=args.top_k)
            for path, labels_of_image in zip(loaded, ranked):
                batch[path] = {"path": path, "status": "ok", "labels": labels_of_image}
                print(path)
                print("\n".join(f"  {r['score']:.4f}  {r['label']}" for r in labels_of_image))
        rows += batch.values()
    if args.jsonl:
        write_atomic(Path(args.jsonl), "".join(json.dumps(row) + "\n" for row in rows).encode())
    failed = sum(row["status"] == "failed" for row in rows)
    logger.info("classified %d images, %d failed", len(rows) - failed, failed)
    return EXIT_PARTIAL if failed else EXIT_OK


# ------------------------------------------------------------------------------------------------------ search


def _open_pooled(folder: str) -> ExtractedFeatures:
    """An ``extract`` / ``embed-text`` folder given with --features, which must hold pooled features."""
    try:
        store = ExtractedFeatures.open(folder)
    except ValueError as err:
        raise UsageError(f"--features: {err}") from None
    if store.inputs != TEXT_INPUTS and not store.settings.get("pooled"):
        raise FatalError(f"{folder} holds no pooled features; extract without --no-pooled")
    if not store.ok:
        raise FatalError(f"{folder} holds no successfully extracted {store.inputs}")
    return store


def _query_images(args: argparse.Namespace, store: ExtractedFeatures) -> torch.Tensor:
    """(Q, D) pooled features of the --image files, by the folder's model and patch budget."""
    name, settings = store.settings["model"], store.settings
    model, processor = load_model(name, name if settings.get("random_weights") else None)
    images = []
    for path in args.image:
        try:
            images.append(load_image(path))
        except ImageLoadError as err:
            raise UsageError(f"--image: {err}") from None
    kwargs = {"max_num_patches": settings["max_num_patches"]} if settings.get("max_num_patches") else {}
    with torch.inference_mode():
        return model(**processor(images, **kwargs), return_last=False).pooler_output


def _query_texts(args: argparse.Namespace, store: ExtractedFeatures) -> torch.Tensor:
    """(Q, D) text features of the query texts, by the folder's model."""
    name = store.settings["model"]
    if store.settings.get("random_weights"):
        raise FatalError(f"{args.features} was extracted with random weights, which have no text tower or tokenizer")
    tower = from_checkpoint(lambda: SigLIP2TextEncoder.from_pretrained(name), name)
    tokens = load_tokenizer(name, args.no_lowercase)(args.queries)
    with torch.inference_mode():
        return tower(tokens.input_ids, tokens.attention_mask, return_last=False).pooler_output


def cmd_search(args: argparse.Namespace) -> int:
    if bool(args.queries) == bool(args.image):
        raise UsageError("give query texts, or query images with --image (one kind per search)")
    store = _open_pooled(args.features)
    index = None
    if args.faiss:
        try:
            index = FaissIndex.load(store)
        except (ValueError, ImportError) as err:
            raise FatalError(str(err)) from None
    queries = _query_images(args, store) if args.image else _query_texts(args, store)
    names = [store.name(row) for rows in store.shard_rows().values() for row in rows]
    if index is not None:
        scores, indices = index.search(queries, args.top_k)
    else:
        scores, indices = top_k(queries, (tensor for _, tensor, _ in store.iter_shards("pooled")), args.top_k)
    for query, row_scores, row_indices in zip(args.image or args.queries, scores.tolist(), indices.tolist()):
        print(query)
        print("\n".join(f"  {score:.4f}  {names[i]}" for score, i in zip(row_scores, row_indices) if i >= 0))
    return EXIT_OK


def cmd_index(args: argparse.Namespace) -> int:
    store = _open_pooled(args.features)
    try:
        index = FaissIndex.build(store, args.factory, nprobe=args.nprobe)
        index.save(store)
    except ImportError as err:
        raise FatalError(str(err)) from None
    except ValueError as err:
        raise UsageError(f"--factory / --nprobe: {err}") from None
    nprobe = f", nprobe {index.nprobe}" if index.nprobe else ""
    logger.info("indexed %d vectors of %s as %s%s", index.index.ntotal, args.features, index.factory, nprobe)
    return EXIT_OK


def cmd_export_npy(args: argparse.Namespace) -> int:
    store = _open_pooled(args.features)
    _check_output_folder(args.output)
    try:
        export_index_ready(
            store, args.output, dtype=args.save_dtype, rows_per_file=args.rows_per_file, overwrite=args.overwrite
        )
    except ImportError as err:
        raise FatalError(str(err)) from None
    return EXIT_OK


# ------------------------------------------------------------------------------------------------------ convert

CONVERT_SOURCES = ("auto", "hf", "timm", "big_vision")


def _source_format(source: str, declared: str) -> str:
    """The format of ``convert``'s SOURCE: as declared, or from what it is (an ``.npz`` file is big_vision's, a
    folder whose config.json names an ``architecture`` is timm's, ``hf-hub:`` is timm's Hub scheme)."""
    if declared != "auto":
        return declared
    path = Path(source)
    if path.is_file() and path.suffix == ".npz":
        return "big_vision"
    config = path / "config.json"
    if config.is_file():
        try:
            return "timm" if "architecture" in json.loads(config.read_text()) else "hf"
        except (ValueError, OSError):
            return "hf"  # the transformers reader names what is wrong with it
    return "timm" if source.startswith("hf-hub:") else "hf"


def cmd_convert(args: argparse.Namespace) -> int:
    source = _source_format(args.source, args.source_format)
    if args.image_size is not None and source != "big_vision":
        raise UsageError(f"--image-size is for big_vision .npz sources; {args.source} is read as {source}")
    _check_output_folder(args.destination)
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


# ------------------------------------------------------------------------------------------------------ embed-text


def cmd_embed_text(args: argparse.Namespace) -> int:
    _check_output_folder(args.output)
    _check_file_list(args.file_list, what="one text per line")
    device = _device(args.device)
    texts = list(args.texts) + (read_file_list(args.file_list) if args.file_list else [])
    if not texts:
        raise UsageError("no texts: give them as arguments or with --file-list (one text per line)")
    tower = from_checkpoint(lambda: SigLIP2TextEncoder.from_pretrained(args.model), args.model)
    tokenizer = load_tokenizer(args.model, args.no_lowercase)
    settings = TextEmbedSettings(
        model=args.model,
        lowercase=tokenizer.lowercase,
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


# ------------------------------------------------------------------------------------------------------ main


def _add_job_options(parser: argparse.ArgumentParser, unit: str, batch_size: int, shard_size: int) -> None:
    """The options every job writing an output folder takes (``extract``, ``embed-text``): the folder, precisions,
    device, batch and shard sizes, and resume / overwrite."""
    parser.add_argument("-o", "--output", required=True, help="output folder")
    parser.add_argument("--save-dtype", choices=sorted(DTYPES), default="fp32", help="storage precision (default fp32)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="compute precision (default fp32)")
    parser.add_argument("--device", help="cpu, cuda, cuda:1, mps (default: cuda if available)")
    parser.add_argument("--batch-size", type=positive_int, default=batch_size, help=f"{unit} per forward pass")
    parser.add_argument(
        "--shard-size", type=positive_int, default=shard_size, help=f"{unit} per output shard (default {shard_size})"
    )
    again = parser.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true", help="continue an interrupted run in the output folder")
    again.add_argument("--overwrite", action="store_true", help="replace an existing output folder")


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
        "or a URL; repeatable. Each sample's key is its id in the manifest",
    )
    frames = p.add_mutually_exclusive_group()
    frames.add_argument("--fps", type=float, help="take video files too: a frame every 1/FPS seconds")
    frames.add_argument("--num-frames", type=positive_int, help="take video files too: N frames, evenly spaced")
    _add_job_options(p, "images", batch_size=32, shard_size=1024)
    _add_model_options(p)
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


def _classify_command(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("classify", help="zero-shot labels of images (an image-text checkpoint)")
    p.add_argument("inputs", nargs="*", help="image files, folders (recursive) or glob patterns")
    p.add_argument("--labels", nargs="+", metavar="LABEL", help="candidate labels")
    p.add_argument("--labels-file", metavar="TXT", help="a text file with one label per line")
    p.add_argument(
        "--template",
        action="append",
        help=f"prompt template with {{}} for the label (default {DEFAULT_TEMPLATE!r}); repeat to average several",
    )
    p.add_argument("-k", "--top-k", type=positive_int, help="show the k most likely labels (default all)")
    p.add_argument("--jsonl", metavar="FILE", help="also write one JSON row per image to FILE")
    p.add_argument("--batch-size", type=positive_int, default=32)
    p.add_argument(
        "--no-lowercase", action="store_true", help="keep texts' case (SigLIP 2 texts are lowercased by default)"
    )
    _add_model_options(p)
    p.set_defaults(run=cmd_classify)


def _search_command(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("search", help="best matches of texts or images in an extract / embed-text folder")
    p.add_argument("queries", nargs="*", help="texts to search for")
    p.add_argument("--image", nargs="+", metavar="FILE", help="search for these images instead of texts")
    p.add_argument("--features", required=True, help="folder written by `extract` or `embed-text`")
    p.add_argument("-k", "--top-k", type=positive_int, default=10)
    p.add_argument("--faiss", action="store_true", help="use the folder's FAISS index (see `index`); default exact")
    p.add_argument("--no-lowercase", action="store_true", help="keep the queries' case (SigLIP 2 lowercases)")
    p.set_defaults(run=cmd_search)


def _index_command(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("index", help="build a FAISS index beside an extract / embed-text folder's features")
    p.add_argument("--features", required=True, help="folder written by `extract` or `embed-text`")
    p.add_argument(
        "--factory",
        default="auto",
        help="FAISS index description, e.g. Flat, IVF4096,Flat, HNSW32 (default auto: exact under 50k vectors, "
        "else IVF with about 4 sqrt(N) lists)",
    )
    p.add_argument("--nprobe", type=positive_int, help="lists searched per query, IVF indexes (default lists/16)")
    p.set_defaults(run=cmd_index)


def _export_npy_command(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "export-npy", help="index-ready files (clip-retrieval's img_emb/*.npy + metadata/*.parquet) of a folder"
    )
    p.add_argument("--features", required=True, help="folder written by `extract` or `embed-text`")
    p.add_argument("-o", "--output", required=True, help="output folder")
    p.add_argument("--save-dtype", choices=sorted(NPY_DTYPES), default="fp16", help="storage precision (default fp16)")
    p.add_argument("--rows-per-file", type=positive_int, default=250_000, help="vectors per file (default 250000)")
    p.add_argument("--overwrite", action="store_true", help="replace the .npy and .parquet files of an earlier export")
    p.set_defaults(run=cmd_export_npy)


def _embed_text_command(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("embed-text", help="text embeddings of many texts, in extract's layout")
    p.add_argument("texts", nargs="*", help="texts")
    p.add_argument("--file-list", metavar="TXT", help="a text file with one text per line")
    _add_job_options(p, "texts", batch_size=256, shard_size=65536)
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"Hub id or local folder (default {DEFAULT_MODEL})")
    p.add_argument(
        "--no-lowercase", action="store_true", help="keep texts' case (SigLIP 2 texts are lowercased by default)"
    )
    p.set_defaults(run=cmd_embed_text)


def cmd_export_onnx(args: argparse.Namespace) -> int:
    if args.old_destination is not None:
        raise UsageError(
            "export-onnx takes the model as --model MODEL (or --random-weights PRESET) and OUT.onnx alone since "
            f"0.2.0: export-onnx {args.old_destination} --model {args.destination}"
        )
    if args.old_output is not None:
        raise UsageError(f"export-onnx's --output is --returns since 0.2.0: --returns {args.old_output}")
    if args.text:
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
    if isinstance(output, int):
        try:
            model.layer_index(output)
        except ValueError as err:
            raise UsageError(f"--returns {output}: {err}") from None
    from ..export.onnx_export import export_onnx

    try:
        export_onnx(model, args.destination, output=output)
    except ImportError as err:
        raise FatalError(f"{err}; pip install 'siglip2-encoder[onnx]'") from None
    except ValueError as err:
        raise UsageError(f"--returns {args.returns}: {err}") from None
    logger.info("wrote %s (%s of %s)", args.destination, output, args.random_weights or args.model)
    return EXIT_OK


def _export_onnx_command(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("export-onnx", help="the vision (or text) tower as an ONNX model, dynamic batch and grid")
    p.add_argument("destination", help="the .onnx file to write (its weights go beside it, in DESTINATION.data)")
    p.add_argument("old_destination", nargs="?", help=argparse.SUPPRESS)  # the MODEL OUT.onnx form before 0.2.0
    _add_model_options(p)
    p.add_argument(
        "--returns", default="pooled", help="what the graph returns: pooled (default), tokens, or a hidden state (-2)"
    )
    p.add_argument("--output", dest="old_output", help=argparse.SUPPRESS)  # --returns before 0.2.0
    p.add_argument("--text", action="store_true", help="export the checkpoint's text tower (pooled text features)")
    p.set_defaults(run=cmd_export_onnx)


def cmd_serve(args: argparse.Namespace) -> int:
    if args.old_model is not None:
        raise UsageError(f"serve takes the model as --model since 0.2.0: serve --model {args.old_model}")
    try:
        import uvicorn

        from ..serve.app import Service, create_app
    except ImportError as err:
        raise FatalError(f"serve needs FastAPI and uvicorn ({err}): pip install 'siglip2-encoder[serve]'") from None
    if args.features is not None:
        _open_pooled(args.features)  # a folder to search must hold pooled features: checked before loading
    service = from_checkpoint(lambda: Service.load(args.model, args.features), args.model)
    app = create_app(service, max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, batching=not args.no_batching)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning" if args.quiet else "info")
    return EXIT_OK


def _serve_command(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("serve", help="an HTTP service: image / text embeddings, zero-shot scores, search")
    p.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"Hub id or local folder (image-text for text, zero-shot and search; default {DEFAULT_MODEL})",
    )
    p.add_argument("old_model", nargs="?", help=argparse.SUPPRESS)  # MODEL given positionally before 0.2.0
    p.add_argument("--features", help="an extract folder to search (GET /search)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=positive_int, default=8000)
    p.add_argument("--max-batch", type=positive_int, default=32, help="images per forward pass at most (default 32)")
    p.add_argument("--max-wait-ms", type=float, default=5.0, help="how long a batch waits for more (default 5 ms)")
    p.add_argument("--no-batching", action="store_true", help="one image per forward pass")
    p.set_defaults(run=cmd_serve)


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
    _add_model_options(p)
    p.add_argument("--layer", type=int, help="hidden state to show (default: the final tokens)")
    p.add_argument("--max-num-patches", type=positive_int, help="NaFlex patch budget")
    p.set_defaults(run=cmd_pca)


def _similarity_command(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("similarity", help="an alias of `search --image QUERY` (before 0.2.0)")
    p.add_argument("query", help="query image file")
    p.add_argument("--features", required=True, help="folder written by `extract` (with pooled features)")
    p.add_argument("-k", "--top-k", type=positive_int, default=5)
    p.set_defaults(run=cmd_similarity)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="siglip2-encoder", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar, only warnings and errors")
    commands = parser.add_subparsers(dest="command", required=True)
    _extract_command(commands)
    _embed_text_command(commands)
    _classify_command(commands)
    _search_command(commands)
    _index_command(commands)
    _export_npy_command(commands)
    _convert_command(commands)
    _export_onnx_command(commands)
    _serve_command(commands)
    _info_command(commands)
    _pca_command(commands)
    _similarity_command(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    try:
        return args.run(args)
    except UsageError as err:
        logger.error("error: %s", err)
        return EXIT_USAGE
    except FatalError as err:
        logger.error("error: %s", err)
        return EXIT_FATAL
    except ArgumentError as err:  # the library names Python arguments; here they are options
        logger.error("error: %s", err.spelled(OPTION_SPELLINGS))
        return EXIT_FATAL
    except ValueError as err:  # invalid settings or output folder conflicts, already worded for the user
        logger.error("error: %s", err)
        return EXIT_FATAL
    except OSError as err:  # a full disk, a folder turned read-only: committed shards stay whole
        where = f" ({err.filename})" if err.filename else ""
        resumable = args.command in ("extract", "embed-text")
        rerun = "; committed shards are kept: fix it and rerun with --resume" if resumable else ""
        logger.error("error: %s%s%s", err.strerror or err, where, rerun)
        return EXIT_FATAL
    except KeyboardInterrupt:
        logger.error("interrupted; committed shards are kept, rerun with --resume to finish")
        return EXIT_INTERRUPTED
