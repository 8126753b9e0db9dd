"""What every command shares: exit codes, the two error kinds, model loading with an offline hint, option types
and checks."""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch

from ..checkpoints.hub import CheckpointError, HubUnreachableError
from ..data.processor import ImageProcessor
from ..data.tokenizer import TEXT_PREPROCESSING, TextTokenizer
from ..models.model import SigLIP2Encoder
from ..pipeline.settings import DTYPES
from ..pipeline.store import TEXT_INPUTS, ExtractedFeatures
from ..presets import get_preset

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


def load_tokenizer(model: str, preprocessing: str | None) -> TextTokenizer:
    """The checkpoint's tokenizer with ``--text-preprocessing`` (None: the checkpoint family's default)."""
    tokenizer = from_checkpoint(lambda: TextTokenizer.from_pretrained(model), model)
    return tokenizer if preprocessing is None else TextTokenizer.from_preprocessing(tokenizer.tokenizer, preprocessing)


QUIET = dict(action="store_true", help="no progress bar, only warnings and errors")


def add_quiet(parser: argparse.ArgumentParser) -> None:
    """-q / --quiet after a command too; absent, the value given before the command stays."""
    parser.add_argument("-q", "--quiet", **QUIET, default=argparse.SUPPRESS)


def add_text_options(parser: argparse.ArgumentParser, default: str) -> None:
    """``--text-preprocessing`` (``default`` says what happens without it), and the refusal of ``--no-lowercase``."""
    parser.add_argument(
        "--text-preprocessing",
        choices=TEXT_PREPROCESSING,
        help=f"raw: texts as given; lower: lowercased, punctuation kept; canonical: big_vision's zero-shot rule "
        f"(lowercase, no ASCII punctuation); default {default}",
    )
    parser.add_argument("--no-lowercase", action="store_true", help=argparse.SUPPRESS)  # before 0.2.0


def check_text_options(args: argparse.Namespace) -> None:
    if args.no_lowercase:
        raise UsageError("--no-lowercase is --text-preprocessing raw since 0.2.0")


def add_model_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--model", default=DEFAULT_MODEL, help=f"Hub id or local folder (default {DEFAULT_MODEL})")
    group.add_argument(
        "--random-weights",
        metavar="PRESET",
        type=preset_name,
        help="no download: this architecture with seeded random weights (meaningless features); see `info --list`",
    )


def preset_name(name: str) -> str:
    try:
        return get_preset(name).name
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def resolve_device(name: str | None) -> str:
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


def check_output_folder(output: str) -> None:
    path = Path(output)
    if path.exists() and not path.is_dir():
        raise UsageError(f"-o {output} is a file; give a folder (it is created if missing)")
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not os.access(existing, os.W_OK | os.X_OK):
        raise FatalError(f"cannot write the output folder {output}: {existing} is not writable")


def check_file_list(file_list: str | None, option: str = "--file-list", what: str = "one image path per line") -> None:
    if file_list is None:
        return
    path = Path(file_list)
    if path.is_dir():
        raise UsageError(f"{option} {file_list} is a folder; give a text file with {what}")
    if not path.is_file():
        raise UsageError(f"{option} {file_list}: no such file")
    if not os.access(path, os.R_OK):
        raise UsageError(f"{option} {file_list} is not readable")


def add_job_options(parser: argparse.ArgumentParser, unit: str, batch_size: int, shard_size: int) -> None:
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


def open_pooled(folder: str) -> ExtractedFeatures:
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
