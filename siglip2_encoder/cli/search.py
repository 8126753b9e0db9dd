"""Commands over an extracted folder or with an image-text model: ``classify``, ``search``, ``index``,
``export-npy``, and ``similarity`` (an alias of ``search --image``)."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch

from ..data.images import ImageLoadError, load_image
from ..files import write_atomic
from ..models.joint import DEFAULT_TEMPLATE, SigLIP2Model
from ..models.text import SigLIP2TextEncoder
from ..pipeline.classify import classify_files
from ..pipeline.faiss_index import FaissIndex
from ..pipeline.index_ready import NPY_DTYPES, export_index_ready
from ..pipeline.retrieval import top_k
from ..pipeline.sources import discover_inputs, read_file_list
from ..pipeline.store import ExtractedFeatures
from .common import (
    EXIT_OK,
    EXIT_PARTIAL,
    FatalError,
    UsageError,
    add_model_options,
    add_text_options,
    check_file_list,
    check_output_folder,
    check_text_options,
    from_checkpoint,
    load_model,
    load_tokenizer,
    open_pooled,
    positive_int,
)

logger = logging.getLogger("siglip2_encoder")


def _labels(args: argparse.Namespace) -> list[str]:
    labels = list(args.labels or [])
    if args.labels_file:
        check_file_list(args.labels_file, option="--labels-file", what="one label per line")
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
    check_text_options(args)
    model = from_checkpoint(lambda: SigLIP2Model.from_pretrained(args.model), args.model)
    preprocessing = args.text_preprocessing or "canonical"
    # canonical: labels and templates as big_vision's zero-shot evaluator writes them, the tokenizer as the family's
    tokenizer = load_tokenizer(args.model, None if preprocessing == "canonical" else preprocessing)
    try:
        templates = args.template or [DEFAULT_TEMPLATE]
        label_set = model.encode_labels(labels, tokenizer, templates, canonicalize=preprocessing == "canonical")
    except ValueError as err:
        raise UsageError(f"--labels / --template: {err}") from None
    rows: list[dict] = []
    progress = None if not args.quiet else False
    for row in classify_files(paths, model, label_set, batch_size=args.batch_size, top_k=args.top_k, progress=progress):
        if row["status"] == "ok":
            print(row["path"])
            print("\n".join(f"  {r['score']:.4f}  {r['label']}" for r in row["labels"]))
        rows.append(row | {"text_preprocessing": preprocessing})
    if args.jsonl:
        write_atomic(Path(args.jsonl), "".join(json.dumps(row) + "\n" for row in rows).encode())
    failed = sum(row["status"] == "failed" for row in rows)
    logger.info("classified %d images, %d failed", len(rows) - failed, failed)
    return EXIT_PARTIAL if failed else EXIT_OK


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
    tokens = load_tokenizer(name, args.text_preprocessing)(args.queries)
    with torch.inference_mode():
        return tower(tokens.input_ids, tokens.attention_mask, return_last=False).pooler_output


def cmd_search(args: argparse.Namespace) -> int:
    check_text_options(args)
    if bool(args.queries) == bool(args.image):
        raise UsageError("give query texts, or query images with --image (one kind per search)")
    store = open_pooled(args.features)
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
    store = open_pooled(args.features)
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
    store = open_pooled(args.features)
    check_output_folder(args.output)
    try:
        export_index_ready(
            store, args.output, dtype=args.save_dtype, rows_per_file=args.rows_per_file, overwrite=args.overwrite
        )
    except ImportError as err:
        raise FatalError(str(err)) from None
    return EXIT_OK


def cmd_similarity(args: argparse.Namespace) -> int:
    """``similarity QUERY`` before 0.2.0: now ``search --image QUERY``, which it runs, saying so."""
    logger.warning(
        "similarity is `search --image %s --features %s -k %d` since 0.2.0; this alias will be removed",
        args.query,
        args.features,
        args.top_k,
    )
    search = argparse.Namespace(
        **vars(args), image=[args.query], queries=[], faiss=False, no_lowercase=False, text_preprocessing=None
    )
    return cmd_search(search)


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
    add_text_options(p, "canonical, as the SigLIP papers' zero-shot evaluator (aliases 'a, b': the first)")
    add_model_options(p)
    p.set_defaults(run=cmd_classify)


def _search_command(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("search", help="best matches of texts or images in an extract / embed-text folder")
    p.add_argument("queries", nargs="*", help="texts to search for")
    p.add_argument("--image", nargs="+", metavar="FILE", help="search for these images instead of texts")
    p.add_argument("--features", required=True, help="folder written by `extract` or `embed-text`")
    p.add_argument("-k", "--top-k", type=positive_int, default=10)
    p.add_argument("--faiss", action="store_true", help="use the folder's FAISS index (see `index`); default exact")
    add_text_options(p, "lower for SigLIP 2 checkpoints, raw for SigLIP 1")
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


def _similarity_command(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("similarity", help="an alias of `search --image QUERY` (before 0.2.0)")
    p.add_argument("query", help="query image file")
    p.add_argument("--features", required=True, help="folder written by `extract` (with pooled features)")
    p.add_argument("-k", "--top-k", type=positive_int, default=5)
    p.set_defaults(run=cmd_similarity)


def register(commands: argparse._SubParsersAction) -> None:
    """Add this module's commands to the parser."""
    _classify_command(commands)
    _search_command(commands)
    _index_command(commands)
    _export_npy_command(commands)
    _similarity_command(commands)
