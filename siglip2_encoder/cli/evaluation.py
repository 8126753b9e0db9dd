"""``eval TASK``: the numbers users measure, written as a JSON result and printed as a table."""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path

from ..eval.datasets import load_labelled
from ..eval.prompts import TEMPLATE_SETS, load_templates
from ..eval.zeroshot import evaluate_zeroshot
from ..files import write_atomic
from ..models.joint import SigLIP2Model
from .common import (
    DEFAULT_MODEL,
    EXIT_OK,
    UsageError,
    add_quiet,
    add_text_options,
    check_text_options,
    from_checkpoint,
    load_tokenizer,
    non_negative_int,
    positive_int,
    resolve_device,
)

logger = logging.getLogger("siglip2_encoder")


def cmd_zeroshot(args: argparse.Namespace) -> int:
    check_text_options(args)
    device = resolve_device(args.device)
    output = Path(args.output)
    if output.is_dir():
        raise UsageError(f"-o {args.output} is a folder; give the JSON file to write")
    try:
        data = load_labelled(args.data, args.class_names)
        templates = load_templates(args.templates)
    except (ValueError, OSError) as err:
        raise UsageError(f"{err}") from None
    model = from_checkpoint(lambda: SigLIP2Model.from_pretrained(args.model), args.model)
    preprocessing = args.text_preprocessing or "canonical"
    tokenizer = load_tokenizer(args.model, None if preprocessing == "canonical" else preprocessing)
    features = args.features or f"{output.with_suffix('')}.features"
    logger.info("%d images, %d classes, %d templates -> %s", len(data.paths), len(data.classes), len(templates), output)
    result = evaluate_zeroshot(
        model,
        data,
        templates,
        features,
        tokenizer=tokenizer,
        canonicalize=preprocessing == "canonical",
        batch_size=args.batch_size,
        device=device,
        num_workers=args.workers if args.workers is not None else min(4, os.cpu_count() or 1),
        progress=None if not args.quiet else False,
    )
    result["dataset"]["source"] = str(args.data)
    result["settings"]["templates_name"] = str(args.templates)
    write_atomic(output, (json.dumps(result, indent=2) + "\n").encode())
    metrics, dataset = result["metrics"], result["dataset"]
    top5 = "-" if metrics["top5"] is None else f"{100 * metrics['top5']:.2f}"
    print(f"{'model':<40} {'images':>8} {'classes':>8} {'top-1':>7} {'top-5':>7} {'mean/class':>10}")
    print(
        f"{result['model'][-40:]:<40} {dataset['evaluated']:>8} {dataset['classes']:>8} "
        f"{100 * metrics['top1']:>7.2f} {top5:>7} {100 * metrics['mean_per_class_recall']:>10.2f}"
    )
    return EXIT_OK


def _zeroshot_command(tasks: argparse._SubParsersAction) -> None:
    p = tasks.add_parser("zeroshot", help="zero-shot classification accuracy (top-1, top-5, mean per class)")
    p.add_argument("data", help="a folder per class (ROOT/<class>/<image>), or a .csv / .jsonl of path,label rows")
    p.add_argument("-o", "--output", required=True, help="the JSON result to write")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"an image-text checkpoint (default {DEFAULT_MODEL})")
    p.add_argument("--class-names", metavar="TXT", help="one readable name per class, in label order")
    p.add_argument(
        "--templates",
        default="clip_paper",
        help=f"a named set ({', '.join(TEMPLATE_SETS)}; default clip_paper, as the papers) or a file, one per line",
    )
    p.add_argument("--features", help="the image features folder (default: OUTPUT without .json + .features)")
    p.add_argument("--device", help="cpu, cuda, cuda:1, mps (default: cuda if available)")
    p.add_argument("--batch-size", type=positive_int, default=32, help="images per forward pass")
    p.add_argument("--workers", type=non_negative_int, help="image decoding processes (default min(4, CPUs))")
    add_text_options(p, "canonical, as the SigLIP papers' zero-shot evaluator (aliases 'a, b': the first)")
    add_quiet(p)
    p.set_defaults(run=cmd_zeroshot)


def register(commands: argparse._SubParsersAction) -> None:
    """Add ``eval`` and its tasks to the parser."""
    p = commands.add_parser("eval", help="measure a model: zero-shot accuracy, ... (a JSON result and a table)")
    tasks = p.add_subparsers(dest="task", required=True)
    _zeroshot_command(tasks)
