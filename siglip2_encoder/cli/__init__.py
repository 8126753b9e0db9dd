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
import logging

from ..errors import ArgumentError
from . import convert, describe, evaluation, jobs, search, serving
from .common import (
    EXIT_FATAL,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_PARTIAL,
    EXIT_USAGE,
    OPTION_SPELLINGS,
    QUIET,
    FatalError,
    UsageError,
    add_quiet,
)

__all__ = ["EXIT_FATAL", "EXIT_INTERRUPTED", "EXIT_OK", "EXIT_PARTIAL", "EXIT_USAGE", "main"]

logger = logging.getLogger("siglip2_encoder")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="siglip2-encoder", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("-q", "--quiet", **QUIET)
    commands = parser.add_subparsers(dest="command", required=True)
    for group in (jobs, search, convert, serving, describe, evaluation):
        group.register(commands)
    for command in commands.choices.values():  # global options work after the command too
        add_quiet(command)
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
