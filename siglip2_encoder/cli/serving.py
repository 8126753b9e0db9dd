"""``serve``: the HTTP service."""

from __future__ import annotations

import argparse
from functools import partial

from .common import (
    DEFAULT_MODEL,
    EXIT_OK,
    FatalError,
    UsageError,
    add_text_options,
    check_text_options,
    from_checkpoint,
    open_pooled,
    positive_int,
)


def cmd_serve(args: argparse.Namespace) -> int:
    if args.old_model is not None:
        raise UsageError(f"serve takes the model as --model since 0.2.0: serve --model {args.old_model}")
    try:
        import uvicorn

        from ..serve.app import Service, ServiceLimits, create_app
    except ImportError as err:
        raise FatalError(f"serve needs FastAPI and uvicorn ({err}): pip install 'siglip2-encoder[serve]'") from None
    if not args.request_timeout > 0:
        raise UsageError(f"--request-timeout {args.request_timeout}: must be > 0 seconds")
    limits = ServiceLimits(
        max_body_bytes=args.max_body_mb * 2**20,
        max_pixels=args.max_pixels,
        decode_workers=args.decode_workers,
        request_timeout=args.request_timeout,
        max_texts=args.max_texts,
        max_text_chars=args.max_text_chars,
    )
    if args.features is not None:
        open_pooled(args.features)  # a folder to search must hold pooled features: checked before loading
    check_text_options(args)
    load = partial(Service.load, args.model, args.features, text_preprocessing=args.text_preprocessing)
    service = from_checkpoint(load, args.model)
    batching = not args.no_batching
    app = create_app(service, max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, batching=batching, limits=limits)
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
    add_text_options(p, "lower for SigLIP 2 checkpoints, raw for SigLIP 1 (free text; /classify: canonical)")
    limits = p.add_argument_group("limits per request (what one client may cost the server)")
    limits.add_argument("--max-body-mb", type=positive_int, default=20, help="an image body's size (default 20 MiB)")
    limits.add_argument("--max-pixels", type=positive_int, default=40_000_000, help="an image's pixels (default 40 M)")
    limits.add_argument("--decode-workers", type=positive_int, default=2, help="images decoded at once (default 2)")
    limits.add_argument("--request-timeout", type=float, default=60.0, help="seconds per request (default 60)")
    limits.add_argument("--max-texts", type=positive_int, default=256, help="texts per /embed/text (default 256)")
    limits.add_argument("--max-text-chars", type=positive_int, default=2000, help="characters per text (default 2000)")
    p.set_defaults(run=cmd_serve)


def register(commands: argparse._SubParsersAction) -> None:
    """Add this module's commands to the parser."""
    _serve_command(commands)
