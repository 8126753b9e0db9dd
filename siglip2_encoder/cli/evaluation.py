"""``eval TASK``: the numbers users measure, written as a JSON result and printed as a table."""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path

from ..data.processor import ImageProcessor
from ..eval.datasets import load_labelled
from ..eval.features import Encoding
from ..eval.probe import evaluate_probes
from ..eval.prompts import TEMPLATE_SETS, load_templates
from ..eval.retrieval import evaluate_retrieval, load_captioned
from ..eval.segmentation import evaluate_segmentation, load_segmentation
from ..eval.shards import is_shard_spec
from ..eval.zeroshot import evaluate_zeroshot
from ..files import write_atomic
from ..models.joint import SigLIP2Model
from .common import (
    DEFAULT_MODEL,
    EXIT_OK,
    UsageError,
    add_model_options,
    add_quiet,
    add_text_options,
    check_text_options,
    from_checkpoint,
    load_model,
    load_tokenizer,
    non_negative_int,
    positive_int,
    resolve_device,
)

logger = logging.getLogger("siglip2_encoder")


def _prepare(args: argparse.Namespace) -> tuple[Path, str]:
    """(the JSON result's path, the device), checked before anything loads."""
    check_text_options(args)
    device = resolve_device(args.device)
    output = Path(args.output)
    if output.is_dir():
        raise UsageError(f"-o {args.output} is a folder; give the JSON file to write")
    return output, device


def _run_options(args: argparse.Namespace, output: Path, device: str, processor: ImageProcessor | None = None) -> dict:
    """Where the image features are kept, and how the images are encoded."""
    encoding = Encoding(
        processor=processor,
        batch_size=args.batch_size,
        device=device,
        num_workers=args.workers if args.workers is not None else min(4, os.cpu_count() or 1),
        progress=None if not args.quiet else False,
    )
    return dict(features=args.features or f"{output.with_suffix('')}.features", encoding=encoding)


def _write(result: dict, output: Path, columns: dict[str, str]) -> None:
    """The JSON result, and a table of ``columns`` (heading -> metric) on stdout."""
    write_atomic(output, (json.dumps(result, indent=2) + "\n").encode())
    values = [result["metrics"][metric] for metric in columns.values()]
    print(f"{'model':<40} " + " ".join(f"{heading:>10}" for heading in columns))
    shown = ["-" if v is None else f"{100 * v:.2f}" for v in values]
    print(f"{result['model'][-40:]:<40} " + " ".join(f"{v:>10}" for v in shown))


def cmd_zeroshot(args: argparse.Namespace) -> int:
    output, device = _prepare(args)
    try:
        data = load_labelled(args.data, args.class_names)
        templates = load_templates(args.templates)
    except (ValueError, OSError) as err:
        raise UsageError(f"{err}") from None
    if not data.named:
        raise UsageError(
            f"{args.data}: the shards have no classnames.txt beside their split folder; give --class-names FILE, "
            f"one name per class in label order"
        )
    model = from_checkpoint(lambda: SigLIP2Model.from_pretrained(args.model), args.model)
    preprocessing = args.text_preprocessing or "canonical"
    tokenizer = load_tokenizer(args.model, None if preprocessing == "canonical" else preprocessing)
    logger.info("%d images, %d classes, %d templates -> %s", len(data.paths), len(data.classes), len(templates), output)
    canonicalize = preprocessing == "canonical"
    options = _run_options(args, output, device)
    result = evaluate_zeroshot(model, data, templates, tokenizer=tokenizer, canonicalize=canonicalize, **options)
    result["dataset"]["source"] = str(args.data)
    result["settings"]["templates_name"] = str(args.templates)
    _write(result, output, {"top-1": "top1", "top-5": "top5", "mean/class": "mean_per_class_recall"})
    return EXIT_OK


def cmd_retrieval(args: argparse.Namespace) -> int:
    output, device = _prepare(args)
    if args.images is not None and is_shard_spec(args.annotations):
        raise UsageError(f"--images applies to JSON annotations; the shards {args.annotations} hold their images")
    try:
        data = load_captioned(args.annotations, args.images)
    except (ValueError, OSError, KeyError) as err:
        raise UsageError(f"{args.annotations}: {err}") from None
    model = from_checkpoint(lambda: SigLIP2Model.from_pretrained(args.model), args.model)
    tokenizer = load_tokenizer(args.model, args.text_preprocessing)
    logger.info("%d images, %d captions -> %s", len(data.paths), sum(map(len, data.captions)), output)
    result = evaluate_retrieval(model, data, tokenizer=tokenizer, **_run_options(args, output, device))
    result["dataset"]["source"] = str(args.annotations)
    columns = {f"T->I R@{k}": f"image_retrieval_recall@{k}" for k in (1, 5, 10)}
    _write(result, output, columns | {f"I->T R@{k}": f"text_retrieval_recall@{k}" for k in (1, 5, 10)})
    return EXIT_OK


def cmd_probe(args: argparse.Namespace) -> int:
    output, device = _prepare(args)
    try:
        train, test = load_labelled(args.train, args.class_names), load_labelled(args.test, args.class_names)
    except (ValueError, OSError) as err:
        raise UsageError(f"{err}") from None
    tower, processor = load_model(args.model, args.random_weights)
    name = args.random_weights or args.model
    logger.info("%d training, %d test images, %d classes -> %s", len(train.paths), len(test.paths), len(train.classes),
                output)  # fmt: skip
    try:
        result = evaluate_probes(tower, name, train, test, **_run_options(args, output, device, processor))
    except ValueError as err:  # the two sets do not match
        raise UsageError(f"--train / --test: {err}") from None
    result["dataset"] |= {"train_source": str(args.train), "test_source": str(args.test)}
    _write(result, output, {"linear": "linear_top1", "kNN-10": "knn10_top1", "kNN-20": "knn20_top1"})
    return EXIT_OK


def cmd_segmentation(args: argparse.Namespace) -> int:
    output, device = _prepare(args)
    try:
        train, test = load_segmentation(args.train), load_segmentation(args.test)
    except (ValueError, OSError) as err:
        raise UsageError(f"{err}") from None
    tower, processor = load_model(args.model, args.random_weights)
    name = args.random_weights or args.model
    if args.layer is not None:
        try:
            tower.layer_index(args.layer)
        except ValueError as err:
            raise UsageError(f"--layer {args.layer}: {err}") from None
    if args.max_num_patches is not None and not tower.config.naflex:
        raise UsageError(f"--max-num-patches applies to NaFlex checkpoints; {name} has a fixed resolution")
    options = _run_options(args, output, device, processor) | dict(layer=args.layer, epochs=args.epochs)
    try:
        result = evaluate_segmentation(
            tower, name, train, test, args.num_classes, max_num_patches=args.max_num_patches, **options
        )
    except ValueError as err:  # a mask with a class index out of range
        raise UsageError(f"--num-classes {args.num_classes}: {err}") from None
    result["dataset"] |= {"train_source": str(args.train), "test_source": str(args.test)}
    _write(result, output, {"mIoU": "miou", "pixel acc": "pixel_accuracy"})
    return EXIT_OK


def _task_options(p: argparse.ArgumentParser, text_default: str | None) -> None:
    """What every task takes: the model, the result, the features folder, how images are encoded, texts (for the
    tasks with texts), -q."""
    p.add_argument("-o", "--output", required=True, help="the JSON result to write")
    if text_default is None:  # image features only: any tower, random weights too
        add_model_options(p)
    else:
        p.add_argument("--model", default=DEFAULT_MODEL, help=f"an image-text checkpoint (default {DEFAULT_MODEL})")
    p.add_argument("--features", help="the image features folder (default: OUTPUT without .json + .features)")
    p.add_argument("--device", help="cpu, cuda, cuda:1, mps (default: cuda if available)")
    p.add_argument("--batch-size", type=positive_int, default=32, help="images (and texts) per forward pass")
    p.add_argument("--workers", type=non_negative_int, help="image decoding processes (default min(4, CPUs))")
    if text_default is not None:
        add_text_options(p, text_default)
    else:
        p.set_defaults(text_preprocessing=None, no_lowercase=False)
    add_quiet(p)


def _zeroshot_command(tasks: argparse._SubParsersAction) -> None:
    p = tasks.add_parser("zeroshot", help="zero-shot classification accuracy (top-1, top-5, mean per class)")
    p.add_argument(
        "data",
        help="a folder per class (ROOT/<class>/<image>), a .csv / .jsonl of path,label rows, or WebDataset shards "
        "with cls labels (a CLIP_benchmark split folder DATASET/test, or shards-{000..009}.tar)",
    )
    p.add_argument("--class-names", metavar="TXT", help="one readable name per class, in label order")
    p.add_argument(
        "--templates",
        default="clip_paper",
        help=f"a named set ({', '.join(TEMPLATE_SETS)}; default clip_paper, as the papers) or a file, one per line",
    )
    _task_options(p, "canonical, as the SigLIP papers' zero-shot evaluator (aliases 'a, b': the first)")
    p.set_defaults(run=cmd_zeroshot)


def _retrieval_command(tasks: argparse._SubParsersAction) -> None:
    p = tasks.add_parser("retrieval", help="image-text retrieval recall@1/5/10, both ways")
    p.add_argument(
        "annotations",
        help="COCO captions JSON, a JSON list of {image, caption(s)} (Karpathy splits), JSON lines of them, or "
        "WebDataset shards with txt captions, one per line (a CLIP_benchmark split folder, or shard specs)",
    )
    p.add_argument("--images", metavar="ROOT", help="the folder image paths are relative to (default: the file's)")
    _task_options(p, "lower for SigLIP 2 checkpoints, raw for SigLIP 1 (as big_vision's retrieval evaluators)")
    p.set_defaults(run=cmd_retrieval)


def _probe_command(tasks: argparse._SubParsersAction) -> None:
    p = tasks.add_parser(
        "probe", aliases=["linear-probe", "knn"], help="linear-probe and kNN accuracy of frozen pooled features (both)"
    )
    p.add_argument(
        "--train", required=True, help="training images: a folder per class, a .csv / .jsonl table, or shards"
    )
    p.add_argument("--test", required=True, help="test images, with the same classes")
    p.add_argument("--class-names", metavar="TXT", help="one readable name per class, in label order")
    _task_options(p, None)
    p.set_defaults(run=cmd_probe)


def _segmentation_command(tasks: argparse._SubParsersAction) -> None:
    p = tasks.add_parser(
        "segmentation", aliases=["seg-probe"], help="mIoU of a linear head on frozen patch tokens (the paper's probe)"
    )
    p.add_argument("--train", required=True, help="ROOT with images/<name>.<ext> and masks/<name>.png")
    p.add_argument("--test", required=True, help="the test ROOT, the same layout")
    p.add_argument("--num-classes", type=positive_int, required=True, help="class indices in the masks: 0 .. N-1")
    p.add_argument("--layer", type=int, help="hidden state to probe (-2 = penultimate; default the final tokens)")
    p.add_argument("--epochs", type=positive_int, default=10, help="passes over the training images (default 10)")
    p.add_argument("--max-num-patches", type=positive_int, help="NaFlex patch budget per image")
    _task_options(p, None)
    p.set_defaults(run=cmd_segmentation)


def register(commands: argparse._SubParsersAction) -> None:
    """Add ``eval`` and its tasks to the parser."""
    p = commands.add_parser("eval", help="measure a model: zero-shot, retrieval, linear probe, kNN (JSON and a table)")
    tasks = p.add_subparsers(dest="task", required=True)
    _zeroshot_command(tasks)
    _retrieval_command(tasks)
    _probe_command(tasks)
    _segmentation_command(tasks)
